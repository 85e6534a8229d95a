"""The preference-knob pipeline (issue 6), reduced: ``python -m benchmarks.knobs.run --quick``.

Trains the tiny base model from scratch, DPO per (domain, level), extracts the AVs, serves
λ·AV through vLLM with the plugin and checks: the knob is monotone on a small λ sweep, the
aligned level is reached, and vLLM's greedy tokens equal the merged-weights oracle's on a
sample (the pipeline itself exits non-zero on an oracle mismatch). ~1.5 min on 2 CPU cores.
"""

from __future__ import annotations

import pytest

from conftest import run_quick_benchmark

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("knobs")
    return run_quick_benchmark("benchmarks.knobs.run", out, "knobs_quick.json")


def test_knob_is_monotone_in_lambda(quick):
    for domain, sweep in quick["sweep"].items():
        expert = [p["mean_level"] for p in sweep["expert"]["points"]]
        avoid = [p["mean_level"] for p in sweep["avoid"]["points"]]
        assert all(b >= a for a, b in zip(expert, expert[1:])), (domain, expert)
        assert expert[-1] - expert[0] >= 1.0, (domain, expert)
        assert all(b <= a for a, b in zip(avoid, avoid[1:])), (domain, avoid)
        assert sweep["expert"]["spearman_level"] >= 0.9, domain
        assert sweep["expert"]["best_accuracy"] >= 0.9, domain


def test_served_mixes_match_merged_weights_oracle(quick):
    oracle = quick["oracle"]
    assert oracle["mismatches"] == []
    assert oracle["equal"] >= oracle["samples"] - 1 and oracle["samples"] >= 3


def test_multidomain_sums_reach_most_combinations(quick):
    assert quick["multidomain"]["reachable"] >= 20
