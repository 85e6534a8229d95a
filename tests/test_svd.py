"""Truncated SVD into LoRA factors: exactness, Eckart–Young optimality, energy mode, randomized bound."""

import pytest
import torch

from vllm_av.offline import svd

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def matrix_with_spectrum(out_dim, in_dim, s, seed=0):
    """``U·diag(s)·Vᵀ`` with random orthonormal U, V (float32)."""
    gen = torch.Generator().manual_seed(seed)
    k = len(s)
    U = torch.linalg.qr(torch.randn(out_dim, k, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_dim, k, generator=gen, dtype=torch.float64)).Q
    return ((U * torch.as_tensor(s, dtype=torch.float64)) @ V.T).float()


def test_full_rank_reproduces_delta_to_float32_precision():
    delta = torch.randn(96, 64, generator=torch.Generator().manual_seed(0))
    lr = svd.compress(delta, rank=64)
    assert (lr.B.shape, lr.A.shape) == ((96, 64), (64, 64))
    assert lr.rel_error < 2e-6
    assert torch.allclose(lr.B @ lr.A, delta, atol=1e-5, rtol=0)
    assert lr.retained_energy == pytest.approx(1.0, abs=1e-6)


def test_energy_one_is_full_reconstruction():
    delta = torch.randn(40, 70, generator=torch.Generator().manual_seed(2))
    lr = svd.compress(delta, energy=1.0)
    assert lr.rank >= 39 and lr.rel_error < 2e-6


def test_factors_are_balanced_square_roots():
    delta = matrix_with_spectrum(40, 30, [9.0, 4.0, 1.0])
    lr = svd.compress(delta, rank=3)
    # B = U·√S, A = √S·Vᵀ: the column norms of B and row norms of A are both √S.
    assert torch.allclose(lr.B.norm(dim=0), torch.tensor([3.0, 2.0, 1.0]), atol=1e-5)
    assert torch.allclose(lr.A.norm(dim=1), torch.tensor([3.0, 2.0, 1.0]), atol=1e-5)


@pytest.mark.parametrize("rank", [1, 5, 17])
def test_truncated_rank_reaches_eckart_young(rank):
    delta = torch.randn(80, 50, generator=torch.Generator().manual_seed(1))
    S = torch.linalg.svdvals(delta.double())
    lr = svd.compress(delta, rank=rank)
    err2 = float((delta.double() - (lr.B @ lr.A).double()).square().sum())
    tail = float(S[rank:].square().sum())
    assert err2 == pytest.approx(tail, rel=1e-5)
    assert lr.rel_error**2 == pytest.approx(tail / float(S.square().sum()), rel=1e-5)
    assert lr.retained_energy == pytest.approx(float(S[:rank].square().sum() / S.square().sum()), rel=1e-5)


def test_energy_mode_picks_the_smallest_rank():
    s = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    energies = torch.tensor(s).square()
    cum = (energies.cumsum(0) / energies.sum()).tolist()
    delta = matrix_with_spectrum(50, 40, s)
    for r, fraction in enumerate(cum, start=1):
        # exactly at the threshold of rank r, and just above the threshold of rank r-1
        assert svd.compress(delta, energy=fraction - 1e-6).rank == r
        if r > 1:
            assert svd.compress(delta, energy=cum[r - 2] + 1e-4).rank == r
    lr = svd.compress(delta, energy=0.99)
    assert lr.retained_energy >= 0.99 and lr.rank == 4


def test_zero_delta_has_rank_zero():
    lr = svd.compress(torch.zeros(16, 8), energy=0.9)
    assert (lr.rank, lr.method, lr.B.shape, lr.A.shape) == (0, "zero", (16, 0), (0, 8))


def test_rank_larger_than_matrix_is_refused():
    with pytest.raises(ValueError, match="rank 9 outside"):
        svd.compress(torch.randn(8, 20), rank=9)


def _spectra(out_dim, in_dim):
    gen = torch.Generator().manual_seed(3)
    n = min(out_dim, in_dim)
    yield "flat", torch.randn(out_dim, in_dim, generator=gen)
    yield "power-law", matrix_with_spectrum(out_dim, in_dim, [i**-0.5 for i in range(1, n + 1)], seed=4)
    low = torch.randn(out_dim, 8, generator=gen) @ torch.randn(8, in_dim, generator=gen)
    yield "low-rank+noise", low + 0.05 * torch.randn(out_dim, in_dim, generator=gen)


@pytest.mark.parametrize("rank", [8, 64])
def test_randomized_within_stated_bound_of_exact(rank):
    """The stated error of the randomized path (svd.RANDOMIZED_ERROR_FACTOR) holds on all spectra."""
    for kind, delta in _spectra(600, 450):
        exact = svd.compress(delta, rank=rank, method="exact")
        rand = svd.compress(delta, rank=rank, method="randomized")
        assert rand.method == "randomized" and rand.rank == rank
        assert exact.rel_error <= rand.rel_error * (1 + 1e-5), kind  # Eckart–Young: exact is optimal
        assert rand.rel_error <= svd.RANDOMIZED_ERROR_FACTOR * exact.rel_error, kind
        # reported error is the measured one
        measured = float((delta.double() - (rand.B @ rand.A).double()).norm() / delta.double().norm())
        assert rand.rel_error == pytest.approx(measured, rel=1e-4)


def test_randomized_energy_mode_keeps_at_least_the_requested_energy():
    delta = matrix_with_spectrum(600, 450, [0.9**i for i in range(450)], seed=5)
    exact = svd.compress(delta, energy=0.95, method="exact")
    rand = svd.compress(delta, energy=0.95, method="randomized")
    assert rand.method == "randomized"
    assert rand.retained_energy >= 0.95 and rand.rank >= exact.rank
    assert rand.rank <= exact.rank + 1  # decaying spectrum: the sketch finds the same rank (±1)
    # energy needing a sketch of half the matrix or more falls back to exact SVD
    assert svd.compress(torch.randn(600, 450), energy=0.9, method="randomized").method == "exact"


def test_auto_picks_exact_for_small_and_randomized_for_big():
    assert svd.compress(torch.randn(64, svd.EXACT_MAX_DIM + 1), rank=2).method == "exact"
    big = torch.randn(svd.EXACT_MAX_DIM + 1, svd.EXACT_MAX_DIM + 1)
    assert svd.compress(big, rank=2).method == "randomized"
