"""The torch reference blend behind the op (dense over the library, the oracle's math), on any device."""

from __future__ import annotations

import torch

from vllm_av.serving.blend import op
from vllm_av.serving.blend.base import ENTRIES, BlendBackend


class ReferenceBlend(BlendBackend):
    name = "reference"
    table_form = ENTRIES
    every_step = True

    def __init__(self, device: torch.device):
        op.set_implementation(device.type, None)

    def layer(self, lora_a, lora_b, out_slices, ranks) -> op.OpLayerBlend:
        return op.OpLayerBlend(lora_a, lora_b, out_slices)
