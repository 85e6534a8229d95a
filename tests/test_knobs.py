"""The preference-knob pipeline (issue 6), reduced: ``python -m benchmarks.knobs.run --quick``.

Trains the tiny base model from scratch, DPO per (domain, level), extracts the AVs, serves
λ·AV through vLLM with the plugin and checks: the knob is monotone on a small λ sweep, the
aligned level is reached, and vLLM's greedy tokens equal the merged-weights oracle's on a
sample (the pipeline itself exits non-zero on an oracle mismatch). ~1.5 min on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("knobs")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.knobs.run", "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "knobs_quick.json").read_text())


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
