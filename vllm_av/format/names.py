"""The one rule for names: of AVs and value functions, in libraries, requests, runtime loads and ``extract``."""

from __future__ import annotations

import re

NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
MAX_NAME_LENGTH = 64  # what `vllm-av extract` writes, and a server's default --av-max-name-length


def name_problem(name: object, max_length: int = MAX_NAME_LENGTH, noun: str = "AV") -> str | None:
    """Why ``name`` cannot name an AV (or ``noun``), or None when it can."""
    if isinstance(name, str) and NAME_RE.fullmatch(name) and len(name) <= max_length:
        return None
    return f"{noun} name {name!r} must be 1-{max_length} characters of [A-Za-z0-9_.-]"
