"""Parse, validate and canonicalise a request's AV mix.

Accepted forms (all mean the same mix):

* ``"medical_expert:0.8,legal_generic:-0.3"`` -- the OpenAI ``vllm_xargs`` form
* ``{"medical_expert": 0.8, "legal_generic": -0.3}`` -- the offline ``SamplingParams`` form
* ``[["legal_generic", -0.3], ["medical_expert", 0.8]]`` -- the canonical form

The canonical mix is sorted by name with zero scales dropped, so equal mixes share one
prefix-cache salt. An empty canonical mix means the plain base model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection

from vllm_av.format.names import NAME_RE
from vllm_av.serving.settings.config import AVConfig

Mix = tuple[tuple[str, float], ...]

# ASCII digits only: Python's \d and float() also take other scripts' digits ("١", "１").
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)


class MixError(ValueError):
    """A request's AV mix is malformed or breaks a server limit."""


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_scale(name: str, raw: object) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise MixError(f"av scale for {name!r} must be a number, got {type(raw).__name__}")
    if isinstance(raw, str):
        text = raw.strip()
        if not _NUMBER_RE.fullmatch(text):
            raise MixError(f"av scale for {name!r} is not a number: {_short(raw)}")
        raw = text
    try:
        scale = float(raw)
    except OverflowError:  # an int too large for a float
        scale = math.inf
    if not math.isfinite(scale):
        raise MixError(f"av scale for {name!r} must be finite, got {_short(raw)}")
    return scale


def _entries(spec: object, config: AVConfig) -> list[tuple[object, object]]:
    """Split any accepted form into raw (name, scale) pairs, bounding the work up front."""
    limit = config.max_per_request
    if isinstance(spec, str):
        if len(spec) > limit * (config.max_name_length + 32):
            raise MixError(f"av mix string is too long ({len(spec)} characters)")
        if not spec.strip():
            raise MixError("av mix is empty; omit 'av' to use the base model")
        pairs = []
        for item in spec.split(","):
            name, sep, scale = item.partition(":")
            if not sep:
                raise MixError(f"av mix entry {_short(item.strip())} must look like name:scale")
            pairs.append((name.strip(), scale))
        return pairs
    if isinstance(spec, (dict, list, tuple)) and len(spec) > limit:
        raise MixError(f"av mix has {len(spec)} entries; this server allows at most {limit}")
    if isinstance(spec, dict):
        return list(spec.items())
    if isinstance(spec, (list, tuple)):
        pairs = []
        for item in spec:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise MixError(f"av mix list entries must be [name, scale] pairs, got {_short(item)}")
            pairs.append((item[0], item[1]))
        return pairs
    raise MixError(f"av mix must be a string like 'name:0.5,other:-1', got {type(spec).__name__}")


def parse_mix(spec: object, known_names: Collection[str], config: AVConfig) -> Mix:
    """Validate ``spec`` against the library and the limits in ``config``; return the canonical mix.

    Raises :class:`MixError` with a message naming the problem.
    """
    pairs = _entries(spec, config)
    if len(pairs) > config.max_per_request:
        raise MixError(f"av mix has {len(pairs)} entries; this server allows at most {config.max_per_request}")
    mix: dict[str, float] = {}
    for name, raw_scale in pairs:
        if not isinstance(name, str) or not name:
            raise MixError(f"av name must be a non-empty string, got {_short(name)}")
        if len(name) > config.max_name_length:
            raise MixError(f"av name is longer than {config.max_name_length} characters: {_short(name)}")
        if not NAME_RE.fullmatch(name):
            raise MixError(f"av name {_short(name)} has characters outside [A-Za-z0-9_.-]")
        if name not in known_names:
            raise MixError(f"unknown av {name!r}; loaded: {', '.join(sorted(known_names)) or 'none'}")
        if name in mix:
            raise MixError(f"av {name!r} appears more than once in the mix")
        scale = _parse_scale(name, raw_scale)
        if abs(scale) > config.max_abs_scale:
            raise MixError(f"av scale {scale} for {name!r} exceeds this server's limit |scale| <= {config.max_abs_scale}")
        mix[name] = scale
    return tuple(sorted((n, s) for n, s in mix.items() if s != 0.0))


def mix_to_str(mix: Mix) -> str:
    """The canonical text of a mix (exact: floats are written with ``repr``)."""
    return ",".join(f"{name}:{scale!r}" for name, scale in mix)
