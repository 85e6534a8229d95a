"""``vllm-av demo``: build the embedded tiny model and AV library, serve it, and query it.

Starts ``vllm-av serve`` on 127.0.0.1 (CPU works), sends the same prompt under several mixes
at once (one batch, one mix per request), prints what each mix produced, and stops the server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEMO_MIXES = [None, "alpha:1", "alpha:-1", "beta:0.5,gamma:1.5", "alpha:0.8,beta:-0.3,gamma:2"]
SERVER_FLAGS = ["--dtype", "float32", "--max-model-len", "512", "--gpu-memory-utilization", "0.4", "--enforce-eager"]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}; see {log}")
        try:
            _get(f"{url}/v1/av")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    raise RuntimeError(f"the server was not ready in {timeout:.0f} s; see {log}")


def run_demo(workdir: str, prompt: str, max_tokens: int) -> int:
    """Build (or reuse) the demo under ``workdir``, serve it, print one completion per mix."""
    from vllm_av.testing import build_demo

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    root = Path(workdir)
    print(f"[1/3] building the tiny model and AV library in {root} ...", flush=True)
    model, library = build_demo(root)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    command = [sys.executable, "-m", "vllm_av.cli", "serve", str(model), "--av-path", str(library),
               "--host", "127.0.0.1", "--port", str(port), *SERVER_FLAGS]
    print(f"[2/3] starting: vllm-av serve {model} --av-path {library} ... (log: {log})", flush=True)
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(url, process, log)
        listing = _get(f"{url}/v1/av")
        print("[3/3] GET /v1/av:", ", ".join(f"{a['name']} (rank {a['rank']}, {a['compatibility']})" for a in listing["data"]))
        print(f"\nprompt: {prompt!r}; one batch, one mix per request:\n")

        def ask(mix):
            body = {"model": str(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            if mix:
                body["vllm_xargs"] = {"av": mix}
            return _post(f"{url}/v1/completions", body)

        with ThreadPoolExecutor(len(DEMO_MIXES)) as pool:
            replies = list(pool.map(ask, DEMO_MIXES))
        for mix, reply in zip(DEMO_MIXES, replies):
            print(f"  {mix or '(base model)':<32} -> {reply['choices'][0]['text']!r}")
        bad = _post(f"{url}/v1/completions", {"model": str(model), "prompt": prompt, "vllm_xargs": {"av": "delta:1"}})
        print(f"\n  a bad mix ('delta:1') is refused: {bad['error']['code']} {bad['error']['message']}")
        return 0
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
