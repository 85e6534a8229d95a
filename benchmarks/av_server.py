"""Start and stop a ``vllm-av serve`` on 127.0.0.1 for the reliability runs, and measure its memory.

Used by ``benchmarks/fuzz.py``, ``benchmarks/soak.py`` and ``tests/test_reliability_server.py``.
Its RSS is the sum over the server's process group (API server, engine core, workers).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess

VLLM_AV = str(Path(sys.executable).parent / "vllm-av")


@contextmanager
def av_server(model: str | Path, library: str | Path, *flags: str, log: str | Path, timeout: float = 240):
    """Run ``vllm-av serve MODEL --av-path LIBRARY FLAGS...``; yield ``(url, pid)`` once healthy."""
    server = ServerProcess([VLLM_AV, "serve", str(model), "--av-path", str(library), *CPU_FLAGS, *flags], log)
    server.launch()
    try:
        server.wait_ready(timeout)
        yield server.url, server.pid
    finally:
        server.stop()


def group_rss_mib(pid: int) -> dict[str, float]:
    """Resident memory (MiB) of the processes in the session of ``pid`` (the server, its engine
    core and workers), by process name, plus their ``total``."""
    import psutil

    session = os.getsid(pid)
    by_name: dict[str, float] = {}
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if os.getsid(proc.pid) == session:
                name = proc.info["name"] or str(proc.pid)
                by_name[name] = by_name.get(name, 0.0) + proc.memory_info().rss / 2**20
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    rounded = {name: round(mib, 1) for name, mib in sorted(by_name.items())}
    return {**rounded, "total": round(sum(by_name.values()), 1)}
