"""Parse, validate and canonicalise a request's RE-Control setting.

A request steers its sampled rows with one value function, a step size ``α`` and a step count ``n``:

* OpenAI ``vllm_xargs``: ``{"recontrol": "helpful", "recontrol_alpha": 0.5, "recontrol_steps": 30}``
* offline ``SamplingParams.extra_args``: the same keys, or ``{"recontrol": {"value": "helpful",
  "alpha": 0.5, "steps": 30}}``
* canonical (what the frontend leaves for the worker): ``{"recontrol": ["helpful", 0.5, 30]}``

``α = 0`` or ``n = 0`` means off (the canonical setting is then dropped). The KV cache is never
edited, so a request's KV blocks depend on its tokens only and need no prefix-cache salt.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from vllm_av.serving.protocol import ALPHA_KEY, RECONTROL_KEY, RECONTROL_KEYS, STEPS_KEY
from vllm_av.serving.settings.config import AVConfig

Setting = tuple[str, float, int]  # (value function, α, n)


class RecontrolError(ValueError):
    """A request's RE-Control setting is malformed or breaks a server limit."""


def _alpha(raw: object, config: AVConfig) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise RecontrolError(f"{ALPHA_KEY} must be a number, got {type(raw).__name__}")
    alpha = float(raw)
    if not math.isfinite(alpha) or abs(alpha) > config.recontrol_max_alpha:
        raise RecontrolError(f"{ALPHA_KEY}={raw!r}: |α| must be at most {config.recontrol_max_alpha} "
                             f"(this server's --av-recontrol-max-alpha)")
    return alpha


def _steps(raw: object, config: AVConfig) -> int:
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise RecontrolError(f"{STEPS_KEY} must be a whole number, got {raw!r}")
    if not 0 <= raw <= config.recontrol_max_steps:
        raise RecontrolError(f"{STEPS_KEY}={raw}: must be 0..{config.recontrol_max_steps} "
                             f"(this server's --av-recontrol-max-steps)")
    return raw


def _fields(extra: dict) -> tuple[object, object, object]:
    spec = extra.get(RECONTROL_KEY)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - {"value", "alpha", "steps"})
        if unknown:
            raise RecontrolError(f"{RECONTROL_KEY}: unknown field {unknown[0]!r} (expected value, alpha, steps)")
        if ALPHA_KEY in extra or STEPS_KEY in extra:
            raise RecontrolError(f"give alpha and steps inside {RECONTROL_KEY} or as {ALPHA_KEY}/{STEPS_KEY}, not both")
        return spec.get("value"), spec.get("alpha"), spec.get("steps")
    if isinstance(spec, (list, tuple)):
        if len(spec) != 3:
            raise RecontrolError(f"{RECONTROL_KEY} as a list must be [value, alpha, steps], got {len(spec)} items")
        return tuple(spec)
    return spec, extra.get(ALPHA_KEY), extra.get(STEPS_KEY)


def parse_recontrol(extra: dict, names: Collection[str], config: AVConfig) -> Setting | None:
    """The canonical setting of a request's ``extra_args`` (None: off); raise :class:`RecontrolError`."""
    if not any(key in extra for key in RECONTROL_KEYS):
        return None
    name, alpha, steps = _fields(extra)
    if name is None:
        raise RecontrolError(f"{ALPHA_KEY}/{STEPS_KEY} need {RECONTROL_KEY} (the value function's name)")
    if not isinstance(name, str):
        raise RecontrolError(f"{RECONTROL_KEY} must name a value function, got {type(name).__name__}")
    if name not in names:
        known = ", ".join(sorted(names)[:10]) or "none"
        raise RecontrolError(f"unknown value function {name[:64]!r} (served: {known})")
    if alpha is None or steps is None:
        missing = ALPHA_KEY if alpha is None else STEPS_KEY
        raise RecontrolError(f"{RECONTROL_KEY}={name!r} needs {missing} (step size α and step count n are required)")
    alpha, steps = _alpha(alpha, config), _steps(steps, config)
    if alpha == 0.0 or steps == 0:
        return None
    return name, alpha, steps
