"""``--enable-av --av-path DIR`` and one ``--av-*`` flag per :class:`AVConfig` setting on vLLM's engine arguments.

The flags become ``additional_config["av"]`` (the supported, hashed place for plugin settings),
so ``vllm serve``, ``--config x.yaml`` and ``vllm-av serve`` all reach the same settings. A bad
library stops a CLI start here, with one line, before any engine process starts.
"""

from __future__ import annotations

import os

from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.settings.config import CONFIG_KEY, CPU_BLENDS, AVConfig, AVConfigError
from vllm_av.serving.library.avs import AVLibraryError, library_for, local_model_dir
from vllm_av.serving.library.values import value_library_for


def install() -> None:
    """``--enable-av --av-path DIR`` and one ``--av-*`` flag per :class:`AVConfig` setting."""
    original_add = points.ENGINE_ADD_CLI_ARGS.get().__func__  # a staticmethod
    original_from = points.ENGINE_FROM_CLI_ARGS.get().__func__  # a classmethod

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
        group.add_argument("--av-recontrol-path", type=str, default=None,
                           help="RE-Control value-function library: one `vllm-av recontrol train` directory each "
                                "(requests then steer with vllm_xargs recontrol, recontrol_alpha, recontrol_steps).")
        group.add_argument("--av-recontrol-max-steps", type=int, default=defaults.recontrol_max_steps,
                           help="Most RE-Control steps n one request may ask for.")
        group.add_argument("--av-recontrol-max-alpha", type=float, default=defaults.recontrol_max_alpha,
                           help="Largest |RE-Control step size α| one request may ask for.")
        group.add_argument("--av-allow-runtime-updates", action="store_true",
                           help="Serve POST /v1/av/load and /v1/av/unload: AVs load, unload and are replaced "
                                "while serving (off by default).")
        group.add_argument("--av-max-loaded", type=int, default=defaults.max_loaded,
                           help="With --av-allow-runtime-updates: most AVs loaded at once, fixed at start "
                                "(default 0: the library's size + 4).")
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
                "recontrol_path": os.path.abspath(args.av_recontrol_path) if args.av_recontrol_path else "",
                "recontrol_max_steps": args.av_recontrol_max_steps,
                "recontrol_max_alpha": args.av_recontrol_max_alpha,
                "allow_runtime_updates": args.av_allow_runtime_updates,
                "max_loaded": args.av_max_loaded,
            }
            if args.av_allow_runtime_updates and (getattr(args, "api_server_count", None) or 1) > 1:
                # each API server would keep its own view of the library
                raise SystemExit("vllm-av: error: --av-allow-runtime-updates needs one API server "
                                 f"(got --api-server-count {args.api_server_count})")
            result.additional_config = {**(result.additional_config or {}), CONFIG_KEY: settings}
            # API server processes beyond the first (--api-server-count, which --data-parallel-size
            # defaults to N) re-read these args before this plugin is loaded there: keep the AV
            # settings where vLLM's own parsing finds them.
            args.additional_config = result.additional_config
            _validate_before_start(settings, getattr(args, "model", None))
        elif getattr(args, "av_path", None) or getattr(args, "av_recontrol_path", None):
            flag = "--av-path" if getattr(args, "av_path", None) else "--av-recontrol-path"
            raise SystemExit(f"vllm-av: error: {flag} needs --enable-av")
        return result

    points.ENGINE_ADD_CLI_ARGS.replace(staticmethod(add_cli_args))
    points.ENGINE_FROM_CLI_ARGS.replace(classmethod(from_cli_args))


def _validate_before_start(settings: dict, model: str | None) -> None:
    """Fail a CLI start with one line naming the bad file, before any engine process starts."""
    try:
        config, model_dir = AVConfig.from_dict(settings), local_model_dir(model or "")
        library_for(config, model_dir)
        value_library_for(config, model_dir)
    except (AVConfigError, AVLibraryError) as exc:
        raise SystemExit(f"vllm-av: error: {exc}") from None
