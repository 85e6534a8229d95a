"""The fused Triton blend kernel against a float64 reference.

Without a GPU the real kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors; with one it
runs compiled on CUDA tensors.  Inputs are fresh random draws on every run (the seed is in the
failure message).  The kernel runs at the input widths of real models and their tensor-parallel
slices; every configuration :func:`blend_config` returns is held to the kernel's rules over a
grid of shapes, and the distinct ones are compiled for real GPU targets by Triton's own compiler
and ptxas (no GPU needed).  GPU-only checks (op dispatch, torch.compile, CUDA graphs) are marked
``gpu``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must be set before triton.jit decorates the kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_av.kernels.blend import BlendConfig, blend_config, blend_triton, config_problems  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
ACTIVE = torch.ones(1, dtype=torch.int32, device=DEVICE)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
POISON = -12345.0


def make_problem(gen, T, d_in, out_slices, ranks, M, dtype, *, p_unused=0.25, p_zero=0.15, p_repeat=0.0):
    """Random library with mixed ranks (zero-padded to the max), entries with -1 / 0 / negative scales;
    with ``p_repeat``, that share of the rows name their first AV again in their last entry."""
    N, R, S = len(ranks), max(ranks), len(out_slices)
    a = torch.zeros(S, N, R, d_in)
    b = torch.zeros(N, sum(out_slices), R)
    for n, r in enumerate(ranks):
        a[:, n, :r] = torch.randn(S, r, d_in, generator=gen) / d_in**0.5
        b[n, :, :r] = torch.randn(sum(out_slices), r, generator=gen) / r**0.5
    index = torch.randint(0, N, (T, M), generator=gen, dtype=torch.int32)
    scale = torch.randn(T, M, generator=gen) * 2
    roll = torch.rand(T, M, generator=gen)
    index[roll < p_unused] = -1
    scale[(roll >= p_unused) & (roll < p_unused + p_zero)] = 0.0
    if M > 1 and p_repeat:
        repeat = torch.rand(T, generator=gen) < p_repeat
        index[repeat, -1] = index[repeat, 0]
    x = torch.randn(T, d_in, generator=gen)
    y0 = torch.randn(T, sum(out_slices), generator=gen)
    cast = dict(dtype=dtype, device=DEVICE)
    return (y0.to(**cast), x.to(**cast), a.to(**cast), b.to(**cast),
            index.to(DEVICE), scale.to(DEVICE))


def reference64(y0, x, a, b, index, scale, out_slices):
    """Float64 expected output and an absolute bound |y0| + sum |s| |B| |A| |x| for the tolerance."""
    exp, bound = y0.double().cpu().clone(), y0.double().cpu().abs()
    x, a, b = x.double().cpu(), a.double().cpu(), b.double().cpu()
    index, scale = index.cpu(), scale.double().cpu()
    T, M = index.shape
    offset = 0
    for k, width in enumerate(out_slices):
        cols = slice(offset, offset + width)
        for t in range(T):
            for m in range(M):
                i, s = int(index[t, m]), float(scale[t, m])
                if i < 0:
                    continue
                exp[t, cols] += s * (b[i, cols] @ (a[k, i] @ x[t]))
                bound[t, cols] += abs(s) * (b[i, cols].abs() @ (a[k, i].abs() @ x[t].abs()))
        offset += width
    return exp, bound


def run_and_check(seed, T, d_in, out_slices, ranks, M, dtype, config=None, **problem_kw):
    gen = torch.Generator().manual_seed(seed)
    y0, x, a, b, index, scale = make_problem(gen, T, d_in, out_slices, ranks, M, dtype, **problem_kw)
    width, pad = sum(out_slices), 3
    # y is a strided view into a poisoned buffer: padding columns must never be touched
    y_buf = torch.full((T, width + pad), POISON, dtype=dtype, device=DEVICE)
    y = y_buf[:, :width]
    y.copy_(y0)
    before = y_buf.clone()
    blend_triton(y, x, a, b, index, scale, ACTIVE, out_slices, config=config)

    exp, bound = reference64(y0, x, a, b, index, scale, out_slices)
    eps = torch.finfo(dtype).eps
    got = y.double().cpu()
    tol = (3 * eps + 1e-5) * bound + 1e-6
    err = (got - exp).abs()
    msg = f"seed={seed} T={T} in={d_in} slices={out_slices} ranks={ranks} M={M} {dtype}"
    assert torch.isfinite(got).all(), msg
    assert (err <= tol).all(), f"{msg}: max err {err.max():.3g}, worst ratio {(err / tol).max():.3g}"

    active = ((index >= 0) & (scale != 0)).any(dim=1).cpu()
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    after_bits, before_bits = y_buf.view(bits).cpu(), before.view(bits).cpu()
    assert torch.equal(after_bits[:, width:], before_bits[:, width:]), f"{msg}: padding written"
    assert torch.equal(after_bits[~active], before_bits[~active]), f"{msg}: inactive rows changed"


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


DTYPES = [torch.bfloat16, torch.float16, torch.float32]

# (T, in, out_slices, ranks of the library, M): odd sizes, T=1, 1-3 slices of unequal width,
# ranks 1..64 mixed, M = 1..8; T chosen to hit every shape class of blend_config
CASES = [
    (1, 37, [45], [1, 5, 16], 1),
    (1, 200, [33, 17, 9], [3, 64, 8, 1, 12, 7, 2, 30], 8),  # split-K across programs
    (7, 65, [50, 30], [4, 9, 2, 13, 6], 3),
    (19, 41, [23, 41, 10], [64, 1, 33, 5], 8),  # two 16-row tiles
    (33, 29, [70, 18], [2, 7, 11], 5),  # 64-row decode tile
    (70, 23, [131], [16, 3], 2),  # medium shape, 128-column tiles
    (530, 17, [19, 11], [1, 2], 2),  # prefill shape, 128-row tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-in{c[1]}-s{len(c[2])}-M{c[4]}")
def test_blend_matches_float64(case, dtype):
    run_and_check(fresh_seed(), *case, dtype)


@pytest.mark.parametrize("two_launches", [False, True], ids=["fused", "two-launches"])
def test_explicit_configs(two_launches):
    """Same result with a forced K split and with shrink/expand as two launches."""
    cfg = BlendConfig(block_t=16, block_n=32, block_k=32, k_split=4, num_warps=4, two_launches=two_launches)
    run_and_check(fresh_seed(), 21, 150, [40, 24], [8, 3, 17], 4, torch.bfloat16, config=cfg)


def test_more_than_four_slices():
    run_and_check(fresh_seed(), 5, 19, [7, 12, 3, 9, 5], [2, 6], 2, torch.float32)


def test_no_active_entries_leaves_y_untouched():
    """All entries -1 or zero-scale: every element of y stays bit-identical."""
    run_and_check(fresh_seed(), 9, 33, [20, 12], [4, 4], 3, torch.float16, p_unused=0.6, p_zero=0.4)


def test_inactive_step_returns_at_once():
    """step_active = 0: the kernel adds nothing, even where the tables still hold entries."""
    gen = torch.Generator().manual_seed(fresh_seed())
    y, x, a, b, index, scale = make_problem(gen, 5, 96, [40, 8], [4, 2], 2, torch.float32, p_unused=0.0, p_zero=0.0)
    before = y.clone()
    blend_triton(y, x, a, b, index, scale, torch.zeros_like(ACTIVE), [40, 8])
    assert torch.equal(y, before)
    blend_triton(y, x, a, b, index, scale, ACTIVE, [40, 8])
    assert not torch.equal(y, before)


# Input widths of real models and their tensor-parallel slices: SmolLM2-135M (576, 1536),
# SmolLM2-360M / Llama o_proj at TP (960, 2560), Qwen2.5-0.5B (896 = Qwen2-7B's 3584 at TP=4),
# Llama-3.2-1B (2048), Llama-3-8B (4096), and BERT-size 768; 320 is the smallest with 5 K blocks.
REAL_WIDTHS = [320, 576, 768, 896, 960, 1536, 2048, 2560, 4096]
ODD_ROWS = [1, 3, 17, 70]


@pytest.mark.parametrize("rows", ODD_ROWS)
@pytest.mark.parametrize("width", REAL_WIDTHS)
def test_blend_at_real_model_widths(width, rows):
    """The kernel at the shapes a GPU start runs (every decode size, then prefill): real input
    widths (the K split at non-power-of-two block counts), odd row counts, one or three slices
    (q/k/v of a GQA model), repeated and padded (-1) entries, every dtype in turn."""
    i = REAL_WIDTHS.index(width) + ODD_ROWS.index(rows)
    slices = [width // 4 + 3] if i % 2 else [width // 2, width // 8, width // 8]
    dtype = DTYPES[i % len(DTYPES)]
    run_and_check(fresh_seed(), rows, width, slices, [16, 8, 16], 4, dtype, p_repeat=0.3)


def test_config_depends_on_shape_only():
    decode = blend_config(1, 4096, 3, 16, 4, 16)
    prefill = blend_config(2048, 4096, 3, 16, 4, 16)
    assert decode.block_t == 16 and decode.k_split > 1
    assert prefill.block_t == 64 and prefill.k_split == 1


# The grid the engine's calls span: every row count a GPU start runs (decode sizes up to
# prefill chunks of 8192), input widths up to Llama-3-70B's 28672 and their TP slices, ranks
# 1..512, and library / mix / slice counts from tiny to large.
GRID_ROWS = list(range(1, 67)) + [70, 96, 127, 128, 129, 200, 255, 256, 257, 511, 512, 1000, 1024, 2047, 2048, 4095,
                                   4096, 8191, 8192]
GRID_WIDTHS = [16, 37, 64, 65, 128, 192, 320, 576, 768, 896, 960, 1024, 1280, 1536, 2048, 2560, 3072, 3584,
               4096, 5120, 7168, 8192, 11008, 13824, 14336, 18944, 28672, 28672 // 8]
GRID_RANKS = [1, 4, 8, 16, 17, 32, 64, 100, 128, 256, 512]
GRID_LIBRARY = [(1, 1, 1), (3, 3, 4), (2, 16, 8), (1, 64, 8), (4, 8, 2), (3, 256, 16), (5, 2, 3), (2, 128, 1)]


def grid_configs():
    """``(shape, config)`` for every shape of the grid (``shape``: ``blend_config``'s arguments)."""
    for rows in GRID_ROWS:
        for width in GRID_WIDTHS:
            for rank in GRID_RANKS:
                for slices, num_avs, entries in GRID_LIBRARY:
                    shape = (rows, width, slices, num_avs, entries, rank)
                    yield shape, blend_config(*shape)


def test_every_config_blend_config_returns_is_valid():
    """Fast and exhaustive: no shape of the grid gets a configuration the kernel cannot compile
    or run (non-power-of-two block or arange, a dot below 16, a K-split program without input,
    an oversized tile or grid)."""
    bad, count = [], 0
    for shape, cfg in grid_configs():
        count += 1
        problems = config_problems(cfg, *shape)
        if problems:
            bad.append(f"{shape}: {cfg}: {'; '.join(problems)}")
    assert count > 200_000
    assert not bad, f"{len(bad)} invalid configs, e.g.\n" + "\n".join(bad[:10])


def test_config_problems_names_what_breaks_the_kernel():
    """The validity rules are real: the configuration that killed GPU starts (issue 33: a K split of
    9 at width 576) and other broken ones are named."""
    assert config_problems(blend_config(1, 576, 1, 2, 2, 8), 1, 576, 1, 2, 2, 8) == []
    assert "leaves a program without input" in " ".join(
        config_problems(BlendConfig(16, 128, 64, 16, 4), 1, 576, 1, 2, 2, 8))
    assert "block_t=24 is not a power of two" in config_problems(BlendConfig(24, 128, 64, 1, 4), 1, 64, 1, 1, 1, 8)
    assert "block_n=8 is below tl.dot's 16" in config_problems(BlendConfig(16, 8, 64, 1, 4), 1, 64, 1, 1, 1, 8)
    assert any("B tile" in p for p in config_problems(BlendConfig(16, 128, 16, 1, 4), 1, 64, 1, 1, 1, 512))


SHARED_MEMORY_LIMIT = 99 * 1024  # the smallest per-block maximum from sm_80 up (sm_86 / sm_89)


def test_distinct_configs_compile_for_hopper_and_ampere():
    """Every distinct tile configuration of the grid compiles for sm_90 (H100/H200) with ptxas and
    fits the shared memory of every GPU from sm_80 up; the default one for sm_80 (A100) and in
    each dtype and launch phase too. Runs on CPU: Triton's compiler needs no device."""
    from vllm_av.kernels.blend import rank_block

    def job(arch, cfg, block_r, phase=1, dtype="bf16", block_m=8):
        return dict(arch=arch, num_warps=cfg.num_warps, PHASE=phase, BLOCK_T=cfg.block_t, BLOCK_M=block_m,
                    BLOCK_R=block_r, BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, dtype=dtype)

    tiles = {}
    for shape, cfg in grid_configs():
        tiles.setdefault((cfg.block_t, cfg.block_n, cfg.block_k, rank_block(shape[-1]), cfg.num_warps), cfg)
    jobs = [job(90, cfg, key[3]) for key, cfg in sorted(tiles.items())]
    default = blend_config(16, 4096, 3, 16, 8, 16)
    jobs += [job(80, default, 16), job(90, default, 16, phase=0), job(90, default, 16, phase=2, dtype="fp16"),
             job(90, default, 16, phase=2, dtype="fp32", block_m=1)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernel_compile"], input=json.dumps(jobs), env=env,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(jobs)
    for spec, result in zip(jobs, results):
        assert "error" not in result, f"{spec}: {result['error']}"
        assert result["shared"] <= SHARED_MEMORY_LIMIT, f"{spec}: {result['shared']} B of shared memory"


def test_repeated_launches_reuse_the_sync_counter():
    """The in-launch barrier resets itself: back-to-back calls stay correct."""
    for _ in range(3):
        run_and_check(fresh_seed(), 3, 70, [12, 6], [5, 2], 2, torch.bfloat16)


def test_reserved_scratch_is_never_regrown():
    """After reserve_scratch for T rows, no call of up to T rows allocates (safe under graph capture)."""
    import vllm_av.kernels.blend as blend_mod

    blend_mod._counter_buffers.clear()
    blend_mod.reserve_scratch(DEVICE, 200, 2, 3, 4)
    reserved = blend_mod._counter_buffers[torch.device(DEVICE)]
    for rows in (1, 17, 64, 65, 200):
        run_and_check(fresh_seed(), rows, 24, [12, 6], [4, 2, 3], 2, torch.float32)
        assert blend_mod._counter_buffers[torch.device(DEVICE)] is reserved, f"regrown at {rows} rows"


# ---------------------------------------------------------------------------------------- GPU


def _assert_close_bf16(got, expected):
    # both sides round the float32 sum to bfloat16: allow one ulp of y (|y| < 8 here)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=5e-2)


def _llama_like(T=16, N=8, R=16, M=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return make_problem(gen, T, 512, [512, 128, 128], [R] * N, M, torch.bfloat16), [512, 128, 128]


@gpu
@needs_cuda
def test_op_dispatches_to_triton_on_cuda(monkeypatch):
    from vllm_av.serving.blend import op as ops
    from vllm_av.serving.blend.select import select_backend

    assert select_backend(torch.device("cuda")).name == "triton"
    assert ops._implementations["cuda"] is blend_triton, "the Triton backend did not install the kernel"
    calls = []
    monkeypatch.setitem(ops._implementations, "cuda", lambda *a: (calls.append(1), blend_triton(*a))[1])
    (y, x, a, b, index, scale), slices = _llama_like()
    expected = y.clone()
    ops.blend_reference(expected, x, a, b, index, scale, slices)
    torch.ops.vllm_av.blend_(y, x, a, b, index, scale, ACTIVE, slices)
    assert calls, "torch.ops.vllm_av.blend_ did not call blend_triton on CUDA"
    _assert_close_bf16(y, expected)


@gpu
@needs_cuda
def test_op_under_torch_compile_fullgraph():
    from vllm_av.serving.blend.select import select_backend

    select_backend(torch.device("cuda"))  # the op runs the Triton kernel on CUDA

    (y, x, a, b, index, scale), slices = _llama_like(T=24)
    expected = y.clone()
    blend_triton(expected, x, a, b, index, scale, ACTIVE, slices)

    @torch.compile(fullgraph=True)
    def step(y, x, index, scale):
        torch.ops.vllm_av.blend_(y, x, a, b, index, scale, ACTIVE, slices)
        return y * 1

    out = step(y, x, index, scale)
    _assert_close_bf16(out, expected)


@gpu
@needs_cuda
def test_cuda_graph_replay_follows_new_indices():
    """Capture once, then change av_index/av_scale in place: replays use the new data."""
    from vllm_av.serving.blend import op as ops
    from vllm_av.serving.blend.select import select_backend

    select_backend(torch.device("cuda"))  # the op runs the Triton kernel on CUDA

    (y0, x, a, b, index, scale), slices = _llama_like(T=64, M=4)
    y = y0.clone()
    torch.ops.vllm_av.blend_(y, x, a, b, index, scale, ACTIVE, slices)  # warm-up / compile
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        torch.ops.vllm_av.blend_(y, x, a, b, index, scale, ACTIVE, slices)
    torch.cuda.current_stream().wait_stream(stream)
    for trial in range(3):
        gen = torch.Generator().manual_seed(100 + trial)
        index.copy_(torch.randint(-1, 8, index.shape, generator=gen, dtype=torch.int32))
        scale.copy_(torch.randn(scale.shape, generator=gen))
        y.copy_(y0)
        graph.replay()
        expected = y0.clone()
        ops.blend_reference(expected, x, a, b, index, scale, slices)
        _assert_close_bf16(y, expected)
