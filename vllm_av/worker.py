"""Worker side: AV weights in buffers of their own on vLLM's LoRA layers, and per-token tables.

After vLLM wraps the model's linear layers for LoRA, :func:`install` loads every AV of the
library with vLLM's own LoRA loader (so q/k/v and gate/up packing, alpha/r folding and
tensor-parallel slicing are vLLM's) into per-layer buffers: on CUDA ``_av_a [S, N, R, in]`` and
``_av_b [N, OUT, R]`` for the blend op, on CPU the same weights laid out for the layer's CPU
blend (``_av_cpu_blend``: the C kernel or the dense GEMMs, :mod:`vllm_av.cpu_blend`). They are
separate from vLLM's LoRA slots, which vLLM wipes after warm-up, and keep fixed addresses for
CUDA graphs.

Each step, :meth:`AVWorkerState.update` fills the persistent tables from the batch's requests,
with vectorised numpy over requests (never a Python loop over tokens): ``index/scale [T, M]``
(entry ``m`` of token row ``t``: library index, -1 = none, and scale) for the op and the C
kernel, or the dense ``coef`` table for the dense CPU blend. Every wrapped CUDA layer then
runs ``torch.ops.vllm_av.blend_`` unconditionally.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

import vllm_av.ops  # registers torch.ops.vllm_av.blend_
from vllm_av.config import AVConfig
from vllm_av.cpu_blend import CPUBlend, NativeCPUBlend, choose_cpu_blend, cpu_gemm_backend
from vllm_av.hooks import use_base_forward
from vllm_av.library import AVEntry
from vllm_av.mix import MixError, parse_mix

logger = logging.getLogger("vllm.av")


class AVTables:
    """Persistent per-token tables read by every AV layer, in one of two forms.

    * op form (CUDA): ``index/scale [max_tokens, M]``, read by ``torch.ops.vllm_av.blend_``.
    * dense form (CPU, ``dense=True``): ``coef [max_tokens, N]``, the sum of the scales each token
      gives each AV (what :func:`vllm_av.ops.blend_scaled_ranks` reads), and ``active``: whether the step has any
      entry, so CPU layers skip steps without mixes (never used on CUDA, where a host-side
      branch would break graph capture).
    """

    def __init__(
        self, max_tokens: int, max_per_request: int, num_avs: int, device: torch.device, dense: bool | None = None,
    ):
        device = torch.device(device)
        self.dense = device.type == "cpu" if dense is None else dense
        self.max_tokens = max_tokens
        self.active = False
        self._filled = 0  # rows that may hold entries from the last update
        if self.dense:
            self.coef = torch.zeros(max_tokens, num_avs)
            return
        self.coef = None
        shape = (max_tokens, max_per_request)
        self.index = torch.full(shape, -1, dtype=torch.int32, device=device)
        self.scale = torch.zeros(shape, dtype=torch.float32, device=device)
        if device.type == "cpu":
            self._host = [(self.index, self.scale)]  # written in place, no copy
        else:
            # Two pinned staging buffers, alternated, so an in-flight copy is never overwritten.
            self._host = [
                (torch.full(shape, -1, dtype=torch.int32).pin_memory(), torch.zeros(shape).pin_memory())
                for _ in range(2)
            ]
        self._turn = 0

    def _rows_to_write(self, has_entries: bool, num_tokens: int) -> int:
        """Rows this update must write (0: none, the tables already hold no entries)."""
        if not has_entries and self._filled == 0:
            return 0
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens exceed the AV table size {self.max_tokens}")
        rows = max(num_tokens, self._filled)
        self._filled = num_tokens if has_entries else 0
        self.active = has_entries
        return rows

    def write(
        self, pool_index: np.ndarray, pool_scale: np.ndarray, token_rows: np.ndarray | None, num_tokens: int
    ) -> None:
        """Op form: row ``t`` = ``pool_index/pool_scale[token_rows[t]]`` (None = no entries); clear the rest."""
        rows = self._rows_to_write(token_rows is not None, num_tokens)
        if rows == 0:
            return
        host_index, host_scale = self._host[self._turn]
        self._turn = (self._turn + 1) % len(self._host)
        hi, hs = host_index.numpy(), host_scale.numpy()
        written = 0
        if token_rows is not None:  # gathered straight into the tables, no temporaries
            # mode="clip": the rows come from the pool itself, so always in range ("raise" buffers: ~2x slower)
            np.take(pool_index, token_rows, axis=0, out=hi[:num_tokens], mode="clip")
            np.take(pool_scale, token_rows, axis=0, out=hs[:num_tokens], mode="clip")
            written = num_tokens
        if rows > written:
            hi[written:rows] = -1
            hs[written:rows] = 0.0
        if host_index is not self.index:
            self.index[:rows].copy_(host_index[:rows], non_blocking=True)
            self.scale[:rows].copy_(host_scale[:rows], non_blocking=True)

    def write_dense(self, pool_coef: torch.Tensor, token_rows: np.ndarray | None, num_tokens: int) -> None:
        """Dense form: row ``t`` = ``pool_coef[token_rows[t]]`` (None = no entries); clear the rest."""
        rows = self._rows_to_write(token_rows is not None, num_tokens)
        if rows == 0:
            return
        written = 0
        if token_rows is not None:
            torch.index_select(pool_coef, 0, torch.from_numpy(token_rows), out=self.coef[:num_tokens])
            written = num_tokens
        if rows > written:
            self.coef[written:rows] = 0.0


class AVWorkerState:
    """Maps requests to mixes and mixes to table rows, for one model runner."""

    def __init__(
        self, entries: Sequence[AVEntry], config: AVConfig, tables: AVTables, max_live_mixes: int,
        needs_lora_mapping: bool = True,
    ):
        self.config = config
        self.tables = tables
        self.name_to_index = {entry.name: i for i, entry in enumerate(entries)}
        self.needs_lora_mapping = needs_lora_mapping  # whether vLLM's own per-step LoRA mapping must be built
        self._capacity = max(4 * max_live_mixes, 64)  # > 2x the live requests: room after compaction
        self._last_ids: list[str] = []  # the last update's batch (see update)
        self._last_counts = b""
        self._reset_pool()

    def _reset_pool(self) -> None:
        # Pool row 0 is the empty mix; each distinct mix in use gets one row, in the tables' form.
        if self.tables.dense:  # numpy for cheap per-entry writes; the tables read it as a tensor
            self._pool_coef = np.zeros((self._capacity + 1, self.tables.coef.shape[1]), dtype=np.float32)
            self._pool_coef_tensor = torch.from_numpy(self._pool_coef)
        else:
            shape = (self._capacity + 1, self.config.max_per_request)
            self._pool_index = np.full(shape, -1, dtype=np.int32)
            self._pool_scale = np.zeros(shape, dtype=np.float32)
        self._mix_row: dict[tuple, int] = {(): 0}
        self._req_row: dict[str, int] = {}

    def _row_for_mix(self, mix: tuple) -> int:
        row = self._mix_row.get(mix)
        if row is None:
            row = len(self._mix_row)
            self._mix_row[mix] = row
            if self.tables.dense:
                for name, scale in mix:
                    self._pool_coef[row, self.name_to_index[name]] += scale
            else:
                for m, (name, scale) in enumerate(mix):
                    self._pool_index[row, m] = self.name_to_index[name]
                    self._pool_scale[row, m] = scale
        return row

    def _resolve(self, req_id: str, requests: dict) -> None:
        """Parse a new request's mix and give the request its pool row."""
        extra = getattr(requests[req_id].sampling_params, "extra_args", None) or {}
        spec = extra.get("av")
        mix: tuple = ()
        if spec is not None:
            try:
                mix = parse_mix(spec, self.name_to_index, self.config)
            except MixError as exc:  # the frontend validates; reaching here is a bug
                logger.error("vllm-av: request %s: %s; serving it without AV", req_id, exc)
        self._req_row[req_id] = self._row_for_mix(mix)

    def _compact(self, requests: dict) -> None:
        """Forget finished requests and the mixes only they used."""
        live = {rid: row for rid, row in self._req_row.items() if rid in requests}
        mixes = {row: mix for mix, row in self._mix_row.items()}
        self._reset_pool()
        for rid, row in live.items():
            self._req_row[rid] = self._row_for_mix(mixes[row])

    def update(self, req_ids: Sequence[str], num_scheduled_tokens: np.ndarray, requests: dict) -> None:
        """Fill the tables for a batch: request ``req_ids[i]`` owns ``num_scheduled_tokens[i]`` rows.

        A step that repeats the last one (same requests in the same order, same token counts: most
        decode steps) finds the tables already filled and returns at once.
        """
        counts = num_scheduled_tokens.tobytes()
        if req_ids == self._last_ids and counts == self._last_counts:
            return
        self._last_ids, self._last_counts = list(req_ids), counts
        if len(self._mix_row) + len(req_ids) > self._capacity or len(self._req_row) > 2 * self._capacity:
            # Before any row is read (compaction renumbers rows). The second test forgets finished
            # requests when few distinct mixes would never fill the pool (else one entry per request leaks).
            self._compact(requests)
        rows = self._pool_rows(req_ids, requests)
        token_rows = np.repeat(rows, num_scheduled_tokens)
        num_tokens = len(token_rows)
        if not rows.any():  # no request in the batch has a mix
            token_rows = None
        if self.tables.dense:
            self.tables.write_dense(self._pool_coef_tensor, token_rows, num_tokens)
        else:
            self.tables.write(self._pool_index, self._pool_scale, token_rows, num_tokens)

    def _pool_rows(self, req_ids: Sequence[str], requests: dict) -> np.ndarray:
        """Each request's pool row; a request seen for the first time has its mix parsed (once)."""
        row_of = self._req_row.__getitem__
        try:
            return np.fromiter(map(row_of, req_ids), dtype=np.int64, count=len(req_ids))
        except KeyError:
            for rid in req_ids:
                if rid not in self._req_row:
                    self._resolve(rid, requests)
            return np.fromiter(map(row_of, req_ids), dtype=np.int64, count=len(req_ids))


