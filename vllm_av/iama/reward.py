"""IAMA's reward for TRL's ``GRPOTrainer``: raw criterion rewards in, first variations out.

``GRPOTrainer`` scores a batch made of groups: each prompt repeated ``num_generations`` times in a
row. :class:`IAMAReward` calls every criterion (each a TRL reward function,
``f(prompts=..., completions=..., **kwargs) -> list[float]``), cuts the batch into those groups,
and returns for each completion ``Σ_i ∂g/∂R_i · ∂R_i/∂π (y)`` (:mod:`vllm_av.iama.variation`).
With every transform ``identity`` and ``g = sum`` it is standard GRPO on the weighted sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vllm_av.iama.variation import Transform, group_rewards


class IAMAReward:
    """A TRL reward function computing IAMA's non-linear GRPO reward per group of completions."""

    __name__ = "iama"  # TRL logs each reward function under its __name__

    def __init__(self, criteria: Sequence[Callable], transforms: Sequence[Transform], weights: Sequence[float],
                 group_size: int, g: str = "sum", gamma: float = 10.0):
        if not (len(criteria) == len(transforms) == len(weights)) or not criteria:
            raise ValueError("IAMAReward needs one transform and one weight per criterion, and at least one criterion")
        if group_size < 2:
            raise ValueError(f"group_size {group_size}: a group needs at least 2 completions")
        self.criteria, self.transforms, self.weights = list(criteria), list(transforms), list(weights)
        self.group_size, self.g, self.gamma = group_size, g, gamma

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float]:
        if len(completions) % self.group_size:
            raise ValueError(f"{len(completions)} completions do not split into groups of {self.group_size}")
        raw = [list(c(prompts=prompts, completions=completions, **kwargs)) for c in self.criteria]
        out: list[float] = []
        for start in range(0, len(completions), self.group_size):
            group = slice(start, start + self.group_size)
            if any(p != prompts[start] for p in prompts[group]):
                raise ValueError(f"completions {start}..{start + self.group_size - 1} are not one prompt's group")
            out += group_rewards([r[group] for r in raw], self.transforms, self.weights, self.g, self.gamma).tolist()
        return out
