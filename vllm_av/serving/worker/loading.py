"""Load the AV library into a LoRA-wrapped model: AV weights in buffers of their own per layer.

After vLLM wraps the model's linear layers for LoRA, :func:`install` loads every AV of the
library with vLLM's own LoRA loader (so q/k/v and gate/up packing, alpha/r folding and
tensor-parallel slicing are vLLM's) into per-layer buffers ``lora_a [S, N, R, in]`` and
``lora_b [N, OUT, R]``, laid out by the engine's blend backend (:mod:`vllm_av.serving.blend.select`)
into the layer's :class:`~vllm_av.serving.worker.state.AVLayerState`. They are separate from
vLLM's LoRA slots, which vLLM wipes after warm-up, and keep fixed addresses for CUDA graphs.
Every wrapped layer reads the runner's per-step tables.

With runtime updates on (``av.allow_runtime_updates``) every LoRA-capable linear layer gets a
fixed number of AV slots (``AVConfig.capacity``) of the server's max rank from the start, and
:func:`write_slot` rewrites one slot in place (:mod:`.runtime`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

import vllm_av.serving.blend.op  # noqa: F401  (registers torch.ops.vllm_av.blend_)
from vllm_av.serving.blend.base import BlendBackend
from vllm_av.serving.blend.select import select_backend
from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.library.avs import AVEntry
from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.worker.layer_hooks import use_base_forward
from vllm_av.serving.worker.state import AVLayerState
from vllm_av.serving.worker.tables import make_tables

logger = logging.getLogger("vllm.av")


def layer_stacks(layer, weights: list, rank: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(lora_a [S, N, R, in], lora_b [N, OUT, R], out_slices)`` of ``weights`` (one vLLM
    ``LoRALayerWeights`` or None per AV) as ``layer`` holds them on this rank.

    Uses the layer's own ``set_lora`` on temporary stacks, so vLLM's slicing and packing apply.
    """
    num_avs = len(weights)
    dtype, device = layer.lora_a_stacked[0].dtype, layer.lora_a_stacked[0].device
    stacks_a = tuple(torch.zeros(num_avs, 1, rank, a.shape[3], dtype=dtype, device=device) for a in layer.lora_a_stacked)
    stacks_b = tuple(torch.zeros(num_avs, 1, b.shape[2], rank, dtype=dtype, device=device) for b in layer.lora_b_stacked)
    saved = layer.lora_a_stacked, layer.lora_b_stacked
    layer.lora_a_stacked, layer.lora_b_stacked = stacks_a, stacks_b
    try:
        for k, w in enumerate(weights):
            if w is not None:
                layer.set_lora(k, w.lora_a, w.lora_b)
    finally:
        layer.lora_a_stacked, layer.lora_b_stacked = saved
    lora_a = torch.stack([a[:, 0] for a in stacks_a]).contiguous()  # [S, N, R, in]
    lora_b = torch.cat([b[:, 0] for b in stacks_b], dim=1)  # [N, OUT, R], what the CUDA kernel reads best
    return lora_a, lora_b, [b.shape[2] for b in stacks_b]


def attach_layer(layer, weights: list, tables, ranks: list[int], rank: int, backend: BlendBackend,
                 skip_stock_lora: bool = True) -> None:
    """Load ``weights`` (one vLLM ``LoRALayerWeights`` or None per AV slot) into ``layer``'s AV state.

    ``ranks``: each slot's AV rank; ``rank``: the buffers' rank (at least the largest);
    ``backend``: the engine's blend (:func:`vllm_av.serving.blend.select.select_backend`).
    """
    lora_a, lora_b, slices = layer_stacks(layer, weights, rank)
    layer_ranks = [r if w is not None else 0 for r, w in zip(ranks, weights)]
    layer._vllm_av = AVLayerState(tables, backend.layer(lora_a, lora_b, slices, layer_ranks), skip_stock_lora,
                                  backend.every_step)


def slot_stacks(layer, weight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_a [S, R, in], lora_b [OUT, R])``: one AV's ``weight`` (a vLLM ``LoRALayerWeights``; None:
    zeros) sliced and packed for ``layer`` on this rank, at its AV slots' rank, for :func:`write_slot`."""
    lora_a, lora_b, _ = layer_stacks(layer, [weight], layer._vllm_av.blend.rank)
    return lora_a[:, 0], lora_b[0]


def write_slot(layer, slot: int, stacks: tuple[torch.Tensor, torch.Tensor], rank: int) -> None:
    """Overwrite AV slot ``slot`` of ``layer`` in place with ``stacks`` (:func:`slot_stacks`) of rank
    ``rank`` (0: the AV does not touch this layer). Only copies: nothing here can fail on a good stack.

    The buffers keep their shapes and addresses, so compiled graphs and CUDA graphs stay valid.
    """
    layer._vllm_av.blend.write_slot(slot, *stacks, rank)


