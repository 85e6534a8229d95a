"""The AV blend as a registered torch custom op: ``torch.ops.vllm_av.blend_``.

For token rows ``t`` and mix entries ``m`` (``av_index[t, m] = -1`` means unused)::

    y[t, slice_k] += sum_m av_scale[t, m] * B[i, slice_k] @ (A[k, i] @ x[t]),   i = av_index[t, m]

Tensor layout (shared by every implementation):

* ``y``         ``[T, sum(out_slices)]``, updated in place (row stride may exceed the width)
* ``x``         ``[T, in]``
* ``lora_a``    ``[S, N, R, in]``  -- one A per slice ``k`` and library entry ``i``
* ``lora_b``    ``[N, sum(out_slices), R]`` -- the slices' B stacked along the output dim (any
  strides with unit stride along R)
* ``av_index``  ``int32 [T, M]``
* ``av_scale``  ``float32 [T, M]``
* ``step_active`` ``int32 [1]``: 0 when the step holds no mix at all; then the op adds nothing,
  whatever the tables hold (the Triton kernel returns without reading them)
* ``out_slices`` the output width of each of the ``S`` slices

AVs of a smaller rank are zero-padded to ``R``. Accumulation is in float32.

Implementations: :func:`blend_reference` (pure torch, dense, no data-dependent shapes; the
oracle), its pre-laid-out form :func:`blend_scaled_ranks` (weights from :func:`dense_weights`;
what the dense CPU blend runs, :mod:`vllm_av.serving.blend.dense`) and the fused Triton kernel in
:mod:`vllm_av.kernels`. The op runs the implementation its backend installed for the device type
(:func:`set_implementation`: :mod:`vllm_av.serving.blend.triton`, :mod:`vllm_av.serving.blend.reference`),
the reference where none did. :class:`OpLayerBlend` is a layer's AV weights for the op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def mix_coefficients(av_index: torch.Tensor, av_scale: torch.Tensor, num_avs: int) -> torch.Tensor:
    """``coef[t, n]``: the sum of the scales row ``t`` gives library entry ``n`` (float32 ``[T, N]``).

    Never indexes with -1: unused entries add 0 to entry 0.
    """
    valid = av_index >= 0
    coef = torch.zeros(av_index.shape[0], num_avs, dtype=torch.float32, device=av_index.device)
    return coef.scatter_add_(1, torch.where(valid, av_index, 0).long(), torch.where(valid, av_scale, 0.0))


def dense_weights(lora_a: torch.Tensor, lora_b: torch.Tensor, out_slices: list[int]):
    """The op's weights in the dense CPU form: ``(a_cat, b_cat)``, float32 and contiguous.

    ``a_cat [S*N*R, in]`` stacks every slice's A of every AV; ``b_cat [S*N*R, OUT]`` is the
    slices' B transposed, block-diagonal (slice ``k``'s ranks only feed slice ``k``'s outputs),
    so a linear's whole blend is two GEMMs and one scaling, however many slices it has.
    """
    num_slices, num_avs, rank, d_in = lora_a.shape
    a_cat = lora_a.reshape(num_slices * num_avs * rank, d_in).to(torch.float32).contiguous()
    b_cat = torch.zeros(num_slices, num_avs * rank, sum(out_slices), dtype=torch.float32, device=lora_b.device)
    offset = 0
    for k, width in enumerate(out_slices):
        b_k = lora_b[:, offset : offset + width].permute(1, 0, 2).reshape(width, num_avs * rank)
        b_cat[k, :, offset : offset + width] = b_k.t()
        offset += width
    return a_cat, b_cat.reshape(num_slices * num_avs * rank, -1)


def blend_scaled_ranks(
    y: torch.Tensor, x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, coef: torch.Tensor, rank: int
) -> None:
    """``y += ((x @ a_cat.T) * coef) @ b_cat``: every AV for every row, weighted per row.

    Weights as :func:`dense_weights` returns them (``rank`` ranks per AV); ``coef [T, N]``
    (:func:`mix_coefficients`) weights all ranks of AV ``n``, in every slice, alike. Three ops
    per linear whatever the batch holds (no data-dependent shapes); accumulates in float32,
    rounds once.
    """
    rows = y.shape[0]
    if rows == 0:
        return
    h = torch.mm(x.to(torch.float32), a_cat.t())
    scale_ranks(h, coef, rank)
    if y.dtype == torch.float32:
        y.addmm_(h, b_cat)
    else:
        y.copy_(torch.addmm(y.to(torch.float32), h, b_cat).to(y.dtype))


def add_rounded_once(y: torch.Tensor, delta: torch.Tensor) -> None:
    """``y += delta`` (float32) summed in float32 and rounded once to ``y``'s dtype (as the op does)."""
    if y.dtype == torch.float32:
        y.add_(delta)
    else:
        y.copy_(y.to(torch.float32).add_(delta).to(y.dtype))


