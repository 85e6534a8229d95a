"""The ``vllm.general_plugins`` entry point: wires AV serving into vLLM in every process.

``register()`` is re-entrant (vLLM calls it in the API server, the engine core and every
worker; forked children inherit the patches). It adds ``--enable-av`` and friends to vLLM's
engine arguments, turns them into ``additional_config["av"]`` (the supported, hashed place
for plugin settings), and installs the frontend, runner and layer hooks. Nothing changes
unless a run has ``additional_config["av"]``.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from vllm_av.config import CONFIG_KEY, CPU_BLENDS, AVConfig, av_config_from

logger = logging.getLogger("vllm.av")

_registered = False
_runner_logged = False
_libraries: dict[tuple[str, str | None], list] = {}


def register() -> None:
    """Entry point: install the AV hooks into vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    _registered = True
    from vllm_av.vllm_compat import unsupported_reason

    _install_cli_args()
    reason = unsupported_reason()
    if reason:
        logger.warning("vllm-av: AV serving disabled: %s", reason)
        return
    _install_engine_config_hook()
    from vllm_av import frontend, hooks

    frontend.install()
    hooks.install()


def local_model_dir(model: str) -> str | None:
    """The served model's directory if it is a local path, else None (a hub name)."""
    return model if model and os.path.isdir(model) else None


def library_for(config: AVConfig, model_dir: str | None) -> list:
    """Validate and load the AV library once per process (cached)."""
    from vllm_av.library import load_library

    # Everything load_library's checks depend on (not max_per_request/max_abs_scale/stock_lora).
    key = (config.path, config.max_rank, config.max_name_length, config.lenient, model_dir)
    if key not in _libraries:
        _libraries[key] = load_library(config.path, config, model_dir=model_dir)
    return _libraries[key]


def _install_cli_args() -> None:
    """``--enable-av --av-path DIR`` and one ``--av-*`` flag per :class:`AVConfig` setting."""
    from vllm.engine import arg_utils

    engine_args = arg_utils.EngineArgs
    if getattr(engine_args, "_vllm_av_cli", False):
        return
    original_add = engine_args.add_cli_args
    original_from = engine_args.from_cli_args.__func__

    def add_cli_args(parser):
        parser = original_add(parser)
        defaults = AVConfig(path="-")
        group = parser.add_argument_group("AlignmentVectors", "Per-request mixes of Alignment Vectors (vllm-av)")
        group.add_argument("--enable-av", action="store_true", help="Serve the AV library given by --av-path.")
        group.add_argument("--av-path", type=str, default=None, help="AV library: one AV adapter directory per AV.")
        group.add_argument("--av-max-per-request", type=int, default=defaults.max_per_request,
                           help="Most AVs one request may mix.")
        group.add_argument("--av-max-abs-scale", type=float, default=defaults.max_abs_scale,
                           help="Largest |scale| a request may give one AV.")
        group.add_argument("--av-max-rank", type=int, default=defaults.max_rank,
                           help="Largest AV rank the library may hold.")
        group.add_argument("--av-max-name-length", type=int, default=defaults.max_name_length,
                           help="Longest AV name accepted (in the library and in requests).")
        group.add_argument("--av-lenient", action="store_true",
                           help="Refuse a broken AV with a one-line warning and serve the rest "
                                "(default: a broken AV stops the start).")
        group.add_argument("--av-cpu-blend", choices=CPU_BLENDS, default=defaults.cpu_blend,
                           help="CPU only: 'native' (a C kernel whose cost grows with the AVs a request uses), "
                                "'dense' (GEMMs over the whole library), or 'auto' (native when a C compiler "
                                "builds it, else dense).")
        return parser

    def from_cli_args(cls, args):
        result = original_from(cls, args)
        if getattr(args, "enable_av", False):
            if not args.av_path:
                raise SystemExit("vllm-av: error: --enable-av needs --av-path DIR")
            settings = {
                "path": os.path.abspath(args.av_path),
                "max_per_request": args.av_max_per_request,
                "max_abs_scale": args.av_max_abs_scale,
                "max_rank": args.av_max_rank,
                "max_name_length": args.av_max_name_length,
                "lenient": args.av_lenient,
                "cpu_blend": args.av_cpu_blend,
            }
            result.additional_config = {**(result.additional_config or {}), CONFIG_KEY: settings}
            _validate_before_start(settings, getattr(args, "model", None))
        elif getattr(args, "av_path", None):
            raise SystemExit("vllm-av: error: --av-path needs --enable-av")
        return result

    engine_args.add_cli_args = staticmethod(add_cli_args)
    engine_args.from_cli_args = classmethod(from_cli_args)
    engine_args._vllm_av_cli = True


def _validate_before_start(settings: dict, model: str | None) -> None:
    """Fail a CLI start with one line naming the bad file, before any engine process starts."""
    from vllm_av.config import AVConfigError
    from vllm_av.library import AVLibraryError

    try:
        library_for(AVConfig.from_dict(settings), local_model_dir(model or ""))
    except (AVConfigError, AVLibraryError) as exc:
        raise SystemExit(f"vllm-av: error: {exc}") from None


def _install_engine_config_hook() -> None:
    """When AV is on: enable LoRA (AVs ride on vLLM's LoRA layers), validate, force runner V1."""
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    original_create = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        config = av_config_from(self.additional_config)
        if config is None:
            return original_create(self, *args, **kwargs)
        if self.fully_sharded_loras:
            raise ValueError("vllm-av: --fully-sharded-loras is not supported with AV")
        if os.environ.get("VLLM_LORA_ENABLE_DUAL_STREAM", "0").strip() not in ("", "0"):
            # its LoRA path (lora_linear_async) never reaches the layer hook: AVs would be skipped
            raise ValueError("vllm-av: VLLM_LORA_ENABLE_DUAL_STREAM is not supported with AV; unset it")
        if not self.enable_lora:
            # AVs ride on vLLM's LoRA layers but live in buffers of their own: keep vLLM's LoRA
            # slots minimal and skip its LoRA math (stock_lora=False).
            self.enable_lora = True
            self.max_loras = 1
            self.max_lora_rank = 8
            config = dataclasses.replace(config, stock_lora=False)
        self.additional_config = {**self.additional_config, CONFIG_KEY: config.to_dict()}
        vllm_config = original_create(self, *args, **kwargs)
        entries = library_for(config, local_model_dir(vllm_config.model_config.model))
        for entry in entries:
            logger.info("vllm-av: AV %-24s rank %-3d %3d modules  compatibility: %s",
                        entry.name, entry.rank, len(entry.modules), entry.compatibility)
        return vllm_config

    EngineArgs.create_engine_config = create_engine_config

    original_v2 = VllmConfig.use_v2_model_runner

    def use_v2_model_runner(self) -> bool:
        if av_config_from(self.additional_config) is None:
            return original_v2.fget(self)
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
            raise ValueError("vllm-av: AV serving runs on the classic model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        global _runner_logged
        if not _runner_logged:
            _runner_logged = True
            logger.info("vllm-av: AV enabled: using vLLM's classic (V1) model runner")
        return False

    VllmConfig.use_v2_model_runner = property(use_v2_model_runner)
