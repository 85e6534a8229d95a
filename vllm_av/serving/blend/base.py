"""What every blend backend provides: the table form its layers read, how a layer holds its AV
weights, and the per-step call. One class per implementation (:mod:`.triton`, :mod:`.reference`,
:mod:`.native`, :mod:`.dense`); :func:`vllm_av.serving.blend.select.select_backend` picks one per worker.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

ENTRIES = "entries"  # per-token [T, M] AV index and scale tables, and the step_active flag
COEFFICIENTS = "coefficients"  # per-token [T, N] sums of each AV's scales


class LayerBlend(Protocol):
    """One layer's AV weights, laid out for its backend."""

    rank: int  # the rank of every AV slot

    def from_tables(self, y: torch.Tensor, x: torch.Tensor, tables) -> None:
        """``y += blend(x)`` for the step the ``tables`` hold (their first ``len(y)`` rows)."""

    def write_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> None:
        """Replace AV ``slot``'s weights in place (``lora_a [S, R, in]``, ``lora_b [OUT, R]``; rank 0: empty)."""


class BlendBackend(ABC):
    """How the AV layers of one engine blend.

    ``name``: what the start logs (``blend implementation: ...``); ``table_form``: :data:`ENTRIES`
    or :data:`COEFFICIENTS`; ``every_step``: the layers call the blend on every forward, whatever
    the step holds (the op inside compiled graphs and CUDA graphs), else they skip steps without
    mixes (CPU layers, which vLLM never compiles or captures with LoRA on).
    """

    name: str
    table_form: str
    every_step: bool

    def reserve(self, max_tokens: int, max_slices: int, num_avs: int, rank: int) -> None:
        """Allocate any scratch for calls of up to ``max_tokens`` rows now, before graph capture (default: none)."""

    @abstractmethod
    def layer(self, lora_a: torch.Tensor, lora_b: torch.Tensor, out_slices: list[int], ranks: list[int]) -> LayerBlend:
        """Lay out one layer's AV weights (``lora_a [S, N, R, in]``, ``lora_b [N, OUT, R]``; ``ranks[n]``:
        AV ``n``'s rank in this layer, 0 where it does not touch it)."""
