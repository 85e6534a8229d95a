"""The runtime-update benchmark, reduced: ``python -m benchmarks.runtime_updates --quick`` (issue 19).

Loads, replaces and unloads AVs back to back while clients stream, then runs one batch of mixed rows
on a TP=1 and a TP=2 engine. Checks: no update failed, no stream erred, every figure is there, and
TP=2 produced the same tokens as TP=1. ~80 s on 2 cores.
"""

from __future__ import annotations

import pytest

from conftest import run_quick_benchmark

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime_bench")
    return run_quick_benchmark("benchmarks.runtime_updates", out, "runtime_updates_quick.json")


def test_updates_while_serving_never_fail_a_request(quick):
    updates = quick["updates"]
    assert updates["update_failures"] == [] and updates["stream_errors"] == 0
    assert updates["streams_completed"] > 0
    latency = updates["latency"]
    assert latency["load"]["n"] == latency["replace"]["n"] == latency["unload"]["n"] >= 2
    assert 0 < latency["all"]["p50_ms"] <= latency["all"]["p99_ms"] <= latency["all"]["max_ms"]
    assert len(updates["rounds"]) == 2 and updates["update_over_quiet_tok_per_s"] > 0


def test_tensor_parallel_matches_one_rank(quick):
    tp = quick["tensor_parallel"]
    assert tp["identical_outputs"] == tp["requests"] == 16
    assert tp["tp2_over_tp1"] > 0
