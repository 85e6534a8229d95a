"""Worker-side patches: load the library after LoRA wrapping, fill tables per step, blend per layer.

Class-level wraps, each a no-op for runs without ``additional_config["av"]``:

* ``LoRAModelRunnerMixin.load_lora_model`` -- after vLLM wraps the linear layers, load the
  AVs into buffers of their own (before profiling, compilation and CUDA-graph capture).
* ``LoRAModelRunnerMixin.set_active_loras`` -- the classic runner's per-step LoRA mapping
  (``_prepare_inputs``); right after it, fill the AV tables for the same batch. When LoRA is
  on only to carry the AVs (stock LoRA off), vLLM's own mapping is not built at all.
* ``BaseLinearLayerWithLoRA._apply_lora_to_output`` -- after the stock LoRA add, run
  ``torch.ops.vllm_av.blend_`` on layers that hold AV weights. The op is launched on every
  forward, whatever the batch holds, so CUDA-graph capture never drops it. On CPU, where vLLM
  neither compiles nor captures a LoRA model, layers call their CPU blend directly (the C kernel
  or the dense GEMMs of :mod:`vllm_av.cpu_blend`, weights laid out at load time) with the step's
  tables (the custom-op dispatcher alone costs ~25 us a call) and skip steps without entries.
* ``VocabParallelEmbeddingWithLoRA.forward``, ``LogitsProcessorWithLoRA._get_logits`` -- with
  stock LoRA off, the embedding and the logits run as in vanilla vLLM (every wrapped layer
  skips its empty stock LoRA math, so an AV server costs nothing extra without mixes).

One per-layer patch, :func:`use_base_forward`: on CPU with stock LoRA off (one tensor-parallel
rank), a wrapped linear layer's ``forward`` becomes its base layer's own forward plus the CPU
blend, skipping the LoRA wrapper's Python path (a few microseconds per layer call on CPU).
"""

from __future__ import annotations

import functools

import torch

from vllm_av.config import av_config_from


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
        state = getattr(self, "_vllm_av", None)
        if state is None or state.needs_lora_mapping:
            original_set(self, input_batch, num_scheduled_tokens, *args, **kwargs)
        if state is not None:
            state.update(input_batch.req_ids, num_scheduled_tokens, self.requests)

    LoRAModelRunnerMixin.load_lora_model = load_lora_model
    LoRAModelRunnerMixin.set_active_loras = set_active_loras


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, hidden]`` (the transformers backend) as ``[tokens, hidden]``; 2-D unchanged."""
    return t.flatten(0, 1) if t.ndim == 3 else t


def _install_layer_hook() -> None:
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA

    original = BaseLinearLayerWithLoRA._apply_lora_to_output

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "_av_skip_stock_lora", False):  # fixed per layer, like _av_tables
            output = original(self, x, output)
        tables = getattr(self, "_av_tables", None)  # fixed per layer: a constant to the compiler
        if tables is None:
            return output
        y, x2d = _token_rows(output), _token_rows(x)
        num_tokens = y.shape[0]
        cpu_blend = self._av_cpu_blend  # None on CUDA
        if cpu_blend is None:
            torch.ops.vllm_av.blend_(
                y, x2d, self._av_a, self._av_b, tables.index[:num_tokens], tables.scale[:num_tokens], self._av_slices
            )
        elif tables.active:  # CPU: nothing is compiled or captured, so steps without mixes are skipped
            cpu_blend.from_tables(y, x2d, tables)
        return output

    BaseLinearLayerWithLoRA._apply_lora_to_output = _apply_lora_to_output


def _base_forward_then_blend(base_layer, tables, cpu_blend, x: torch.Tensor):
    output = base_layer(x)  # vanilla vLLM's forward: (output, bias) or output
    if tables is not None and tables.active:
        y = output[0] if isinstance(output, tuple) else output
        cpu_blend.from_tables(_token_rows(y), _token_rows(x), tables)
    return output


def use_base_forward(layer) -> None:
    """Run ``layer`` (a LoRA-wrapped CPU linear, stock LoRA off, one TP rank) as its base layer + the AV blend.

    The wrapper's ``forward`` (vLLM's copy of the base layer's, with the LoRA add in the middle)
    is replaced, for this instance only, by the base layer's own forward followed by the blend
    into its output: the same sum, as the blend is a plain add after the GEMM and its bias. Call
    after the layer's AV weights are attached (or on a layer that holds none).
    """
    tables = layer.__dict__.get("_av_tables")
    blend = layer.__dict__.get("_av_cpu_blend")
    layer.forward = functools.partial(_base_forward_then_blend, layer.base_layer, tables, blend)


def _install_stock_lora_skips() -> None:
    """Embedding and logits LoRA wrappers run their base layer alone when stock LoRA is off."""
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA

    original_embedding = VocabParallelEmbeddingWithLoRA.forward
    original_logits = LogitsProcessorWithLoRA._get_logits

    def embedding_forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_av_skip_stock_lora", False):
            return self.base_layer.forward(x)
        return original_embedding(self, x)

    def _get_logits(self, hidden_states, lm_head, *args, **kwargs):
        if getattr(self, "_av_skip_stock_lora", False):
            return self.base_layer._get_logits(hidden_states, getattr(lm_head, "base_layer", lm_head), *args, **kwargs)
        return original_logits(self, hidden_states, lm_head, *args, **kwargs)

    VocabParallelEmbeddingWithLoRA.forward = embedding_forward
    LogitsProcessorWithLoRA._get_logits = _get_logits


def install() -> None:
    """Install the runner and layer hooks (called once per process by ``plugin.register``)."""
    _install_runner_hooks()
    _install_layer_hook()
    _install_stock_lora_skips()
