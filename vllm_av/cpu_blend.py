"""The AV blend of one CPU layer: the dense math of :func:`vllm_av.ops.blend_scaled_ranks`, run
with vLLM-CPU's prepacked oneDNN GEMMs where the build has them.

On this project's CPU at one thread (what vLLM gives the worker on 2 cores), one tiny decoder
layer's blend takes 122 us with oneDNN against 166 us with aten at 64 tokens, and 1112 against
2305 us at 1024 tokens (``benchmarks/cpu_blend_bench.py``, ``benchmarks/RESULTS.md``). Without
oneDNN (other vLLM builds) it runs the aten form.
"""

from __future__ import annotations

import torch

from vllm_av.ops import blend_scaled_ranks, dense_weights


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


class CPUBlend:
    """``y += ((x @ A_cat.T) * coef_rank) @ B_cat`` for one layer, weights laid out once at load."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, out_slices: list[int], use_onednn: bool = True):
        a_cat, b_cat = dense_weights(lora_a, lora_b, out_slices)
        self.ops = _onednn() if use_onednn else None
        if self.ops is None:
            self.a_cat, self.b_cat = a_cat, b_cat
        else:  # oneDNN packs its own copy; the handlers take [K, N]
            self.shrink = self.ops.create_onednn_mm(a_cat.t(), 32)
            self.expand = self.ops.create_onednn_mm(b_cat, 32)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, coef_rank: torch.Tensor) -> None:
        """Add the blend for ``coef_rank [T, N*R]`` (see :class:`vllm_av.worker.AVTables`) to ``y``."""
        if self.ops is None:
            blend_scaled_ranks(y, x, self.a_cat, self.b_cat, coef_rank)
            return
        if y.shape[0] == 0:
            return
        h = self.ops.onednn_mm(self.shrink, x.to(torch.float32), None)
        h.view(h.shape[0], -1, coef_rank.shape[1]).mul_(coef_rank.unsqueeze(1))
        delta = self.ops.onednn_mm(self.expand, h, None)
        if y.dtype == torch.float32:
            y.add_(delta)
        else:  # accumulate in float32, round once (as the op does)
            y.copy_(y.to(torch.float32).add_(delta).to(y.dtype))
