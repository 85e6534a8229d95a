"""Model-runner patches: load the library after LoRA wrapping, and fill the AV tables each step.

Class-level wraps of vLLM's LoRA runner mixin, each a no-op for runs without ``additional_config["av"]``:

* ``LoRAModelRunnerMixin.load_lora_model`` -- after vLLM wraps the linear layers, load the
  AVs into buffers of their own (before profiling, compilation and CUDA-graph capture).
* ``LoRAModelRunnerMixin.set_active_loras`` -- the classic runner's per-step LoRA mapping
  (``_prepare_inputs``); right after it, fill the AV tables for the same batch. When LoRA is
  on only to carry the AVs (stock LoRA off), vLLM's own mapping is not built at all.
"""

from __future__ import annotations

from vllm_av.serving import patch_points as points
from vllm_av.serving.config import av_config_from
from vllm_av.serving.library import library_for, local_model_dir
from vllm_av.serving.worker.loading import install as install_av


def _install_load_hook() -> None:
    original_load = points.LOAD_LORA_MODEL.get()

    def load_lora_model(self, model, vllm_config, device):
        model = original_load(self, model, vllm_config, device)
        config = av_config_from(vllm_config.additional_config)
        if config is not None:
            entries = library_for(config, local_model_dir(vllm_config.model_config.model))
            self._vllm_av = install_av(self, model, vllm_config, entries, config)
        return model

    points.LOAD_LORA_MODEL.replace(load_lora_model)


def _install_v1_step_hook() -> None:
    original_set = points.SET_ACTIVE_LORAS.get()

    def set_active_loras(self, input_batch, num_scheduled_tokens, *args, **kwargs):
        state = getattr(self, "_vllm_av", None)
        if state is None or state.needs_lora_mapping:
            original_set(self, input_batch, num_scheduled_tokens, *args, **kwargs)
        if state is not None:
            state.update(input_batch.req_ids, num_scheduled_tokens, self.requests)

    points.SET_ACTIVE_LORAS.replace(set_active_loras)


def install() -> None:
    """Install the runner hooks (called once per process by ``plugin.register``)."""
    _install_load_hook()
    _install_v1_step_hook()