def attach_layer(layer, weights: list, tables: AVTables, ranks: list[int], cpu_kernel=None) -> None:
    """Load ``weights`` (one vLLM ``LoRALayerWeights`` or None per AV) into ``layer``'s AV buffers.

    Uses the layer's own ``set_lora`` on temporary stacks, so vLLM's slicing and packing apply.
    ``ranks``: each AV's rank (buffers are padded to the largest); ``cpu_kernel``: the C blend
    kernel for CPU layers (None: dense).
    """
    num_avs, rank = len(weights), max(ranks)
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
    slices = [b.shape[2] for b in stacks_b]
    if device.type != "cpu":
        layer._av_a, layer._av_b, layer._av_slices = lora_a, lora_b, slices
        layer._av_cpu_blend = None
    elif tables.dense:
        layer._av_cpu_blend = CPUBlend(lora_a, lora_b, slices)
    else:
        layer_ranks = [r if w is not None else 0 for r, w in zip(ranks, weights)]
        layer._av_cpu_blend = NativeCPUBlend(cpu_kernel, lora_a, lora_b, slices, layer_ranks)
    layer._av_tables = tables


def load_lora_model(runner, entry: AVEntry, lora_id: int):
    """Load one AV directory with vLLM's LoRA loader (packing and alpha/r folding included)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    worker_manager = runner.lora_manager
    manager = worker_manager._adapter_manager
    expected: set[str] = set()
    for module in manager.supported_lora_modules:
        expected.update(manager.packed_modules_mapping.get(module, [module]))
    peft_helper = PEFTHelper.from_local_dir(entry.path, worker_manager.max_position_embeddings)
    mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_local_checkpoint(
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


def install(runner, model, vllm_config, entries: Sequence[AVEntry], config: AVConfig) -> AVWorkerState:
    """Load the library into ``model`` (LoRA-wrapped by ``runner``); return the runner's AV state."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    from vllm.lora.layers.vocab_parallel_embedding import VocabParallelEmbeddingWithLoRA

    manager = runner.lora_manager._adapter_manager
    lora_models = [load_lora_model(runner, entry, lora_id=i + 1) for i, entry in enumerate(entries)]
    ranks = [entry.rank for entry in entries]
    rank = max(ranks)
    device = next(iter(model.parameters())).device
    max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
    cpu_form, cpu_kernel = choose_cpu_blend(config.cpu_blend) if device.type == "cpu" else (None, None)
    tables = AVTables(max_tokens, config.max_per_request, len(entries), device, dense=cpu_form == "dense")
    layers, max_slices = 0, 0
    for name, layer in manager.modules.items():
        layer._av_skip_stock_lora = not config.stock_lora  # read by the layer hooks
        if not isinstance(layer, BaseLinearLayerWithLoRA):
            continue
        weights = [manager._get_lora_layer_weights(lora_model, name) for lora_model in lora_models]
        if any(w is not None for w in weights):
            attach_layer(layer, weights, tables, ranks, cpu_kernel)
            layers, max_slices = layers + 1, max(max_slices, len(layer.lora_b_stacked))
        if device.type == "cpu" and not config.stock_lora and layer.tp_size == 1:
            use_base_forward(layer)
    if layers == 0:
        raise ValueError("vllm-av: no AV in the library matches a LoRA-capable layer of this model")
    if device.type == "cuda":
        impl = vllm_av.ops.cuda_impl_name()
    else:
        impl = "C kernel (CPU)" if cpu_form == "native" else f"dense, {cpu_gemm_backend()} GEMMs (CPU)"
    if impl == "triton":  # the kernel's scratch, sized now: nothing may allocate in a graph capture
        from vllm_av.kernels.blend import reserve_scratch

        reserve_scratch(device, max_tokens, max_slices, len(entries))
    logger.info(
        "vllm-av: %d AVs (max rank %d) on %d layers; up to %d per request; blend implementation: %s",
        len(entries), rank, layers, config.max_per_request, impl,
    )
    # Without stock LoRA, and when the hooks skip the LoRA math of every wrapped layer kind,
    # nothing reads vLLM's per-step LoRA mapping: the runner hook stops building it.
    skippable = (BaseLinearLayerWithLoRA, LogitsProcessorWithLoRA, VocabParallelEmbeddingWithLoRA)
    needs_mapping = config.stock_lora or not all(isinstance(m, skippable) for m in manager.modules.values())
    return AVWorkerState(entries, config, tables, vllm_config.scheduler_config.max_num_seqs, needs_mapping)
