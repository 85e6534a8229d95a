"""Worker-side patches: load the library after LoRA wrapping, fill tables per step, blend per layer.

Three class-level wraps, each a no-op for runs without ``additional_config["av"]``:

* ``LoRAModelRunnerMixin.load_lora_model`` -- after vLLM wraps the linear layers, load the
  AVs into buffers of their own (before profiling, compilation and CUDA-graph capture).
* ``LoRAModelRunnerMixin.set_active_loras`` -- the classic runner's per-step LoRA mapping
  (``_prepare_inputs``); right after it, fill the AV tables for the same batch.
* ``BaseLinearLayerWithLoRA._apply_lora_to_output`` -- after the stock LoRA add, run
  ``torch.ops.vllm_av.blend_`` on layers that hold AV weights. The op is launched on every
  forward, whatever the batch holds, so CUDA-graph capture never drops it. On CPU, where vLLM
  neither compiles nor captures a LoRA model, layers call the op's dense math directly with the
  step's coefficient table (the custom-op dispatcher alone costs ~25 us a call) and skip steps
  without entries.
"""

from __future__ import annotations

import torch

from vllm_av.config import av_config_from
from vllm_av.ops import blend_dense


def _install_runner_hooks() -> None:
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    from vllm_av.plugin import library_for, local_model_dir
    from vllm_av.worker import install as install_av

    original_load = LoRAModelRunnerMixin.load_lora_model
    original_set = LoRAModelRunnerMixin.set_active_loras

    def load_lora_model(self, model, vllm_config, device):
        model = original_load(self, model, vllm_config, device)
        config = av_config_from(vllm_config.additional_config)
        if config is not None:
            entries = library_for(config, local_model_dir(vllm_config.model_config.model))
            self._vllm_av = install_av(self, model, vllm_config, entries, config)
        return model

    def set_active_loras(self, input_batch, num_scheduled_tokens, *args, **kwargs):
        result = original_set(self, input_batch, num_scheduled_tokens, *args, **kwargs)
        state = getattr(self, "_vllm_av", None)
        if state is not None:
            state.update(input_batch.req_ids, num_scheduled_tokens, self.requests)
        return result

    LoRAModelRunnerMixin.load_lora_model = load_lora_model
    LoRAModelRunnerMixin.set_active_loras = set_active_loras


def _install_layer_hook() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    original = BaseLinearLayerWithLoRA._apply_lora_to_output

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "_av_skip_stock_lora", False):  # fixed per layer, like _av_a
            output = original(self, x, output)
        lora_a = getattr(self, "_av_a", None)  # fixed per layer: a constant to the compiler
        if lora_a is None:
            return output
        y = output.flatten(0, 1) if output.ndim == 3 else output
        x2d = x.flatten(0, 1) if x.ndim == 3 else x
        tables = self._av_tables
        num_tokens = y.shape[0]
        if tables.coef is not None:  # CPU: nothing is compiled or captured; per-step dense coefficients
            if tables.active:
                blend_dense(y, x2d, lora_a, self._av_b, tables.coef[:num_tokens], self._av_slices)
        else:
            torch.ops.vllm_av.blend_(
                y, x2d, lora_a, self._av_b, tables.index[:num_tokens], tables.scale[:num_tokens], self._av_slices
            )
        return output

    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output


def install() -> None:
    """Install the runner and layer hooks (called once per process by ``plugin.register``)."""
    _install_runner_hooks()
    _install_layer_hook()
