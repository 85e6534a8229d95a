"""Build a model runner's :class:`~vllm_av.serving.worker.state.AVWorker` at load, with all its collaborators."""

from __future__ import annotations

from vllm_av.serving.library.avs import library_for, local_model_dir
from vllm_av.serving.library.values import value_library_for
from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.worker.loading import install
from vllm_av.serving.worker.slots import RuntimeSlots
from vllm_av.serving.worker.state import AVWorker, keep
from vllm_av.serving.worker.steering import install_steering
from vllm_av.serving.worker.tables import AVWorkerState


def build_worker(runner, model, vllm_config, config: AVConfig) -> AVWorker:
    """Load the library (and value functions) into ``model``, LoRA-wrapped by ``runner``; keep the result."""
    model_dir = local_model_dir(vllm_config.model_config.model)
    entries = library_for(config, model_dir)
    max_live = vllm_config.scheduler_config.max_num_seqs
    backend, tables, layers, needs_mapping = install(runner, model, vllm_config, entries, config)
    mixes = AVWorkerState(entries, config, tables, max_live)
    slots = RuntimeSlots(runner, layers, mixes, config.capacity(len(entries))) if config.allow_runtime_updates else None
    values = value_library_for(config, model_dir)
    steering = install_steering(model, values, max_live) if values else None
    worker = AVWorker(config, backend, mixes, layers, needs_mapping, steering, slots)
    keep(runner, worker)
    return worker
