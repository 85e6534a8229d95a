"""IAMA's first variations (issue 21): exact on finite distributions, O(1/M) on groups, Prop. 3.1."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_av.iama.reward import IAMAReward
from vllm_av.iama.variation import (Transform, best_of_n_variation, combine_weights, group_rewards,
                                    transformed_value, variation)

TRANSFORMS = [Transform(), Transform("bon", n=2), Transform("bon", n=4), Transform("soft_bon", tau=0.5),
              Transform("soft_bon", tau=2.0)]


def test_best_of_n_on_a_group_by_hand():
    # sorted 1 < 2 < 3, F = 1/3, 2/3, N = 2: r̃ = −(1·2·1/3 + 1·2·2/3), −(1·2·2/3), 0
    assert np.allclose(best_of_n_variation([3.0, 1.0, 2.0], 2), [0.0, -2.0, -4 / 3])
    assert transformed_value([1.0, 2.0], Transform("bon", n=2)) == pytest.approx(1.75)  # E[max of 2 draws]


@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: f"{t.kind}-{t.n}-{t.tau}")
def test_exact_variation_is_the_derivative_of_the_objective(transform):
    """Under an exact finite π, the variation equals the finite-difference derivative of R w.r.t. π(y)
    (for best-of-N up to the constant N·r_max that the normalisation of π removes)."""
    rng = np.random.default_rng(0)
    rewards, probs = rng.normal(size=7), rng.dirichlet(np.ones(7))
    eps = 1e-6
    fd = np.array([(transformed_value(rewards, transform, probs + eps * e) -
                    transformed_value(rewards, transform, probs - eps * e)) / (2 * eps) for e in np.eye(7)])
    if transform.kind == "bon":
        fd -= transform.n * rewards.max()
    assert np.allclose(variation(rewards, transform, probs), fd, atol=1e-6)


def _exact_on_uniform(r, transform):
    """∂R/∂π at rewards r for π with rewards ~ Uniform(0, 1)."""
    if transform.kind == "bon":
        return -(1 - r**transform.n)
    t = transform.tau
    z, e_rw = t * (np.exp(1 / t) - 1), t * np.exp(1 / t) - t**2 * (np.exp(1 / t) - 1)
    return r * np.exp(r / t) / z - np.exp(r / t) * e_rw / z**2


@pytest.mark.parametrize("transform", [Transform("bon", n=4), Transform("soft_bon", tau=0.5)], ids=["bon4", "soft0.5"])
def test_group_estimator_error_shrinks_like_one_over_m(transform):
    """Mean squared error of the group estimator against the exact variation, over 100 groups per size:
    the log-log slope against M is −1 (the RMS error goes as M^−1/2)."""
    sizes = [16, 64, 256, 1024]
    mse = []
    for m in sizes:
        errs = []
        for seed in range(100):
            r = np.random.default_rng(seed).random(m)
            errs.append(np.mean((variation(r, transform) - _exact_on_uniform(r, transform)) ** 2))
        mse.append(np.mean(errs))
    slope = np.polyfit(np.log(sizes), np.log(mse), 1)[0]
    assert -1.25 < slope < -0.8, (slope, mse)


def _mirror_descent(first_variation, bins: int, steps: int, lr: float = 4.0) -> np.ndarray:
    pi = np.full(bins, 1.0 / bins)
    for _ in range(steps):
        v = first_variation(pi)
        pi = pi * np.exp(lr * (v - v.max()))
        pi /= pi.sum()
    return pi


@pytest.mark.parametrize("n, tolerance", [(2, 1e-6), (4, 1e-3), (8, 1e-2)])
def test_prop_3_1_mirror_descent_reaches_the_closed_form_optimum(n, tolerance):
    """y ∈ [0, 1] in 100 bins, r_1 = 1 − y², r_2 = 1 − (1 − y)², g = ½R_1 + ½R_2, best-of-N for both;
    40,000 mirror-descent steps with the exact first variation. Total-variation distance to the bin
    masses of α y^(α−1)(1−y)^(α−1)/(y^α + (1−y)^α)² (CDF y^α/(y^α + (1−y)^α)), α = 1/(N−1), reached
    here: < 1e-9 (N=2), < 1e-4 (N=4), 0.0026 (N=8)."""
    bins = 100
    y = (np.arange(bins) + 0.5) / bins
    r1, r2, bon = 1 - y**2, 1 - (1 - y) ** 2, Transform("bon", n=n)
    pi = _mirror_descent(lambda p: group_rewards([r1, r2], [bon, bon], [0.5, 0.5], probs=p), bins, 40_000)
    a = 1 / (n - 1)
    edges = np.linspace(0, 1, bins + 1)
    target = np.diff(edges**a / (edges**a + (1 - edges) ** a))
    assert 0.5 * np.abs(pi - target).sum() < tolerance
    if n > 2:  # bimodal: more mass in the outer tenths than in the middle fifth
        assert pi[:10].sum() + pi[-10:].sum() > pi[40:60].sum()


def test_the_linear_objective_converges_to_the_point_mass_at_one_half():
    bins = 100
    y = (np.arange(bins) + 0.5) / bins
    r1, r2 = 1 - y**2, 1 - (1 - y) ** 2
    pi = _mirror_descent(lambda p: group_rewards([r1, r2], [Transform()] * 2, [0.5, 0.5], probs=p), bins, 2_000)
    assert pi[(y > 0.45) & (y < 0.55)].sum() > 0.99


def test_combination_weights_are_the_derivatives_of_g():
    values, weights = np.array([0.3, -0.2, 0.5]), np.array([0.2, 0.5, 0.3])
    assert np.allclose(combine_weights(values, weights, "sum"), weights)
    assert np.allclose(combine_weights(values, weights, "min"), [0, 1, 0])
    gamma, eps = 3.0, 1e-6

    def smooth_min(v):
        return -np.log(np.sum(weights * np.exp(-gamma * v))) / gamma

    fd = [(smooth_min(values + eps * e) - smooth_min(values - eps * e)) / (2 * eps) for e in np.eye(3)]
    assert np.allclose(combine_weights(values, weights, "smooth_min", gamma), fd, atol=1e-6)
    with pytest.raises(ValueError, match="expected sum, min or smooth_min"):
        combine_weights(values, weights, "max")


def test_transform_specs():
    assert Transform.parse("bon:4") == Transform("bon", n=4)
    assert Transform.parse("soft_bon:0.5") == Transform("soft_bon", tau=0.5)
    assert Transform.parse("identity") == Transform()
    for bad in ("bon:0", "bon:x", "soft_bon:-1", "best:4", "identity:2"):
        with pytest.raises(ValueError, match="expected identity, bon:N"):
            Transform.parse(bad)


def test_trl_reward_function_scores_each_prompt_group():
    def short(prompts, completions, **_):
        return [-abs(len(c) - 2) for c in completions]

    def long(prompts, completions, **_):
        return [-abs(len(c) - 6) for c in completions]

    reward = IAMAReward([short, long], [Transform("bon", n=4)] * 2, [0.5, 0.5], group_size=3)
    prompts = ["p"] * 3 + ["q"] * 3
    completions = ["ab", "abcd", "abcdef", "a", "abc", "abcdefgh"]
    got = reward(prompts=prompts, completions=completions)
    for start in (0, 3):
        group = completions[start:start + 3]
        want = group_rewards([short(None, group), long(None, group)], reward.transforms, reward.weights)
        assert np.allclose(got[start:start + 3], want)
    with pytest.raises(ValueError, match="not one prompt's group"):
        reward(prompts=["p", "p", "q", "q", "q", "q"], completions=completions)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        reward(prompts=prompts[:4], completions=completions[:4])
