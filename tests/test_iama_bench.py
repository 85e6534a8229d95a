"""IAMA's length experiment, reduced: ``python -m benchmarks.iama.run --quick`` (issue 21).

Standard GRPO and non-linear GRPO (best-of-4) train the demo tiny model with TRL for 40 steps each;
both policies are served as AVs by one vLLM engine with the plugin, n=4 samples per prompt.
Checks: the served AVs equal the trained checkpoints (greedy), and each policy wins the objective
it was trained for — IAMA under best-of-4, standard GRPO without a transform. ~1 min on 2 cores.
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
    out = tmp_path_factory.mktemp("iama")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.iama.run", "--quick", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "iama_quick.json").read_text())


def test_served_policies_equal_the_trained_checkpoints(quick):
    assert quick["oracle"]["samples"] == 2 and quick["oracle"]["equal"] == 2
    assert all(quick["train"][p]["av_dropped_share"] == 0.0 for p in ("grpo", "iama"))


def test_each_policy_wins_the_objective_it_was_trained_for(quick):
    grpo, iama = quick["policies"]["grpo"], quick["policies"]["iama"]
    assert iama["g_bon"] > grpo["g_bon"], (iama["g_bon"], grpo["g_bon"])
    assert grpo["g_plain"] > iama["g_plain"], (grpo["g_plain"], iama["g_plain"])
