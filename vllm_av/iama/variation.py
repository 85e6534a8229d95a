"""First variations of inference-time objectives, on one group of completions (IAMA's non-linear GRPO).

For a criterion with reward ``r`` and an inference-time transform ``T`` of the policy π, the
objective is ``R[π] = E_{y ~ T[π]} r(y)``. GRPO needs a per-sample reward; IAMA gives it the
first variation ``∂R/∂π (y)`` evaluated on the group's empirical distribution:

- identity (standard GRPO): ``r(y)``;
- best-of-N: ``−∫_{r(y)}^{r_max} N C(r)^{N−1} dr`` with ``C`` the reward CDF under π; on a group
  sorted ascending ``r_1 ≤ … ≤ r_M`` with ``F_k = k/M``: ``r̃_j = −Σ_{k=j}^{M−1} (r_{k+1} − r_k) N F_k^{N−1}``;
- soft best-of-N (exponential tilting, temperature τ): ``r e^{r/τ}/Z − e^{r/τ} E[r e^{r/τ}]/Z²``,
  ``Z = E[e^{r/τ}]``, both expectations over the group.

Several criteria combine by the chain rule, ``r̃ = Σ_i ∂g/∂R_i · r̃_i``, for ``g`` a weighted sum,
a min (a subgradient: all weight on the smallest ``R_i``) or a smooth min
``−(1/γ) log Σ_i w_i e^{−γ R_i}``; ``R_i`` itself is estimated on the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transform:
    """An inference-time procedure: ``identity``, ``bon`` (best-of-``n``) or ``soft_bon`` (temperature ``tau``)."""

    kind: str = "identity"
    n: int = 1
    tau: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> "Transform":
        """``identity``, ``bon:4`` or ``soft_bon:0.5``; raises ValueError naming the problem."""
        kind, _, value = spec.strip().partition(":")
        try:
            if kind == "identity" and not value:
                return cls()
            if kind == "bon" and int(value) >= 1:
                return cls("bon", n=int(value))
            if kind == "soft_bon" and float(value) > 0:
                return cls("soft_bon", tau=float(value))
        except ValueError:
            pass
        raise ValueError(f"transform {spec!r}: expected identity, bon:N (N ≥ 1) or soft_bon:TAU (TAU > 0)")


def _probs(r: np.ndarray, probs) -> np.ndarray:
    """The distribution over the samples: uniform (a group of draws) unless ``probs`` is given."""
    if probs is None:
        return np.full(len(r), 1.0 / len(r))
    p = np.asarray(probs, dtype=float)
    if p.shape != r.shape or (p < 0).any():
        raise ValueError(f"probs must be {len(r)} non-negative numbers, one per reward")
    return p


def best_of_n_variation(rewards, n: int, probs=None) -> np.ndarray:
    """``∂R/∂π`` of best-of-``n`` at each sample: ``−Σ_{k=j}^{M−1} (r_{k+1} − r_k) N C_k^{N−1}`` over the
    rewards sorted ascending, ``C_k`` their CDF under ``probs`` (default: the group's, ``k/M``)."""
    r = np.asarray(rewards, dtype=float)
    order = np.argsort(r, kind="stable")
    cdf = np.cumsum(_probs(r, probs)[order])
    steps = np.diff(r[order]) * n * cdf[:-1] ** (n - 1)
    tail = np.concatenate([np.cumsum(steps[::-1])[::-1], [0.0]])  # Σ_{k=j}^{M−1}
    out = np.empty(len(r))
    out[order] = -tail
    return out


def soft_best_of_n_variation(rewards, tau: float, probs=None) -> np.ndarray:
    """``∂R/∂π`` of soft best-of-N (exponential tilting at temperature ``tau``) at each sample."""
    r = np.asarray(rewards, dtype=float)
    p = _probs(r, probs)
    w = np.exp((r - r.max()) / tau)  # e^{r/τ} up to a common factor, which cancels
    z = (p * w).sum()
    return r * w / z - w * (p * r * w).sum() / z**2


def variation(rewards, transform: Transform, probs=None) -> np.ndarray:
    """The per-sample reward GRPO gets for one criterion under ``transform``."""
    if transform.kind == "bon":
        return best_of_n_variation(rewards, transform.n, probs)
    if transform.kind == "soft_bon":
        return soft_best_of_n_variation(rewards, transform.tau, probs)
    return np.asarray(rewards, dtype=float)


def transformed_value(rewards, transform: Transform, probs=None) -> float:
    """``R_i``, the criterion's objective under ``transform``, on the group (or under ``probs``)."""
    r = np.asarray(rewards, dtype=float)
    p = _probs(r, probs)
    if transform.kind == "bon":
        order = np.argsort(r, kind="stable")
        cdf = np.concatenate([[0.0], np.cumsum(p[order])])
        return float(np.sum(r[order] * (cdf[1:] ** transform.n - cdf[:-1] ** transform.n)))  # E[max of N draws]
    if transform.kind == "soft_bon":
        w = p * np.exp((r - r.max()) / transform.tau)
        return float((r * w).sum() / w.sum())
    return float((p * r).sum())


def combine_weights(values, weights, g: str = "sum", gamma: float = 10.0) -> np.ndarray:
    """``∂g/∂R_i`` at ``R = values`` for ``g`` = ``sum`` (weighted), ``min`` (subgradient) or ``smooth_min``."""
    v, w = np.asarray(values, dtype=float), np.asarray(weights, dtype=float)
    if g == "sum":
        return w
    if g == "min":
        out = np.zeros_like(v)
        out[int(np.argmin(v))] = 1.0
        return out
    if g == "smooth_min":
        e = w * np.exp(-gamma * (v - v.min()))
        return e / e.sum()
    raise ValueError(f"g {g!r}: expected sum, min or smooth_min")


def group_rewards(rewards_per_criterion, transforms, weights, g: str = "sum", gamma: float = 10.0,
                  probs=None) -> np.ndarray:
    """One prompt's group: ``rewards_per_criterion[i][j]`` is criterion i's reward of completion j.

    Returns IAMA's reward of each completion, ``Σ_i ∂g/∂R_i · ∂R_i/∂π (y_j)``; ``probs``: an exact
    distribution over the outcomes instead of the group's empirical one."""
    rows = [np.asarray(r, dtype=float) for r in rewards_per_criterion]
    values = [transformed_value(r, t, probs) for r, t in zip(rows, transforms)]
    dg = combine_weights(values, weights, g, gamma)
    return sum(d * variation(r, t, probs) for d, r, t in zip(dg, rows, transforms))
