"""The fused Triton blend kernel against a float64 reference.

Without a GPU the real kernel runs under ``TRITON_INTERPRET=1`` on CPU tensors; with one it
runs compiled on CUDA tensors.  Inputs are fresh random draws on every run (the seed is in the
failure message).  GPU-only checks (op dispatch, torch.compile, CUDA graphs) are marked ``gpu``.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must be set before triton.jit decorates the kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_av.kernels.blend import BlendConfig, blend_config, blend_triton  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
POISON = -12345.0


def make_problem(gen, T, d_in, out_slices, ranks, M, dtype, *, p_unused=0.25, p_zero=0.15):
    """Random library with mixed ranks (zero-padded to the max), entries with -1 / 0 / negative scales."""
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
    blend_triton(y, x, a, b, index, scale, out_slices, config=config)

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


def test_config_depends_on_shape_only():
    decode = blend_config(1, 4096, 3, 16, 4)
    prefill = blend_config(2048, 4096, 3, 16, 4)
    assert decode.block_t == 16 and decode.k_split > 1
    assert prefill.block_t == 64 and prefill.k_split == 1


def test_repeated_launches_reuse_the_sync_counter():
    """The in-launch barrier resets itself: back-to-back calls stay correct."""
    for _ in range(3):
        run_and_check(fresh_seed(), 3, 70, [12, 6], [5, 2], 2, torch.bfloat16)


def test_reserved_scratch_is_never_regrown():
    """After reserve_scratch for T rows, no call of up to T rows allocates (safe under graph capture)."""
    import vllm_av.kernels.blend as blend_mod

    blend_mod._counter_buffers.clear()
    blend_mod.reserve_scratch(DEVICE, 200, 2, 3)
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
    import vllm_av.kernels.blend as blend_mod
    from vllm_av.serving.blend import op as ops

    assert ops.cuda_impl_name() == "triton"
    calls = []
    monkeypatch.setattr(blend_mod, "blend_triton", lambda *a: (calls.append(1), blend_triton(*a))[1])
    (y, x, a, b, index, scale), slices = _llama_like()
    expected = y.clone()
    ops.blend_reference(expected, x, a, b, index, scale, slices)
    torch.ops.vllm_av.blend_(y, x, a, b, index, scale, slices)
    assert calls, "torch.ops.vllm_av.blend_ did not call blend_triton on CUDA"
    _assert_close_bf16(y, expected)


@gpu
@needs_cuda
def test_op_under_torch_compile_fullgraph():
    from vllm_av.serving.blend import op as ops  # noqa: F401  (registers the op)

    (y, x, a, b, index, scale), slices = _llama_like(T=24)
    expected = y.clone()
    blend_triton(expected, x, a, b, index, scale, slices)

    @torch.compile(fullgraph=True)
    def step(y, x, index, scale):
        torch.ops.vllm_av.blend_(y, x, a, b, index, scale, slices)
        return y * 1

    out = step(y, x, index, scale)
    _assert_close_bf16(out, expected)


@gpu
@needs_cuda
def test_cuda_graph_replay_follows_new_indices():
    """Capture once, then change av_index/av_scale in place: replays use the new data."""
    from vllm_av.serving.blend import op as ops

    (y0, x, a, b, index, scale), slices = _llama_like(T=64, M=4)
    y = y0.clone()
    torch.ops.vllm_av.blend_(y, x, a, b, index, scale, slices)  # warm-up / compile
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        torch.ops.vllm_av.blend_(y, x, a, b, index, scale, slices)
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
