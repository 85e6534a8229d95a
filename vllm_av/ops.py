"""The AV blend as a registered torch custom op: ``torch.ops.vllm_av.blend_``.

For token rows ``t`` and mix entries ``m`` (``av_index[t, m] = -1`` means unused)::

    y[t, slice_k] += sum_m av_scale[t, m] * B[i, slice_k] @ (A[k, i] @ x[t]),   i = av_index[t, m]

Tensor layout (shared by every implementation):

* ``y``         ``[T, sum(out_slices)]``, updated in place (row stride may exceed the width)
* ``x``         ``[T, in]``
* ``lora_a``    ``[S, N, R, in]``  -- one A per slice ``k`` and library entry ``i``
* ``lora_b``    ``[N, sum(out_slices), R]`` -- the slices' B stacked along the output dim (any
  strides with unit stride along R; the plugin stores it physically as ``[OUT, N, R]`` on CPU)
* ``av_index``  ``int32 [T, M]``
* ``av_scale``  ``float32 [T, M]``
* ``out_slices`` the output width of each of the ``S`` slices

AVs of a smaller rank are zero-padded to ``R``. Accumulation is in float32.

Implementations: :func:`blend_reference` (pure torch, dense, no data-dependent shapes; used on
CPU and as the oracle) and the fused Triton kernel in :mod:`vllm_av.kernels` on CUDA. Which one
runs on CUDA is chosen once by :func:`cuda_impl_name` and logged.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("vllm.av")

IMPL_ENV = "VLLM_AV_BLEND_IMPL"  # auto | triton | reference


def mix_coefficients(av_index: torch.Tensor, av_scale: torch.Tensor, num_avs: int) -> torch.Tensor:
    """``coef[t, n]``: the sum of the scales row ``t`` gives library entry ``n`` (float32 ``[T, N]``).

    Never indexes with -1: unused entries add 0 to entry 0.
    """
    valid = av_index >= 0
    coef = torch.zeros(av_index.shape[0], num_avs, dtype=torch.float32, device=av_index.device)
    return coef.scatter_add_(1, torch.where(valid, av_index, 0).long(), torch.where(valid, av_scale, 0.0))


def blend_dense(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    coef: torch.Tensor,
    out_slices: list[int],
) -> None:
    """``y += sum_n coef[:, n] * B_n (A_n x)``: every AV for every row, weighted by ``coef [T, N]``.

    A handful of ops whatever the batch holds (no data-dependent shapes). Fastest when ``lora_b``
    is physically ``[OUT, N, R]`` (a permuted view), so each slice of B is a free reshape.
    """
    num_slices, num_avs, rank, d_in = lora_a.shape
    rows = y.shape[0]
    if rows == 0:
        return
    a_all = lora_a.reshape(num_slices * num_avs * rank, d_in).to(torch.float32)
    h = (x.to(torch.float32) @ a_all.t()).view(rows, num_slices, num_avs, rank) * coef.view(rows, 1, num_avs, 1)
    b_by_out = lora_b.permute(1, 0, 2)  # [OUT, N, R]
    offset = 0
    for k, width in enumerate(out_slices):
        b_k = b_by_out[offset : offset + width].reshape(width, num_avs * rank).to(torch.float32)
        delta = h[:, k].reshape(rows, num_avs * rank) @ b_k.t()
        y_k = y[:, offset : offset + width]
        if y.dtype == torch.float32:
            y_k.add_(delta)
        else:  # accumulate in float32, round once (as the kernel does)
            y_k.copy_((y_k.to(torch.float32) + delta).to(y.dtype))
        offset += width


def blend_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    av_index: torch.Tensor,
    av_scale: torch.Tensor,
    out_slices: list[int],
) -> None:
    """The op in plain torch (the oracle, and the implementation on CPU): dense over the library."""
    blend_dense(y, x, lora_a, lora_b, mix_coefficients(av_index, av_scale, lora_a.shape[1]), out_slices)


def _check_shapes(y, x, lora_a, lora_b, av_index, av_scale, out_slices) -> None:
    num_slices, num_avs, rank, d_in = lora_a.shape
    if len(out_slices) != num_slices:
        raise ValueError(f"out_slices has {len(out_slices)} entries, lora_a has {num_slices} slices")
    if tuple(lora_b.shape) != (num_avs, sum(out_slices), rank):
        raise ValueError(f"lora_b shape {tuple(lora_b.shape)} != {(num_avs, sum(out_slices), rank)}")
    if x.shape[-1] != d_in or y.shape[-1] != sum(out_slices) or x.shape[0] != y.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not fit lora_a/lora_b")
    if av_index.shape != av_scale.shape or av_index.shape[0] != y.shape[0]:
        raise ValueError(f"av_index {tuple(av_index.shape)} / av_scale {tuple(av_scale.shape)} do not fit T={y.shape[0]}")


@torch.library.custom_op("vllm_av::blend_", mutates_args=("y",))
def blend_(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    av_index: torch.Tensor,
    av_scale: torch.Tensor,
    out_slices: list[int],
) -> None:
    """``y += blend(x)`` in place; see the module docstring for the layout."""
    _check_shapes(y, x, lora_a, lora_b, av_index, av_scale, out_slices)
    blend_reference(y, x, lora_a, lora_b, av_index, av_scale, out_slices)


@blend_.register_fake
def _(y, x, lora_a, lora_b, av_index, av_scale, out_slices) -> None:
    return None


_cuda_impl: str | None = None


def cuda_impl_name() -> str:
    """The implementation used on CUDA: ``triton`` if it imports, else ``reference``.

    ``VLLM_AV_BLEND_IMPL=reference|triton`` forces one. The choice is logged once.
    """
    global _cuda_impl
    if _cuda_impl is None:
        wanted = os.environ.get(IMPL_ENV, "auto").lower()
        if wanted not in ("auto", "triton", "reference"):
            raise ValueError(f"{IMPL_ENV}={wanted!r}: expected auto, triton or reference")
        if wanted == "reference":
            _cuda_impl = "reference"
        else:
            try:
                from vllm_av.kernels import blend as _  # noqa: F401

                _cuda_impl = "triton"
            except ImportError as exc:
                if wanted == "triton":
                    raise
                logger.warning("vllm-av: Triton blend kernel unavailable (%s); using the torch reference", exc)
                _cuda_impl = "reference"
        logger.info("vllm-av: blend implementation on CUDA: %s", _cuda_impl)
    return _cuda_impl


@blend_.register_kernel("cuda")
def _(y, x, lora_a, lora_b, av_index, av_scale, out_slices) -> None:
    _check_shapes(y, x, lora_a, lora_b, av_index, av_scale, out_slices)
    if cuda_impl_name() == "triton":
        from vllm_av.kernels.blend import blend_triton

        blend_triton(y, x, lora_a, lora_b, av_index, av_scale, out_slices)
    else:
        blend_reference(y, x, lora_a, lora_b, av_index, av_scale, out_slices)
