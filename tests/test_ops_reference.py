"""The torch reference blend (the CPU implementation and the oracle of the Triton kernel) vs float64 loops."""

import pytest
import torch

import vllm_av.serving.blend.op  # noqa: F401  (registers torch.ops.vllm_av.blend_)
from vllm_av.serving.blend.op import blend_reference

ACTIVE = torch.ones(1, dtype=torch.int32)


def loop_oracle(y, x, a, b, idx, scale, out_slices):
    out = y.double().clone()
    offset = 0
    for k, width in enumerate(out_slices):
        for t in range(y.shape[0]):
            for m in range(idx.shape[1]):
                i = int(idx[t, m])
                if i >= 0:
                    h = a[k, i].double() @ x[t].double()
                    out[t, offset : offset + width] += float(scale[t, m]) * (b[i, offset : offset + width].double() @ h)
        offset += width
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("b_layout", ["n_out_r", "out_n_r"])
@pytest.mark.parametrize("out_slices", [[37], [24, 11], [16, 8, 8]])
def test_reference_matches_float64(dtype, tol, b_layout, out_slices):
    gen = torch.Generator().manual_seed(hash((str(dtype), b_layout, len(out_slices))) % 2**31)
    rows, d_in, num_avs, rank, m = 9, 21, 5, 6, 3
    out = sum(out_slices)
    x = torch.randn(rows, d_in, generator=gen).to(dtype)
    a = torch.randn(len(out_slices), num_avs, rank, d_in, generator=gen).to(dtype)
    b = torch.randn(num_avs, out, rank, generator=gen).to(dtype)
    if b_layout == "out_n_r":
        b = b.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    idx = torch.randint(-1, num_avs, (rows, m), generator=gen, dtype=torch.int32)
    idx[4] = -1  # a row with no entries
    scale = torch.randn(rows, m, generator=gen) * 2
    scale[2, 0] = 0.0
    y = torch.randn(rows, out, generator=gen).to(dtype)
    want = loop_oracle(y, x, a, b, idx, scale, out_slices)
    before = y.clone()
    torch.ops.vllm_av.blend_(y, x, a, b, idx, scale, ACTIVE, out_slices)
    assert torch.equal(y[4], before[4]), "a row without entries must be untouched"
    err = (y.double() - want).norm() / want.norm()
    assert err < tol


def test_shape_errors_name_the_mismatch():
    x, y = torch.zeros(2, 8), torch.zeros(2, 6)
    a, b = torch.zeros(2, 3, 4, 8), torch.zeros(3, 6, 4)
    idx, scale = torch.zeros(2, 1, dtype=torch.int32), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="out_slices has 1 entries, lora_a has 2 slices"):
        torch.ops.vllm_av.blend_(y, x, a, b, idx, scale, ACTIVE, [6])
    with pytest.raises(ValueError, match="do not fit T=2"):
        torch.ops.vllm_av.blend_(y, x, a, b, idx[:1], scale[:1], ACTIVE, [3, 3])
    with pytest.raises(ValueError, match="step_active must be int32"):
        torch.ops.vllm_av.blend_(y, x, a, b, idx, scale, ACTIVE.float(), [3, 3])
    blend_reference(y, x, a, b, idx, scale, [3, 3])  # shapes fit: runs


def test_inactive_step_adds_nothing_whatever_the_tables_hold():
    """step_active = 0 (the step holds no mix): the op leaves y alone even where stale entries remain."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 6, generator=gen)
    a, b = torch.randn(1, 3, 2, 8, generator=gen), torch.randn(3, 6, 2, generator=gen)
    idx, scale = torch.tensor([[0], [1], [2], [0]], dtype=torch.int32), torch.ones(4, 1)
    before = y.clone()
    torch.ops.vllm_av.blend_(y, x, a, b, idx, scale, torch.zeros(1, dtype=torch.int32), [6])
    assert torch.equal(y, before)
    torch.ops.vllm_av.blend_(y, x, a, b, idx, scale, ACTIVE, [6])
    assert not torch.equal(y, before)
