"""Reward functions for tests (TRL's signature: ``fn(prompts=, completions=) -> list[float]``)."""

from __future__ import annotations


def word_count_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """A tenth of the completion's word count: cheap, deterministic, different per answer."""
    return [len(c.split()) / 10 for c in completions]
