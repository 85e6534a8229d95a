"""The one place that chooses how an engine's AV layers blend: :func:`select_backend`, once per worker, logged.

* CUDA: the Triton kernel (:mod:`.triton`), or the torch reference (:mod:`.reference`) where Triton
  does not import (with a warning);
* CPU: the C kernel (:mod:`.native`) or dense GEMMs (:mod:`.dense`), as ``--av-cpu-blend`` says
  (``auto``: the C kernel where a C compiler builds it, else dense with a warning; ``native``
  refuses to go without it).

``VLLM_AV_BLEND_IMPL=triton|reference`` forces the op's implementation on any device: on CPU,
``triton`` (with ``TRITON_INTERPRET=1``) runs the GPU code path in Triton's interpreter, as CI does.
"""

from __future__ import annotations

import logging
import os

import torch

from vllm_av.serving.blend.base import BlendBackend

logger = logging.getLogger("vllm.av")

IMPL_ENV = "VLLM_AV_BLEND_IMPL"  # auto | triton | reference


def select_backend(device: torch.device, cpu_blend: str = "auto") -> BlendBackend:
    """The blend backend for AV layers on ``device``; ``cpu_blend``: the ``av.cpu_blend`` setting."""
    from vllm_av.serving.blend.reference import ReferenceBlend
    from vllm_av.serving.blend.triton import TritonBlend, kernel_available

    wanted = os.environ.get(IMPL_ENV, "auto").lower()
    if wanted not in ("auto", "triton", "reference"):
        raise ValueError(f"{IMPL_ENV}={wanted!r}: expected auto, triton or reference")
    device = torch.device(device)
    if wanted == "reference":
        backend = ReferenceBlend(device)
    elif wanted == "triton":
        backend = TritonBlend(device)
    elif device.type != "cpu":
        if kernel_available():
            backend = TritonBlend(device)
        else:
            logger.warning("vllm-av: the Triton blend kernel does not import here; using the torch reference")
            backend = ReferenceBlend(device)
    else:
        backend = _cpu_backend(cpu_blend)
    logger.info("vllm-av: blend implementation: %s", backend.name)
    return backend


def _cpu_backend(cpu_blend: str) -> BlendBackend:
    from vllm_av.serving.blend.dense import DenseBlend
    from vllm_av.serving.blend.native import NativeBlend

    if cpu_blend == "dense":
        return DenseBlend()
    from vllm_av.kernels.cpu import load

    kernel = load()  # None (with a warning) where no C compiler builds it
    if kernel is None:
        if cpu_blend == "native":
            raise RuntimeError("vllm-av: av.cpu_blend is 'native' but the C blend kernel could not be built (see the warning)")
        return DenseBlend()
    return NativeBlend(kernel)
