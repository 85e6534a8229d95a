"""RE-Control on the knob task, reduced: ``python -m benchmarks.recontrol.run --quick`` (issue 20).

Collect and train a value function for an expert-preferring reward on the demo model, serve an
(α, n) sweep beside the expert AV and an expert prompt in one vLLM batch, and time it. Checks: the
steered answers equal the reference decoder, steering moves the answers, and every cost figure is
there. ~40 s on 2 cores.
"""

from __future__ import annotations

import pytest

from conftest import run_quick_benchmark

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("recontrol")
    return run_quick_benchmark("benchmarks.recontrol.run", out, "recontrol_quick.json"), out


def test_served_steering_equals_the_reference_decoder(quick):
    res, _ = quick
    assert res["oracle"]["samples"] == 2 and res["oracle"]["equal"] == 2


def test_the_value_function_was_trained_and_steering_moves_the_answers(quick):
    res, _ = quick
    train = res["train"]
    assert train["final_terminal_loss"] < train["terminal_loss"][0]
    base = res["sweep"]["base"]
    steered = [r for r in res["sweep"].values() if r["kind"] == "recontrol"]
    assert res["best"]["reward"] >= base["reward"]
    assert any(r["levels"] != base["levels"] for r in steered)
    assert res["sweep"]["AV expert λ=1.0"]["levels"]["expert"] > base["levels"]["expert"]


def test_cost_figures_and_plots(quick):
    res, out = quick
    s = res["speed"]
    assert s["requests"] == 32
    for key in ("base", "steered_n30", "steered_best", "reference_n30", "reference_n30_batch16",
                "published_n30_batch16"):
        assert s[key]["tok_per_s"] > 0
    assert s["published_same_tokens"], "the published-style reference must decode the lean reference's tokens"
    assert s["isolated_step_call_s"] > 0 and s["ceiling_vs_published_n30_batch16"] > 0
    assert (out / "recontrol_sweep.png").stat().st_size > 0 and (out / "recontrol_levels.png").stat().st_size > 0
