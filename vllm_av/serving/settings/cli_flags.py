"""``--enable-av --av-path DIR`` and one ``--av-*`` flag per :class:`AVConfig` setting on vLLM's engine arguments.

The flags are generated from the settings' field metadata (:func:`vllm_av.serving.settings.config.setting`)
and become ``additional_config["av"]`` (the supported, hashed place for plugin settings), so
``vllm serve``, ``--config x.yaml`` and ``vllm-av serve`` all reach the same settings. A bad
library stops a CLI start here, with one line, before any engine process starts.
"""

from __future__ import annotations

import os

from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.library.avs import AVLibraryError, library_for, local_model_dir
from vllm_av.serving.library.values import value_library_for
from vllm_av.serving.settings.config import CONFIG_KEY, AVConfig, AVConfigError, flagged_settings


def flag_of(name: str) -> str:
    """The command-line flag of setting ``name``: ``max_rank`` -> ``--av-max-rank``."""
    return "--av-" + name.replace("_", "-")


def add_av_arguments(parser) -> None:
    """The ``AlignmentVectors`` argument group: ``--enable-av`` and every flagged setting."""
    defaults = AVConfig(path="-")
    group = parser.add_argument_group("AlignmentVectors", "Per-request mixes of Alignment Vectors (vllm-av)")
    group.add_argument("--enable-av", action="store_true", help="Serve the AV library given by --av-path.")
    for setting in flagged_settings():
        meta, default = setting.metadata, getattr(defaults, setting.name)
        if meta["path"]:
            group.add_argument(flag_of(setting.name), type=str, default=None, help=meta["help"])
        elif isinstance(default, bool):
            group.add_argument(flag_of(setting.name), action="store_true", help=meta["help"])
        else:
            group.add_argument(flag_of(setting.name), type=type(default), default=default, choices=meta["choices"],
                               help=meta["help"])


def settings_from(args) -> dict:
    """``additional_config["av"]`` from parsed flags (directories made absolute; an unset optional one is "")."""
    settings = {}
    for setting in flagged_settings():
        value = getattr(args, "av_" + setting.name)
        if setting.metadata["path"]:
            value = os.path.abspath(value) if value else ""
        settings[setting.name] = value
    return settings


def install() -> None:
    """Add the flags to vLLM's engine arguments and turn them into ``additional_config["av"]``."""
    original_add = points.ENGINE_ADD_CLI_ARGS.get().__func__  # a staticmethod
    original_from = points.ENGINE_FROM_CLI_ARGS.get().__func__  # a classmethod

    def add_cli_args(parser):
        parser = original_add(parser)
        add_av_arguments(parser)
        return parser

    def from_cli_args(cls, args):
        result = original_from(cls, args)
        if getattr(args, "enable_av", False):
            if not args.av_path:
                raise SystemExit("vllm-av: error: --enable-av needs --av-path DIR")
            settings = settings_from(args)
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
