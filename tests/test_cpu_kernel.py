"""The C blend kernel (vllm_av/kernels/cpu_blend.c) against the float64 loop oracle, and its build."""

import logging

import pytest
import torch

from tests.test_ops_reference import loop_oracle
from vllm_av.serving.blend.dense import DenseBlend
from vllm_av.serving.blend.native import NativeBlend, NativeCPUBlend
from vllm_av.serving.blend.select import select_backend

CPU = torch.device("cpu")
from vllm_av.kernels import cpu


@pytest.fixture(scope="module")
def kernel():
    fn = cpu.load()
    assert fn is not None, "the C blend kernel must build on the CI machine (cc is part of its setup)"
    return fn


def random_case(gen, rows, d_in, out_slices, num_avs, max_rank, m, dtype):
    """Inputs with per-AV ranks (garbage in the padding rows the kernel must skip) and edge entries."""
    ranks = torch.randint(1, max_rank + 1, (num_avs,), generator=gen).tolist()
    ranks[0] = max_rank
    ranks[-1] = 0  # an AV without weights on this layer
    a = torch.randn(len(out_slices), num_avs, max_rank, d_in, generator=gen)
    b = torch.randn(num_avs, sum(out_slices), max_rank, generator=gen)
    a_true, b_true = a.clone(), b.clone()
    for n, r in enumerate(ranks):
        a_true[:, n, r:] = 0
        b_true[n, :, r:] = 0
    idx = torch.randint(-1, num_avs, (rows, m), generator=gen, dtype=torch.int32)
    scale = torch.randn(rows, m, generator=gen) * 2
    if rows > 3:
        idx[3] = -1  # a row with no entries
        scale[2, 0] = 0.0  # a zero scale
        idx[1, :2] = 0  # the same AV twice in one row
    x = torch.randn(rows, d_in, generator=gen).to(dtype)
    y = torch.randn(rows, sum(out_slices), generator=gen).to(dtype)
    return x, y, a.to(dtype), b.to(dtype), a_true.to(dtype), b_true.to(dtype), idx, scale, ranks


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("out_slices", [[37], [24, 11], [16, 8, 9], [64, 64]])
@pytest.mark.parametrize("rows, d_in, max_rank, m", [(1, 8, 1, 1), (13, 21, 6, 3), (64, 67, 16, 8), (5, 256, 64, 4)])
def test_kernel_matches_float64(kernel, dtype, tol, out_slices, rows, d_in, max_rank, m):
    gen = torch.Generator().manual_seed(rows * 1000 + d_in + len(out_slices) + int(dtype.itemsize))
    num_avs = 5
    x, y, a, b, a_true, b_true, idx, scale, ranks = random_case(gen, rows, d_in, out_slices, num_avs, max_rank, m, dtype)
    want = loop_oracle(y, x, a_true, b_true, idx, scale, out_slices)
    before = y.clone()
    NativeCPUBlend(kernel, a, b, out_slices, ranks)(y, x, idx, scale)
    untouched = [t for t in range(rows) if not ((idx[t] >= 0) & (scale[t] != 0) & (idx[t] < num_avs - 1)).any()]
    for t in untouched:  # only -1, zero scales, or the rank-0 AV
        assert torch.equal(y[t], before[t]), f"row {t} has no usable entry and must be untouched"
    assert (y.double() - want).norm() / want.norm() < tol


@pytest.mark.parametrize("lanes", [4, 8, 16])
@pytest.mark.parametrize("shuffles", [True, False], ids=["shuffle_sums", "scalar_sums"])
def test_every_vector_width_matches_float64(lanes, shuffles):
    """The width this CPU does not pick (16 lanes with AVX-512, else 8) is built and checked too, as is
    the lane-sum path of compilers without ``__builtin_shufflevector``."""
    kernel = cpu.load((f"-DLANES={lanes}",) + (() if shuffles else ("-DAV_NO_SHUFFLE",)))
    assert kernel is not None
    for rows, d_in, out_slices, max_rank in [(13, 21, [16, 8, 9], 6), (40, 67, [64, 64], 16), (3, 256, [37], 64)]:
        gen = torch.Generator().manual_seed(lanes * 100 + rows)
        x, y, a, b, a_true, b_true, idx, scale, ranks = random_case(gen, rows, d_in, out_slices, 5, max_rank, 4, torch.float32)
        want = loop_oracle(y, x, a_true, b_true, idx, scale, out_slices)
        NativeCPUBlend(kernel, a, b, out_slices, ranks)(y, x, idx, scale)
        assert (y.double() - want).norm() / want.norm() < 1e-5


def test_bfloat16_layers_get_the_float32_sums_rounded_once(kernel):
    """bfloat16 x and y go through the kernel's own entry point: bit for bit the float32 kernel's sums,
    added to y in float32 and rounded once as torch rounds."""
    for rows, d_in, out_slices, max_rank in [(13, 21, [16, 8, 9], 6), (64, 128, [128, 64, 64], 4), (1, 256, [37], 16)]:
        gen = torch.Generator().manual_seed(rows + d_in)
        x, y, a, b, *_, idx, scale, ranks = random_case(gen, rows, d_in, out_slices, 5, max_rank, 4, torch.bfloat16)
        blend = NativeCPUBlend(kernel, a, b, out_slices, ranks)
        acc = torch.zeros(y.shape)
        blend(acc, x.float(), idx, scale)  # the float32 entry point
        used = ((idx >= 0) & (idx < 4) & (scale != 0)).any(dim=1, keepdim=True)  # AV 4 has rank 0
        want = torch.where(used, (y.float() + acc).to(torch.bfloat16), y)
        blend(y, x, idx, scale)
        assert torch.equal(y, want)