def load_lora_model(runner, entry: AVEntry, lora_id: int):
    """Load one AV directory with vLLM's LoRA loader (packing and alpha/r folding included)."""
    worker_manager = runner.lora_manager
    manager = worker_manager._adapter_manager
    expected: set[str] = set()
    for module in manager.supported_lora_modules:
        expected.update(manager.packed_modules_mapping.get(module, [module]))
    peft_helper = points.PEFT_FROM_LOCAL_DIR.bound()(entry.path, worker_manager.max_position_embeddings)
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    lora = points.FROM_LOCAL_CHECKPOINT.bound()(
        entry.path,
        expected,
        peft_helper=peft_helper,
        lora_model_id=lora_id,
        device="cpu",
        dtype=worker_manager.lora_config.lora_dtype,
        model_vocab_size=worker_manager.vocab_size,
        weights_mapper=mapper.get_rename_mapper() if mapper is not None else None,
    )
    manager._create_merged_loras_inplace(lora)
    return lora


def refuse_unplaced(entries: Sequence[AVEntry], lora_models: list, attached) -> None:
    """Raise if a module of an AV found no linear LoRA layer to carry it (it would be silently dropped)."""
    for entry, lora_model in zip(entries, lora_models):
        unplaced = sorted(set(lora_model.loras) - set(attached))
        if unplaced:
            more = f" (and {len(unplaced) - 1} more)" if len(unplaced) > 1 else ""
            raise ValueError(f"vllm-av: AV {entry.name!r} ({entry.path}): module {unplaced[0]}{more} is not a linear "
                             f"layer vLLM can put LoRA on in this model; extract without it")


def install(runner, model, vllm_config, entries: Sequence[AVEntry], config: AVConfig):
    """Load the library into ``model`` (LoRA-wrapped by ``runner``).

    Returns ``(backend, tables, layers, needs_mapping)``: the blend backend, the per-step tables its
    layers read, ``{module name: layer}`` of the layers holding AV weights, and whether vLLM's own
    per-step LoRA mapping must still be built.
    """
    linear_lora = points.BASE_LINEAR_LORA.get()
    manager = runner.lora_manager._adapter_manager
    lora_models = [load_lora_model(runner, entry, lora_id=i + 1) for i, entry in enumerate(entries)]
    capacity = config.capacity(len(entries))  # AV slots: the library, and free ones for runtime loads
    free = capacity - len(entries)
    ranks = [entry.rank for entry in entries] + [0] * free
    # with runtime updates, every slot can hold an AV of the largest rank the server accepts
    rank = config.max_rank if config.allow_runtime_updates else max(ranks)
    device = next(iter(model.parameters())).device
    max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
    backend = select_backend(device, config.cpu_blend)
    tables = make_tables(backend.table_form, max_tokens, config.max_per_request, capacity, device)
    skip_stock_lora = not config.stock_lora
    max_slices, attached = 0, {}
    for name, layer in manager.modules.items():
        layer._vllm_av = AVLayerState(skip_stock_lora=skip_stock_lora)  # every wrapped layer: the hooks read it
        if not isinstance(layer, linear_lora):
            continue
        weights = [manager._get_lora_layer_weights(lora_model, name) for lora_model in lora_models] + [None] * free
        if config.allow_runtime_updates or any(w is not None for w in weights):
            attach_layer(layer, weights, tables, ranks, rank, backend, skip_stock_lora)
            max_slices = max(max_slices, len(layer.lora_b_stacked))
            attached[name] = layer
        if not backend.every_step and skip_stock_lora and layer.tp_size == 1:
            use_base_forward(layer)
    refuse_unplaced(entries, lora_models, attached)
    if not attached:
        raise ValueError("vllm-av: no AV in the library matches a LoRA-capable layer of this model")
    backend.reserve(max_tokens, max_slices, capacity, rank)  # nothing may allocate in a graph capture
    logger.info("vllm-av: %d AVs (max rank %d) on %d layers; up to %d per request",
                len(entries), rank, len(attached), config.max_per_request)
    if config.allow_runtime_updates:
        logger.info("vllm-av: runtime updates on: %d AV slots of rank %d on every LoRA-capable linear layer",
                    capacity, rank)
    # Without stock LoRA, and when the hooks skip the LoRA math of every wrapped layer kind,
    # nothing reads vLLM's per-step LoRA mapping: the runner hook stops building it.
    skippable = (linear_lora, points.LOGITS_LORA.get(), points.EMBEDDING_LORA.get())
    needs_mapping = config.stock_lora or not all(isinstance(m, skippable) for m in manager.modules.values())
    return backend, tables, attached, needs_mapping
