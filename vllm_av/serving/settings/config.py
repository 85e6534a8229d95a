"""Server-side AV settings: parsed once from ``additional_config["av"]``; the one place limits live.

Every process (API server, engine core, workers) sees the same ``additional_config``, and vLLM
hashes it into its compile-cache key, so a cache built without AV is never reused with AV.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

CONFIG_KEY = "av"
CPU_BLENDS = ("auto", "native", "dense")
SPARE_SLOTS = 4  # free AV slots beyond the startup library when runtime updates are on and max_loaded is 0
DEFAULT_MAX_RANK = 64  # --av-max-rank; `vllm-av extract` and `inspect` warn about AVs above it


class AVConfigError(ValueError):
    """A bad ``additional_config["av"]`` setting."""


@dataclass(frozen=True)
class AVConfig:
    """AV serving settings.

    path: the library directory (one sub-directory per AV).
    max_per_request: most AVs one request may mix (M, the width of the per-token tables).
    max_abs_scale: largest |scale| a request may give one AV.
    max_rank: largest AV rank the library may hold.
    max_name_length: longest AV name accepted (names are ``[A-Za-z0-9_.-]+``).
    lenient: refuse a broken AV with a one-line warning and serve the rest (default: a broken
        AV stops the start).
    stock_lora: also serve ordinary LoRA requests. Set to False by the plugin when vLLM's LoRA
        support was switched on only to carry the AVs: then vLLM's own (empty) LoRA math is
        skipped on every layer and LoRA requests are refused.
    cpu_blend: how CPU layers blend: ``native`` (the C kernel: cost grows with the AVs each
        request uses), ``dense`` (GEMMs over the whole library), or ``auto`` (native when the
        kernel builds here, else dense).
    library_digest: set by the plugin at start (:func:`vllm_av.serving.library.avs.library_digest`):
        vLLM hashes ``additional_config`` into its compile-cache key, so with it the key covers
        the library's contents, not only its path.
    recontrol_path: the RE-Control value-function library (one directory per value function,
        made by ``vllm-av recontrol train``); empty: RE-Control off.
    recontrol_max_steps: most steering steps ``n`` one request may ask for.
    recontrol_max_alpha: largest |step size α| one request may ask for.
    allow_runtime_updates: serve ``POST /v1/av/load`` and ``/v1/av/unload`` (and the offline
        :class:`vllm_av.serving.front.runtime.AVRuntime`): AVs load, unload and are replaced while serving.
    max_loaded: most AVs loaded at once with runtime updates on (the fixed number of AV slots every
        layer holds from the start); 0: the startup library's size + :data:`SPARE_SLOTS`.
    """

    path: str
    max_per_request: int = 8
    max_abs_scale: float = 4.0
    max_rank: int = DEFAULT_MAX_RANK
    max_name_length: int = 64
    lenient: bool = False
    stock_lora: bool = True
    cpu_blend: str = "auto"
    library_digest: str = ""
    recontrol_path: str = ""
    recontrol_max_steps: int = 200
    recontrol_max_alpha: float = 10.0
    allow_runtime_updates: bool = False
    max_loaded: int = 0

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
        for key in ("path", "recontrol_path"):
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


def av_config_from(additional_config: dict[str, Any] | None) -> AVConfig | None:
    """The AV settings in a vLLM ``additional_config``, or None when AV is not enabled."""
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    return AVConfig.from_dict(additional_config[CONFIG_KEY])