def test_bfloat16_rounds_ties_to_even_and_keeps_nan(kernel):
    """y = 1 plus exact float32 blends that land halfway between bfloat16 neighbours (ulp 2**-7 above 1,
    2**-8 below): ties go to the even neighbour."""
    steps = [1, 3, 5, 0.5, -0.5, -1.5, float("nan")]
    b = torch.tensor(steps).mul(2.0**-8).view(1, len(steps), 1)  # one AV of rank 1: y[o] += b[o] * (a . x)
    blend = NativeCPUBlend(kernel, torch.ones(1, 1, 1, 1), b, [len(steps)], [1])
    y = torch.ones(1, len(steps), dtype=torch.bfloat16)
    blend(y, torch.ones(1, 1, dtype=torch.bfloat16), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1))
    want = (torch.ones(len(steps)) + b.view(-1)).to(torch.bfloat16)
    assert y[0, :-1].tolist() == want[:-1].tolist() == [1.0, 1.015625, 1.015625, 1.0, 1.0, 0.9921875]
    assert y[0, -1].isnan()


def test_kernel_reads_strided_input(kernel):
    gen = torch.Generator().manual_seed(3)
    x, y, a, b, a_true, b_true, idx, scale, ranks = random_case(gen, 9, 40, [16, 16], 4, 4, 2, torch.float32)
    wide = torch.randn(9, 80, generator=gen)
    wide[:, ::2] = x  # x as a view with an inner stride of 2
    want = loop_oracle(y, x, a_true, b_true, idx, scale, [16, 16])
    NativeCPUBlend(kernel, a, b, [16, 16], ranks)(y, wide[:, ::2], idx, scale)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_tables_it_cannot_read(kernel):
    blend = NativeCPUBlend(kernel, torch.zeros(1, 2, 2, 8), torch.zeros(2, 4, 2), [4], [2, 2])
    y, x = torch.zeros(3, 4), torch.zeros(3, 8)
    with pytest.raises(ValueError, match="contiguous int32 index"):
        blend(y, x, torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="contiguous int32 index"):
        blend(y, x, torch.zeros(2, 3, dtype=torch.int32).t(), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="contiguous int32 index"):
        blend(y, x, torch.zeros(4, 2, dtype=torch.int32), torch.zeros(4, 2))


def test_build_is_cached_per_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_AV_CACHE_DIR", str(tmp_path))
    cpu.load.cache_clear()
    try:
        assert cpu.load() is not None
        built = list(tmp_path.glob("cpu_blend-*.so"))
        assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))
        stamp = built[0].stat().st_mtime_ns
        cpu.load.cache_clear()
        assert cpu.load() is not None
        assert built[0].stat().st_mtime_ns == stamp, "a cached build must be reused"
    finally:
        cpu.load.cache_clear()


def test_without_a_compiler_auto_falls_back_to_dense_and_native_refuses(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("VLLM_AV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.av"):
            assert isinstance(select_backend(CPU, "auto"), DenseBlend)
        assert "no C compiler" in caplog.text
        with pytest.raises(RuntimeError, match="'native' but the C blend kernel could not be built"):
            select_backend(CPU, "native")
        assert isinstance(select_backend(CPU, "dense"), DenseBlend)
    finally:
        cpu.load.cache_clear()


def test_a_failing_compile_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo fake-cc && exit 0\necho 'boom: bad flags' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VLLM_AV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    cpu.load.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="vllm.av"):
            assert cpu.load() is None
        assert "boom: bad flags" in caplog.text
        assert not list((tmp_path / "cache").glob("*")), "a failed build leaves nothing behind"
    finally:
        cpu.load.cache_clear()


def test_auto_uses_the_kernel_whenever_it_builds():
    kernel = cpu.load()
    assert kernel is not None
    for choice in ("auto", "native"):
        backend = select_backend(CPU, choice)
        assert isinstance(backend, NativeBlend) and backend.kernel == kernel
    assert isinstance(select_backend(CPU, "dense"), DenseBlend)


@pytest.mark.parametrize("rows", [37, 517])  # a decode-sized batch (two chunks, uneven); many chunks
def test_calls_split_rows_over_threads_and_match_one_thread(kernel, rows):
    """Rows split over torch's OpenMP threads give the sums of one thread."""
    gen = torch.Generator().manual_seed(21)
    x, y, a, b, a_true, b_true, idx, scale, ranks = random_case(gen, rows, 40, [24, 17], 6, 8, 4, torch.float32)
    idx[rows // 5 : rows // 2, 0] = 2  # long runs of one AV across the chunk borders
    blend = NativeCPUBlend(kernel, a, b, [24, 17], ranks)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = y.clone()
        blend(one, x, idx, scale)
        torch.set_num_threads(max(threads, 2))
        many = y.clone()
        blend(many, x, idx, scale)
    finally:
        torch.set_num_threads(threads)
    # Each row is one thread's, so there is no race; rows pair up differently at chunk borders,
    # which moves float32 rounding only (a lost or doubled update would be off by whole terms).
    assert torch.allclose(one, many, rtol=1e-6, atol=1e-5)
    want = loop_oracle(y, x, a_true, b_true, idx, scale, [24, 17])
    assert (many.double() - want).norm() / want.norm() < 1e-5
