"""Build and load the C blend kernel (``cpu_blend.c``) for this machine, once per process.

The kernel is compiled at first use with the system C compiler (``$CC``, else ``cc``) at
``-O3 -march=native -fopenmp`` (without OpenMP where the compiler has none: one thread) -- as
torch inductor does for its CPU code -- into a cache directory
(``$VLLM_AV_CACHE_DIR``, else ``$XDG_CACHE_HOME/vllm-av``, else ``~/.cache/vllm-av``), keyed by
the source, the compiler and this CPU's feature flags, so a cache shared between machines never
hands one a binary built for another. Concurrent processes build to a temporary name and
rename atomically. Without a working compiler :func:`load` returns None and says why; the
caller falls back to the dense path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

logger = logging.getLogger("vllm.av")

SOURCE = Path(__file__).with_name("cpu_blend.c")
FLAGS = ["-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC"]


class AVWeights(ctypes.Structure):
    """Mirror of ``av_weights`` in ``cpu_blend.c``."""

    _fields_ = [
        ("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("rank_of", ctypes.c_void_p), ("out_size", ctypes.c_void_p),
        ("num_slices", ctypes.c_int64), ("num_avs", ctypes.c_int64), ("max_rank", ctypes.c_int64), ("in_", ctypes.c_int64),
    ]


def cache_dir() -> Path:
    """Where built kernels are kept."""
    if os.environ.get("VLLM_AV_CACHE_DIR"):
        return Path(os.environ["VLLM_AV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vllm-av"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(compiler: str, flags: list[str], out: Path) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version, " ".join(flags), platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = out / f"cpu_blend-{key}.so"
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=out)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class CPUKernel(NamedTuple):
    """The kernel's entry points (ctypes): float32 ``x``/``y``, and bfloat16 ones summed in float32."""

    f32: Callable
    bf16: Callable


@functools.lru_cache(maxsize=None)
def load(extra_flags: tuple[str, ...] = ()) -> CPUKernel | None:
    """The built kernel's entry points, or None when it cannot be built here (logged once).

    ``extra_flags`` (tests): more compiler flags, e.g. ``("-DLANES=8",)`` for the non-AVX-512 width.
    """
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        logger.warning("vllm-av: no C compiler (%s) found; the CPU blend runs dense over the whole library", compiler)
        return None
    try:
        try:  # OpenMP: large calls use torch's threads (the runtime torch loaded, found by its soname)
            path = _build(compiler, [*FLAGS, "-fopenmp", *extra_flags], cache_dir())
        except RuntimeError as exc:
            logger.info("vllm-av: the CPU blend kernel builds without OpenMP here (one thread): %s", exc)
            path = _build(compiler, [*FLAGS, *extra_flags], cache_dir())
        library = ctypes.CDLL(str(path))
        kernel = CPUKernel(library.av_blend_f32, library.av_blend_bf16)
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as exc:
        logger.warning("vllm-av: could not build the CPU blend kernel (%s); the CPU blend runs dense", exc)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in kernel:
        fn.argtypes = [ctypes.POINTER(AVWeights), p, i64, p, i64, p, p, i64, i64]
        fn.restype = ctypes.c_int
    return kernel
