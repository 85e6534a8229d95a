"""The knob task's reward for RE-Control: the expert level is preferred (``vllm-av recontrol collect
--reward benchmarks.recontrol.reward:expert_reward``)."""

from __future__ import annotations

from benchmarks.knobs import data as D

LEVEL_REWARD = {0: 0.0, 1: 0.5, 2: 1.0}  # avoid, generic, expert; an undecided answer scores 0


def expert_reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1 for an expert-level answer, 0.5 for a generic one, 0 for avoidance or no clear level (TRL's signature)."""
    return [LEVEL_REWARD.get(D.classify(text), 0.0) for text in completions]
