"""Start and stop a ``vllm-av serve`` on 127.0.0.1 for the reliability runs, and measure its memory.

Used by ``benchmarks/fuzz.py``, ``benchmarks/soak.py`` and ``tests/test_reliability_server.py``.
The server runs in a session of its own, so stopping it kills the API server, the engine core
and every worker together, and its RSS is the sum over that process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import requests

VLLM_AV = str(Path(sys.executable).parent / "vllm-av")
CPU_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.4", "--enforce-eager"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    """The server exited or did not become healthy; the message ends with its log tail."""


@contextmanager
def av_server(model: str | Path, library: str | Path, *flags: str, log: str | Path, timeout: float = 240):
    """Run ``vllm-av serve MODEL --av-path LIBRARY FLAGS...``; yield ``(url, pid)`` once healthy."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    port = free_port()
    command = [VLLM_AV, "serve", str(model), "--av-path", str(library), "--host", "127.0.0.1",
               "--port", str(port), *CPU_FLAGS, *flags]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, Path(log), timeout)
        yield url, process.pid
    finally:
        _stop(process)


def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    raise ServerFailed(f"server not ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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
