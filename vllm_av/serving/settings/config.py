"""Server-side AV settings: parsed once from ``additional_config["av"]``; the one place settings live.

Every process (API server, engine core, workers) sees the same ``additional_config``, and vLLM
hashes it into its compile-cache key, so a cache built without AV is never reused with AV.

Adding a setting is adding one field to :class:`AVConfig` with :func:`setting`: its ``--av-*``
flag (:mod:`.cli_flags`), its place among the request limits ``GET /v1/av`` lists and in the
library cache keys all follow from the field's metadata, as vLLM's ``get_kwargs`` derives its
flags from its config dataclasses.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from vllm_av.format.validate import DEFAULT_MAX_RANK  # `vllm-av extract` and `inspect` warn about AVs above it

CONFIG_KEY = "av"
CPU_BLENDS = ("auto", "native", "dense")
SPARE_SLOTS = 4  # free AV slots beyond the startup library when runtime updates are on and max_loaded is 0


class AVConfigError(ValueError):
    """A bad ``additional_config["av"]`` setting."""


def setting(default=MISSING, *, help: str = "", limit: bool = False, library: tuple[str, ...] = (),
            flag: bool = True, choices: tuple | None = None, path: bool = False):
    """A field of :class:`AVConfig` and everything derived from it, in one place.

    ``help``: the text of its ``--av-*`` flag; ``limit``: a request limit (listed by ``GET /v1/av``);
    ``library``: the libraries its value changes (``avs``, ``values``; part of their cache keys);
    ``flag``: has a command-line flag (False: set by the plugin); ``choices``: the flag's choices;
    ``path``: a directory, made absolute.
    """
    metadata = {"help": help, "limit": limit, "library": library, "flag": flag, "choices": choices, "path": path}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class AVConfig:
    """AV serving settings; each field's meaning is its ``help`` (the ``--av-*`` flag's text)."""

    path: str = setting(help="AV library: one AV adapter directory per AV.", library=("avs",), path=True)
    max_per_request: int = setting(8, help="Most AVs one request may mix.", limit=True)
    max_abs_scale: float = setting(4.0, help="Largest |scale| a request may give one AV.", limit=True)
    max_rank: int = setting(DEFAULT_MAX_RANK, help="Largest AV rank the library may hold.", limit=True,
                            library=("avs",))
    max_name_length: int = setting(64, help="Longest AV name accepted (in the library and in requests).",
                                   limit=True, library=("avs", "values"))
    lenient: bool = setting(False, help="Refuse a broken AV with a one-line warning and serve the rest "
                                        "(default: a broken AV stops the start).", limit=True, library=("avs", "values"))
    # Set to False by the plugin when vLLM's LoRA support was switched on only to carry the AVs:
    # then vLLM's own (empty) LoRA math is skipped on every layer and LoRA requests are refused.
    stock_lora: bool = setting(True, flag=False)
    cpu_blend: str = setting("auto", choices=CPU_BLENDS,
                             help="CPU only: 'native' (a C kernel whose cost grows with the AVs a request uses), "
                                  "'dense' (GEMMs over the whole library), or 'auto' (native when a C compiler "
                                  "builds it, else dense).")
    # Set by the plugin at start (library_digest): vLLM hashes additional_config into its
    # compile-cache key, so with it the key covers the library's contents, not only its path.
    library_digest: str = setting("", flag=False)
    recontrol_path: str = setting("", help="RE-Control value-function library: one `vllm-av recontrol train` "
                                           "directory each (requests then steer with vllm_xargs recontrol, "
                                           "recontrol_alpha, recontrol_steps).", library=("values",), path=True)
    recontrol_max_steps: int = setting(200, help="Most RE-Control steps n one request may ask for.", limit=True)
    recontrol_max_alpha: float = setting(10.0, help="Largest |RE-Control step size α| one request may ask for.",
                                         limit=True)
    allow_runtime_updates: bool = setting(False, help="Serve POST /v1/av/load and /v1/av/unload: AVs load, unload "
                                                      "and are replaced while serving (off by default).",
                                          library=("avs",))
    max_loaded: int = setting(0, help="With --av-allow-runtime-updates: most AVs loaded at once, fixed at start "
                                      "(default 0: the library's size + 4).")

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise AVConfigError("av.path must name the AV library directory")
        for name in ("max_per_request", "max_rank", "max_name_length", "recontrol_max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AVConfigError(f"av.{name} must be a positive integer, got {value!r}")
        for name in ("max_abs_scale", "recontrol_max_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise AVConfigError(f"av.{name} must be a positive finite number, got {value!r}")
        if not isinstance(self.recontrol_path, str):
            raise AVConfigError(f"av.recontrol_path must be a directory path, got {self.recontrol_path!r}")
        if self.cpu_blend not in CPU_BLENDS:
            raise AVConfigError(f"av.cpu_blend must be one of {', '.join(CPU_BLENDS)}; got {self.cpu_blend!r}")
        for name in ("lenient", "allow_runtime_updates"):
            if not isinstance(getattr(self, name), bool):
                raise AVConfigError(f"av.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.max_loaded, bool) or not isinstance(self.max_loaded, int) or self.max_loaded < 0:
            raise AVConfigError(f"av.max_loaded must be a non-negative integer, got {self.max_loaded!r}")
        if self.max_loaded and not self.allow_runtime_updates:
            raise AVConfigError("av.max_loaded needs av.allow_runtime_updates (without it the library is fixed at start)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "AVConfig":
        """Build from the ``av`` dict of ``additional_config``; unknown keys are an error."""
        if not isinstance(raw, dict):
            raise AVConfigError(f"additional_config.av must be an object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise AVConfigError(f"unknown av setting(s) {unknown}; known: {sorted(known)}")
        if "path" not in raw:
            raise AVConfigError("av.path must name the AV library directory")
        values = dict(raw)
        for key in (f.name for f in fields(cls) if f.metadata["path"]):
            if values.get(key) and isinstance(values[key], str):
                values[key] = os.path.abspath(os.path.expanduser(values[key]))
        for key in ("max_abs_scale", "recontrol_max_alpha"):
            if isinstance(values.get(key), int) and not isinstance(values[key], bool):
                values[key] = float(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def capacity(self, library_size: int) -> int:
        """AV slots per layer: the library's size, or with runtime updates ``max_loaded`` (0: size + spares)."""
        if not self.allow_runtime_updates:
            return library_size
        return self.max_loaded or library_size + SPARE_SLOTS


def flagged_settings() -> list[Field]:
    """The settings with an ``--av-*`` flag, in declaration order."""
    return [f for f in fields(AVConfig) if f.metadata["flag"]]


def request_limits(config: AVConfig) -> dict[str, Any]:
    """The request limits of ``config`` (what ``GET /v1/av`` lists)."""
    return {f.name: getattr(config, f.name) for f in fields(AVConfig) if f.metadata["limit"]}


def library_key(config: AVConfig, library: str, model_dir: str | None) -> tuple:
    """What a ``library`` (``avs`` or ``values``) read for ``config`` and ``model_dir`` depends on."""
    return (*(getattr(config, f.name) for f in fields(AVConfig) if library in f.metadata["library"]), model_dir)


def av_config_from(additional_config: dict[str, Any] | None) -> AVConfig | None:
    """The AV settings in a vLLM ``additional_config``, or None when AV is not enabled."""
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    return AVConfig.from_dict(additional_config[CONFIG_KEY])
