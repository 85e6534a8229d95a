"""A vLLM OpenAI server as a child process on 127.0.0.1: start, wait until healthy, stop.

Used by ``vllm-av demo``, the tests and the benchmarks. The server runs in a session of its
own, so stopping it ends the API server, the engine core and every worker together.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

# Flags for the tiny float32 models on CPU. On CPU, --gpu-memory-utilization is the share of
# the NUMA node's memory vLLM insists is free at start; its default (0.92) fails whenever anything
# else runs. The KV cache itself is VLLM_CPU_KVCACHE_SPACE (GiB).
CPU_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.4", "--enforce-eager"]


class ServerFailed(RuntimeError):
    """The server exited or did not become healthy; the message ends with its log tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``command`` (a server command line without --host/--port) served on a free local port.

    ``with ServerProcess(cmd, log) as server:`` starts it and waits until ``/health`` answers;
    or call :meth:`launch`, :meth:`wait_ready` and :meth:`stop` to start several side by side.
    """

    def __init__(self, command: list[str], log: str | Path):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.command = [*command, "--host", "127.0.0.1", "--port", str(port)]
        self.log = Path(log)
        self.process: subprocess.Popen | None = None
        self.start_s = 0.0  # launch to healthy
        self._launched = 0.0

    @property
    def pid(self) -> int:
        return self.process.pid

    def launch(self) -> None:
        """Start the process and return at once."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        self._launched = time.time()
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        """Block until ``GET /health`` answers 200; raise :class:`ServerFailed` if it exits or times out."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(f"server exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.start_s = time.time() - self._launched
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        raise ServerFailed(f"server not ready in {timeout:.0f} s:\n{self._log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM the server's process group and wait until every process in it is gone
        (engine core and workers outlive the API server briefly); SIGKILL what is left after ``timeout``."""
        if self.process is None:
            return
        group = self.process.pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.process.poll()  # reap the leader so the group can empty
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else "(no log)"

    def __enter__(self) -> "ServerProcess":
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
