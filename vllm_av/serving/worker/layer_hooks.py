"""Layer-side patches: blend every LoRA-wrapped linear layer that holds AV weights.

Class-level wraps, each a no-op for layers the AV loader did not touch:

* ``BaseLinearLayerWithLoRA._apply_lora_to_output`` -- after the stock LoRA add, the layer's blend
  (its :class:`~vllm_av.serving.worker.state.AVLayerState`) on layers that hold AV weights. The op
  backends run on every forward, whatever the batch holds, so CUDA-graph capture never drops them
  (a step without any mix returns at once inside the kernel, from the tables' device-side
  ``step_active``). The CPU blends (the C kernel or the dense GEMMs, weights laid out at load
  time), where vLLM neither compiles nor captures a LoRA model, are called directly and skip steps
  without entries (the custom-op dispatcher alone costs ~25 us a call).
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

from vllm_av.serving.compat import patch_points as points


def _token_rows(t: torch.Tensor) -> torch.Tensor:
    """``[batch, seq, hidden]`` (the transformers backend) as ``[tokens, hidden]``; 2-D unchanged."""
    return t.flatten(0, 1) if t.ndim == 3 else t


_NO_AV = None  # what a layer vLLM wrapped without vllm-av (a plain LoRA engine) holds


def _install_layer_hook() -> None:
    original = points.APPLY_LORA_TO_OUTPUT.get()

    def _apply_lora_to_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        state = getattr(self, "_vllm_av", _NO_AV)  # fixed per layer: a constant to the compiler
        if state is None or not state.skip_stock_lora:
            output = original(self, x, output)
        if state is None or state.blend is None:
            return output
        if state.every_step or state.tables.active:  # CPU blends skip steps without mixes
            state.blend.from_tables(_token_rows(output), _token_rows(x), state.tables)
        return output

    points.APPLY_LORA_TO_OUTPUT.replace(_apply_lora_to_output)


def _base_forward_then_blend(base_layer, state, x: torch.Tensor):
    output = base_layer(x)  # vanilla vLLM's forward: (output, bias) or output
    if state.blend is not None and state.tables.active:
        y = output[0] if isinstance(output, tuple) else output
        state.blend.from_tables(_token_rows(y), _token_rows(x), state.tables)
    return output


def use_base_forward(layer) -> None:
    """Run ``layer`` (a LoRA-wrapped CPU linear, stock LoRA off, one TP rank) as its base layer + the AV blend.

    The wrapper's ``forward`` (vLLM's copy of the base layer's, with the LoRA add in the middle)
    is replaced, for this instance only, by the base layer's own forward followed by the blend
    into its output: the same sum, as the blend is a plain add after the GEMM and its bias. Call
    after the layer's AV state is set (with or without AV weights).
    """
    layer.forward = functools.partial(_base_forward_then_blend, layer.base_layer, layer._vllm_av)


def _install_stock_lora_skips() -> None:
    """Embedding and logits LoRA wrappers run their base layer alone when stock LoRA is off."""
    original_embedding = points.EMBEDDING_FORWARD.get()
    original_logits = points.LOGITS_GET_LOGITS.get()

    def embedding_forward(self, x: torch.Tensor) -> torch.Tensor:
        state = getattr(self, "_vllm_av", _NO_AV)
        if state is not None and state.skip_stock_lora:
            return self.base_layer.forward(x)
        return original_embedding(self, x)

    def _get_logits(self, hidden_states, lm_head, *args, **kwargs):
        state = getattr(self, "_vllm_av", _NO_AV)
        if state is not None and state.skip_stock_lora:
            return self.base_layer._get_logits(hidden_states, getattr(lm_head, "base_layer", lm_head), *args, **kwargs)
        return original_logits(self, hidden_states, lm_head, *args, **kwargs)

    points.EMBEDDING_FORWARD.replace(embedding_forward)
    points.LOGITS_GET_LOGITS.replace(_get_logits)


def install() -> None:
    """Install the layer hooks (called once per process by ``plugin.register``)."""
    _install_layer_hook()
    _install_stock_lora_skips()
