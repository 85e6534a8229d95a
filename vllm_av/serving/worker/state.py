"""What vllm-av keeps in a worker: one :class:`AVWorker` per model runner, one :class:`AVLayerState` per
LoRA-wrapped layer.

An :class:`AVWorker` is built once, at load, with all its collaborators
(:func:`vllm_av.serving.worker.build.build_worker`):
the blend backend, the per-step tables and the mix rows that fill them, the layers holding AV
weights, and -- where on -- the runtime slots and RE-Control's steering. It is kept here, keyed by
its model runner, never as attributes of vLLM's runner. A layer carries one :class:`AVLayerState`
(``layer._vllm_av``), which its hook reads on every forward: a constant to the compiler.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

from vllm_av.serving.blend.base import BlendBackend, LayerBlend
from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.worker.tables import AVWorkerState

logger = logging.getLogger("vllm.av")

_workers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model runner -> its AVWorker


@dataclass(frozen=True)
class AVLayerState:
    """One LoRA-wrapped layer's AV state: the step's tables and its AV weights (None: it holds none);
    ``skip_stock_lora``: vLLM's own (empty) LoRA math is skipped; ``every_step``: the blend runs on
    every forward (the op), else only on steps with mixes (CPU blends)."""

    tables: object = None
    blend: LayerBlend | None = None
    skip_stock_lora: bool = False
    every_step: bool = True


@dataclass
class AVWorker:
    """Everything vllm-av keeps for one model runner."""

    config: AVConfig
    backend: BlendBackend
    mixes: AVWorkerState  # requests -> mixes -> rows of the per-step tables
    layers: dict  # module name -> the LoRA layer holding AV weights
    needs_lora_mapping: bool  # whether vLLM's own per-step LoRA mapping must still be built
    steering: object = None  # a worker.steering.Steering when RE-Control is on
    slots: object = None  # a worker.slots.RuntimeSlots when runtime updates are on
    requests: dict = field(default_factory=dict)  # MRV2 keeps no sampling params: req_id -> NewRequestData

    def forget(self, req_id: str) -> None:
        """Request ``req_id`` left the runner (finished, aborted or preempted): forget its mix and its
        RE-Control setting, so that the same id sent again later (client ids,
        ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1``) is read afresh."""
        self.requests.pop(req_id, None)
        self.mixes.forget(req_id)
        if self.steering is not None:
            self.steering.forget(req_id)


def worker_of(runner) -> AVWorker | None:
    """The AV state of ``runner`` (None: it serves no AVs)."""
    return _workers.get(runner)


def keep(runner, worker: AVWorker) -> None:
    """Keep ``worker`` as ``runner``'s AV state."""
    _workers[runner] = worker
