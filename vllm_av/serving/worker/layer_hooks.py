"""Layer-side patches: blend every LoRA-wrapped linear layer that holds AV weights.

Class-level wraps, each a no-op for layers the AV loader did not touch:

* ``BaseLinearLayerWithLoRA._apply_lora_to_output`` -- after the stock LoRA add, run
  ``torch.ops.vllm_av.blend_`` on layers that hold AV weights. The op is launched on every
  forward, whatever the batch holds, so CUDA-graph capture never drops it (a step without any
  mix returns at once inside the kernel, from the tables' device-side ``step_active``). On CPU,
  where vLLM neither compiles nor captures a LoRA model, layers call their CPU blend directly (the
  C kernel or the dense GEMMs of :mod:`vllm_av.serving.blend.cpu`, weights laid out at load time)
  with the step's tables (the custom-op dispatcher alone costs ~25 us a call) and skip steps
  without entries -- unless the op was chosen for CPU (:mod:`vllm_av.serving.blend.select`).
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


def _install_layer_hook() -> None:
    original = points.APPLY_LORA_TO_OUTPUT.get()

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
            torch.ops.vllm_av.blend_(y, x2d, self._av_a, self._av_b, tables.index[:num_tokens],
                                     tables.scale[:num_tokens], tables.step_active, self._av_slices)
        elif tables.active:  # CPU: nothing is compiled or captured, so steps without mixes are skipped
            cpu_blend.from_tables(y, x2d, tables)
        return output

    points.APPLY_LORA_TO_OUTPUT.replace(_apply_lora_to_output)


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
    original_embedding = points.EMBEDDING_FORWARD.get()
    original_logits = points.LOGITS_GET_LOGITS.get()

    def embedding_forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_av_skip_stock_lora", False):
            return self.base_layer.forward(x)
        return original_embedding(self, x)

    def _get_logits(self, hidden_states, lm_head, *args, **kwargs):
        if getattr(self, "_av_skip_stock_lora", False):
            return self.base_layer._get_logits(hidden_states, getattr(lm_head, "base_layer", lm_head), *args, **kwargs)
        return original_logits(self, hidden_states, lm_head, *args, **kwargs)

    points.EMBEDDING_FORWARD.replace(embedding_forward)
    points.LOGITS_GET_LOGITS.replace(_get_logits)


def install() -> None:
    """Install the layer hooks (called once per process by ``plugin.register``)."""
    _install_layer_hook()
    _install_stock_lora_skips()
