"""The C CPU blend: the kernel of :mod:`vllm_av.kernels.cpu`, whose work grows with the entries each row
uses, not with the library size; large calls split their rows over torch's threads. It reads the
op form's ``[T, M]`` index/scale tables. Per-layer timings: ``benchmarks/cpu_blend_bench.py``.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from vllm_av.serving.blend.base import ENTRIES, BlendBackend
from vllm_av.serving.blend.op import add_rounded_once


class NativeBlend(BlendBackend):
    name = "C kernel (CPU)"
    table_form = ENTRIES
    every_step = False

    def __init__(self, kernel):
        self.kernel = kernel  # vllm_av.kernels.cpu.load()'s entry points

    def layer(self, lora_a, lora_b, out_slices, ranks) -> NativeCPUBlend:
        return NativeCPUBlend(self.kernel, lora_a, lora_b, out_slices, ranks)


class NativeCPUBlend:
    """``y[t] += sum_m scale[t,m] * B_i A_i x[t]`` (``i = index[t,m]``) for one layer, by the C kernel.

    ``ranks[n]``: rows of AV ``n``'s A/B that are not padding (0 where the AV skips this layer).
    Accumulates in float32. float32 and bfloat16 layers are read and written by the kernel itself
    (bfloat16 rounded once, as torch rounds); other dtypes are converted around the call, rounded once.
    """

    def __init__(self, kernel, lora_a: torch.Tensor, lora_b: torch.Tensor, out_slices: list[int], ranks: list[int]):
        from vllm_av.kernels.cpu import AVWeights

        num_slices, num_avs, max_rank, d_in = lora_a.shape
        self.kernel = kernel
        # the dtypes the kernel reads and writes itself (unit inner stride), and its entry point for each
        self._entry_points = {torch.float32: kernel.f32, torch.bfloat16: kernel.bf16}
        self.a = lora_a.permute(1, 0, 2, 3).to(torch.float32).contiguous()  # [N, S, R, in]: an AV's slices together
        parts, offset = [], 0
        for width in out_slices:  # per slice [N, R, width]: a rank's output row is contiguous
            parts.append(lora_b[:, offset : offset + width].permute(0, 2, 1).reshape(-1))
            offset += width
        self.b = torch.cat(parts).to(torch.float32).contiguous()
        self.rank_of = np.ascontiguousarray(ranks, dtype=np.int32)
        self.rank, self.out_slices = max_rank, list(out_slices)
        self.out_size = np.ascontiguousarray(out_slices, dtype=np.int64)
        self.weights = AVWeights(
            self.a.data_ptr(), self.b.data_ptr(), self.rank_of.ctypes.data, self.out_size.ctypes.data,
            num_slices, num_avs, max_rank, d_in,
        )
        self._weights_ref = ctypes.byref(self.weights)
        self._table_pointers = None  # (tables, index pointer, scale pointer, width) of the last from_tables

    def write_slot(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> None:
        """Replace AV ``slot``'s weights in place (``lora_a [S, R, in]``, ``lora_b [OUT, R]``; ``rank``
        rows used, 0: the slot is empty); the kernel keeps reading the same buffers."""
        self.a[slot].copy_(lora_a)
        num_avs, offset, start = self.a.shape[0], 0, 0
        for width in self.out_slices:
            part = self.b[start : start + num_avs * self.rank * width].view(num_avs, self.rank, width)
            part[slot].copy_(lora_b[offset : offset + width].t())
            offset, start = offset + width, start + num_avs * self.rank * width
        self.rank_of[slot] = rank

    def __call__(self, y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, scale: torch.Tensor) -> None:
        """Add the blend of ``index/scale [T, M]`` (int32 / float32, contiguous) to ``y [T, OUT]``."""
        if not (index.dtype == torch.int32 and scale.dtype == torch.float32 and index.is_contiguous()
                and scale.is_contiguous() and index.shape == scale.shape and index.shape[0] == y.shape[0] == x.shape[0]):
            raise ValueError("vllm-av: the CPU blend kernel needs contiguous int32 index and float32 scale of [T, M]")
        self._add(y, x, index.data_ptr(), scale.data_ptr(), index.shape[1])

    def from_tables(self, y: torch.Tensor, x: torch.Tensor, tables) -> None:
        """The layer hook's call: the step's first ``len(y)`` rows of the op-form ``tables`` (not re-checked)."""
        pointers = self._table_pointers
        if pointers is None or pointers[0] is not tables:  # the tables' buffers never move: read once
            pointers = self._table_pointers = (tables, tables.index.data_ptr(), tables.scale.data_ptr(), tables.index.shape[1])
        self._add(y, x, *pointers[1:])

    def _add(self, y: torch.Tensor, x: torch.Tensor, index_ptr: int, scale_ptr: int, width: int) -> None:
        rows = y.shape[0]
        if rows == 0:
            return
        x_stride, y_stride = x.stride(), y.stride()
        entry_point = self._entry_points.get(x.dtype) if x.dtype == y.dtype else None
        if entry_point is not None and x_stride[-1] == 1 and y_stride[-1] == 1:
            status = entry_point(
                self._weights_ref, y.data_ptr(), y_stride[0], x.data_ptr(), x_stride[0], index_ptr, scale_ptr, width, rows
            )
        else:  # other dtypes or layouts: convert around the float32 entry point, round once (as the op does)
            x = x.to(torch.float32).contiguous()
            acc = torch.zeros(y.shape, dtype=torch.float32)
            status = self.kernel.f32(
                self._weights_ref, acc.data_ptr(), acc.stride(0), x.data_ptr(), x.stride(0), index_ptr, scale_ptr, width, rows
            )
            if status == 0:
                add_rounded_once(y, acc)
        if status != 0:
            raise MemoryError("vllm-av: the CPU blend kernel could not allocate its scratch")
