"""IAMA's length experiment, reduced: ``python -m benchmarks.iama.run --quick`` (issue 21).

Standard GRPO and non-linear GRPO (best-of-4) train the demo tiny model with TRL for 40 steps each;
both policies are served as AVs by one vLLM engine with the plugin, n=4 samples per prompt.
Checks: the served AVs equal the trained checkpoints (greedy), and each policy wins the objective
it was trained for — IAMA under best-of-4, standard GRPO without a transform. ~1 min on 2 cores.
"""

from __future__ import annotations

import pytest

from conftest import run_quick_benchmark

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("iama")
    return run_quick_benchmark("benchmarks.iama.run", out, "iama_quick.json")


def test_served_policies_equal_the_trained_checkpoints(quick):
    assert quick["oracle"]["samples"] == 2 and quick["oracle"]["equal"] == 2
    assert all(quick["train"][p]["av_dropped_share"] == 0.0 for p in ("grpo", "iama"))


def test_each_policy_wins_the_objective_it_was_trained_for(quick):
    grpo, iama = quick["policies"]["grpo"], quick["policies"]["iama"]
    assert iama["g_bon"] > grpo["g_bon"], (iama["g_bon"], grpo["g_bon"])
    assert grpo["g_plain"] > iama["g_plain"], (grpo["g_plain"], iama["g_plain"])
