"""The Triton blend: ``torch.ops.vllm_av.blend_`` runs the fused kernel of :mod:`vllm_av.kernels.blend`.

On CUDA it is the default. On CPU it runs in Triton's interpreter (``TRITON_INTERPRET=1``): the GPU
code path, op, ``[T, M]`` tables and kernel, as CI runs it.
"""

from __future__ import annotations

import os

import torch

from vllm_av.serving.blend import op
from vllm_av.serving.blend.base import ENTRIES, BlendBackend


def kernel_available() -> bool:
    """Whether the Triton kernel imports here."""
    try:
        from vllm_av.kernels import blend  # noqa: F401
    except ImportError:
        return False
    return True


class TritonBlend(BlendBackend):
    name = "triton"
    table_form = ENTRIES
    every_step = True

    def __init__(self, device: torch.device):
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"vllm-av: the Triton blend on {device.type} runs in Triton's interpreter: "
                             "set TRITON_INTERPRET=1 too")
        from vllm_av.kernels.blend import blend_triton

        self.device = device
        op.set_implementation(device.type, blend_triton)

    def reserve(self, max_tokens: int, max_slices: int, num_avs: int, rank: int) -> None:
        """Size the kernel's scratch now for calls of up to ``max_tokens`` rows: nothing may allocate in a
        CUDA-graph capture."""
        from vllm_av.kernels.blend import reserve_scratch

        reserve_scratch(self.device, max_tokens, max_slices, num_avs, rank)

    def layer(self, lora_a, lora_b, out_slices, ranks) -> op.OpLayerBlend:
        return op.OpLayerBlend(lora_a, lora_b, out_slices)