def scale_ranks(h: torch.Tensor, coef: torch.Tensor, rank: int) -> None:
    """Scale ``h [T, S*N*rank]`` (columns by slice, AV, rank) by ``coef [T, N]`` in place (a broadcast)."""
    rows, num_avs = coef.shape
    h.view(rows, -1, num_avs, rank).mul_(coef.view(rows, 1, num_avs, 1))


def blend_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    av_index: torch.Tensor,
    av_scale: torch.Tensor,
    out_slices: list[int],
    step_active: torch.Tensor | None = None,
) -> None:
    """The op in plain torch (the oracle): dense over the library, weighted by each row's coefficients.

    ``step_active`` (int32 ``[1]``, optional): 0 zeroes every coefficient (no host sync).
    """
    coef = mix_coefficients(av_index, av_scale, lora_a.shape[1])
    if step_active is not None:
        coef.mul_(step_active.to(coef.dtype))
    a_cat, b_cat = dense_weights(lora_a, lora_b, out_slices)
    blend_scaled_ranks(y, x, a_cat, b_cat, coef, lora_a.shape[2])


def _check_shapes(y, x, lora_a, lora_b, av_index, av_scale, step_active, out_slices) -> None:
    num_slices, num_avs, rank, d_in = lora_a.shape
    if len(out_slices) != num_slices:
        raise ValueError(f"out_slices has {len(out_slices)} entries, lora_a has {num_slices} slices")
    if tuple(lora_b.shape) != (num_avs, sum(out_slices), rank):
        raise ValueError(f"lora_b shape {tuple(lora_b.shape)} != {(num_avs, sum(out_slices), rank)}")
    if x.shape[-1] != d_in or y.shape[-1] != sum(out_slices) or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not fit lora_a/lora_b")
    if av_index.shape != av_scale.shape or av_index.shape[0] != y.shape[0]:
        raise ValueError(f"av_index {tuple(av_index.shape)} / av_scale {tuple(av_scale.shape)} do not fit T={y.shape[0]}")
    if step_active.shape != (1,) or step_active.dtype != torch.int32:
        raise ValueError(f"step_active must be int32 [1], got {step_active.dtype} {tuple(step_active.shape)}")


_implementations: dict[str, Callable] = {}  # device type -> what the op runs there (default: the reference)


def set_implementation(device_type: str, implementation: Callable | None) -> None:
    """Make the op run ``implementation`` (the op's signature; None: the reference) on ``device_type``
    (a backend's choice)."""
    if implementation is None:
        _implementations.pop(device_type, None)
    else:
        _implementations[device_type] = implementation


@torch.library.custom_op("vllm_av::blend_", mutates_args=("y",))
def blend_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    av_index: torch.Tensor,
    av_scale: torch.Tensor,
    step_active: torch.Tensor,
    out_slices: list[int],
) -> None:
    """``y += blend(x)`` in place; see the module docstring for the layout."""
    _check_shapes(y, x, lora_a, lora_b, av_index, av_scale, step_active, out_slices)
    implementation = _implementations.get(y.device.type)
    if implementation is None:
        blend_reference(y, x, lora_a, lora_b, av_index, av_scale, out_slices, step_active)
    else:
        implementation(y, x, lora_a, lora_b, av_index, av_scale, step_active, out_slices)


@blend_.register_fake
def _(y, x, lora_a, lora_b, av_index, av_scale, step_active, out_slices) -> None:
    return None


class OpLayerBlend:
    """One layer's AV weights for the op: ``lora_a [S, N, R, in]``, ``lora_b [N, OUT, R]``, fixed addresses
    (compiled graphs and CUDA graphs keep reading the same buffers)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, out_slices: list[int]):
        self.lora_a, self.lora_b, self.out_slices = lora_a, lora_b, list(out_slices)
        self.rank = lora_a.shape[2]

    def from_tables(self, y: torch.Tensor, x: torch.Tensor, tables) -> None:
        rows = y.shape[0]
        torch.ops.vllm_av.blend_(y, x, self.lora_a, self.lora_b, tables.index[:rows], tables.scale[:rows],
                                 tables.step_active, self.out_slices)

    def write_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> None:
        self.lora_a[:, slot].copy_(lora_a)
        self.lora_b[slot].copy_(lora_b)
