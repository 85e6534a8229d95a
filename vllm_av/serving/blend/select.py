"""Which blend an engine's AV layers run: chosen once per worker, from the device and the settings.

* ``op`` -- ``torch.ops.vllm_av.blend_`` on the ``[T, M]`` tables, with the implementation
  :func:`vllm_av.serving.blend.op.op_impl_name` picks: the Triton kernel on CUDA. On CPU it is
  chosen only when ``VLLM_AV_BLEND_IMPL`` names an implementation: ``triton`` (the kernel in
  Triton's interpreter, ``TRITON_INTERPRET=1``: the GPU code path, run by CI on CPU) or
  ``reference``.
* ``native`` / ``dense`` -- on CPU otherwise, as ``--av-cpu-blend`` says
  (:func:`vllm_av.serving.blend.cpu.choose_cpu_blend`): the C kernel, or dense GEMMs over the library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from vllm_av.serving.blend.cpu import choose_cpu_blend, cpu_gemm_backend
from vllm_av.serving.blend.op import IMPL_ENV, op_impl_name


@dataclass(frozen=True)
class BlendChoice:
    """The blend an engine runs: its ``form`` (``op``, ``native``, ``dense``), the ``label`` the
    log and ``vllm-av check`` show, and the C kernel for ``native``."""

    form: str
    label: str
    cpu_kernel: object = None


def choose_blend(device: torch.device, cpu_blend: str = "auto") -> BlendChoice:
    """The blend for layers on ``device``; ``cpu_blend``: the ``av.cpu_blend`` setting."""
    if device.type != "cpu" or os.environ.get(IMPL_ENV, "auto").lower() != "auto":
        return BlendChoice("op", op_impl_name(device.type))
    form, kernel = choose_cpu_blend(cpu_blend)
    if form == "native":
        return BlendChoice("native", "C kernel (CPU)", kernel)
    return BlendChoice("dense", f"dense, {cpu_gemm_backend()} GEMMs (CPU)")
