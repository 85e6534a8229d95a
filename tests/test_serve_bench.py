"""Smoke run of the serving benchmark: the harness works end to end and its numbers are well-formed."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_serve_bench_smoke(tmp_path):
    import serve_bench

    out = tmp_path / "smoke.json"
    report = serve_bench.main(["--smoke", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    saved = json.loads(out.read_text())
    workloads = {"base", "av-server-base", "av-distinct", "av-same", "lora-per-mix", "prompt"}
    assert saved["online"].keys() == workloads
    for name, result in report["online"].items():
        assert result["errors"] == 0, (name, result["error_examples"])
        assert result["completed"] == 8
        for key in ("request_per_s", "output_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99"):
            assert math.isfinite(result[key]) and result[key] >= 0, (name, key)
        assert result["ttft_ms_p99"] >= result["ttft_ms_p50"]
    prompt, base = report["online"]["prompt"], report["online"]["base"]
    assert prompt["mean_prompt_tokens"] > base["mean_prompt_tokens"], "the prompt baseline adds preference tokens"
    assert report["meta"]["lora_per_mix"]["mixes"] == 4
    assert out.with_suffix(".md").read_text().startswith("| workload |")
    assert out.with_suffix(".png").stat().st_size > 1000


def test_serve_bench_offline_smoke(tmp_path):
    """Offline mode: every engine up at once, base run around every workload, ratios to base reported."""
    import serve_bench

    out = tmp_path / "offline.json"
    argv = ["--smoke", "--no-online", "--offline", "--workloads", "base", "av-distinct", "av-same", "av-distinct-dense",
            "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    report = serve_bench.main(argv)
    assert report["online"] == {}
    offline = report["offline"]
    assert offline.keys() == {"base", "av-distinct", "av-same", "av-distinct-dense"}
    assert offline["base"]["vs_base"] == 1.0
    for name, result in offline.items():  # one round: base before the three others and after each
        assert len(result["rounds"]) == (4 if name == "base" else 1) and len(result["vs_base_rounds"]) == 1
        assert math.isfinite(result["output_tok_per_s"]) and result["output_tok_per_s"] > 0, name
    assert 0 < offline["av-distinct"]["vs_av_same"] < 10
    assert "| offline workload |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


def test_serve_bench_lockstep_smoke(tmp_path):
    """Lockstep: each workload paired with base, in-process engines stepping in turn (run as the CLI, in
    a fresh process: in-process engines freeze vLLM's environment for the rest of the process)."""
    out = tmp_path / "lockstep.json"
    workloads = ["base", "av-distinct", "av-same", "prompt"]
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_bench.py"
    argv = [sys.executable, str(script), "--smoke", "--no-online", "--lockstep", "--workloads", *workloads,
            "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["online"] == {} and report["offline"] == {}
    lockstep = report["lockstep"]
    assert list(lockstep) == workloads
    assert lockstep["base"]["vs_base"] == 1.0
    assert len(lockstep["base"]["rounds"]) == 3  # one round: base paired with each of the three others
    for name, result in lockstep.items():
        assert math.isfinite(result["output_tok_per_s"]) and result["output_tok_per_s"] > 0, name
        for run in result["rounds"]:
            assert run["steps"] >= 8, (name, run)  # --smoke: 8 output tokens a request, one a step at most
        if name != "base":
            assert len(result["vs_base_rounds"]) == 1 and 0 < result["vs_base"] < 10, name
    assert 0 < lockstep["av-distinct"]["vs_av_same"] < 10
    assert "| lockstep workload |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000
