"""Runtime AV updates and tensor parallel, measured on the embedded demo (issue 19).

    python -m benchmarks.runtime_updates --out DIR --results benchmarks/results   # full (~6 min on 2 cores)
    python -m benchmarks.runtime_updates --quick --out DIR                        # CI (tests/test_runtime_bench.py)

1. Updates while serving: the demo model and its nine rank-8 AVs, served with
   ``--av-allow-runtime-updates``. ``--concurrency`` clients stream greedy completions (each its own
   random mix of the startup AVs) without pause. Rounds alternate a quiet window (no update) and an
   update window as long (cycles of: load a new AV, replace it with other files, unload it, back to
   back: the heaviest churn a client can cause).
   Reported: the HTTP latency of each operation (p50 / p99 / max, per kind and overall), output
   tok/s in each window and the update/quiet ratio (median over rounds), and errors (must be 0).
2. Tensor parallel: one offline batch of mixed rows on a TP=1 and a TP=2 engine, both alive in this
   process and run in alternating rounds (both cores for each: "0-1" for TP=1, one core per rank
   for TP=2); output tok/s per round and the TP2/TP1 ratio (median).

Results: ``DIR/runtime_updates[_quick].json``; with ``--results``, also copied there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from vllm_av.cli.demo import DEMO_DATA, FINANCIAL, LEGAL, MEDICAL
from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess

AVS = sorted(p.name for p in (DEMO_DATA / "avs").iterdir() if p.is_dir())
PROMPTS = [MEDICAL, LEGAL, FINANCIAL]
FULL = dict(rounds=5, quiet_s=4.0, concurrency=8, stream_tokens=32, tp_rounds=5, tp_requests=64, tp_tokens=48)
QUICK = dict(rounds=2, quiet_s=1.5, concurrency=4, stream_tokens=16, tp_rounds=1, tp_requests=16, tp_tokens=16)


def log(msg: str) -> None:
    print(msg, flush=True)


def random_mix(rng: random.Random) -> str:
    names = rng.sample(AVS, rng.randint(1, 3))
    return ",".join(f"{name}:{rng.uniform(-1.5, 1.5):.2f}" for name in names)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


# --------------------------------------------------------------------------- 1. updates while serving


class Traffic:
    """Clients that stream completions without pause; every token's arrival time, and every error."""

    def __init__(self, url: str, model: str, concurrency: int, max_tokens: int):
        self.url, self.model, self.concurrency, self.max_tokens = url, model, concurrency, max_tokens
        self.arrivals: list[float] = []
        self.errors: list[str] = []
        self.completed = 0
        self.stop = asyncio.Event()

    def tokens_between(self, start: float, end: float) -> int:
        return sum(1 for t in self.arrivals if start <= t < end)

    async def client(self, session, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            body = {"model": self.model, "prompt": rng.choice(PROMPTS), "max_tokens": self.max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True,
                    "vllm_xargs": {"av": random_mix(rng)}}
            try:
                async with session.post(f"{self.url}/v1/completions", json=body) as response:
                    if response.status != 200:
                        self.errors.append(f"HTTP {response.status}: {(await response.text())[:200]}")
                        continue
                    async for raw in response.content:
                        line = raw.decode().strip()
                        if not line.startswith("data: {"):
                            continue
                        choice = json.loads(line[6:])["choices"][0]
                        now = time.perf_counter()
                        self.arrivals.extend([now] * len(choice.get("token_ids") or []))
                        if choice.get("finish_reason") not in (None, "length"):
                            self.errors.append(f"finish_reason {choice['finish_reason']}")
                self.completed += 1
            except Exception as exc:  # noqa: BLE001 -- counted, reported
                self.errors.append(f"{type(exc).__name__}: {exc}")


async def update(session, url: str, route: str, body: dict) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    async with session.post(f"{url}/v1/av/{route}", json=body) as response:
        text = await response.text()
    return time.perf_counter() - t0, response.status, text


async def drive_updates(url: str, model: str, settings: dict) -> dict:
    """Rounds of a quiet window and an update window under continuous traffic."""
    import aiohttp

    traffic = Traffic(url, model, settings["concurrency"], settings["stream_tokens"])
    connector = aiohttp.TCPConnector(force_close=True)
    latencies: dict[str, list[float]] = {"load": [], "replace": [], "unload": []}
    failures, rounds, done = [], [], 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
                                     connector=connector) as session:
        clients = [asyncio.create_task(traffic.client(session, seed)) for seed in range(settings["concurrency"])]
        await asyncio.sleep(3.0)  # warm-up: every client streaming, the server's first steps done
        for r in range(settings["rounds"]):
            quiet_start = time.perf_counter()
            await asyncio.sleep(settings["quiet_s"])
            start = c = time.perf_counter()
            while c == start or time.perf_counter() - start < settings["quiet_s"]:  # as long as the quiet window
                c = time.perf_counter()
                cycle = len(latencies["load"])
                name, first, second = f"runtime_{cycle}", AVS[cycle % len(AVS)], AVS[(cycle + 1) % len(AVS)]
                for kind, route, body in (
                    ("load", "load", {"name": name, "path": str(DEMO_DATA / "avs" / first)}),
                    ("replace", "load", {"name": name, "path": str(DEMO_DATA / "avs" / second), "replace": True}),
                    ("unload", "unload", {"name": name}),
                ):
                    seconds, status, text = await update(session, url, route, body)
                    latencies[kind].append(seconds)
                    if status != 200:
                        failures.append(f"{kind} {name}: HTTP {status}: {text[:200]}")
            end = time.perf_counter()
            quiet = traffic.tokens_between(quiet_start, start) / (start - quiet_start)
            busy = traffic.tokens_between(start, end) / (end - start)
            ops = sum(map(len, latencies.values())) - done
            done += ops
            rounds.append({"quiet_tok_per_s": quiet, "update_tok_per_s": busy, "update_window_s": end - start,
                           "updates": ops})
            log(f"  round {r + 1}: quiet {quiet:.0f} tok/s; {ops} updates back to back in {end - start:.2f} s, "
                f"{busy:.0f} tok/s")
        traffic.stop.set()
        await asyncio.gather(*clients)
    every = [s for values in latencies.values() for s in values]
    summary = {kind: {"n": len(v), "p50_ms": pct(v, 50), "p99_ms": pct(v, 99), "max_ms": max(v) * 1000}
               for kind, v in latencies.items()}
    summary["all"] = {"n": len(every), "p50_ms": pct(every, 50), "p99_ms": pct(every, 99), "max_ms": max(every) * 1000}
    return {
        "latency": summary,
        "rounds": rounds,
        "update_over_quiet_tok_per_s": statistics.median(r["update_tok_per_s"] / r["quiet_tok_per_s"] for r in rounds),
        "update_failures": failures,
        "stream_errors": len(traffic.errors),
        "stream_error_examples": sorted(set(traffic.errors))[:3],
        "streams_completed": traffic.completed,
    }


def run_updates(settings: dict, log_dir: Path) -> dict:
    model = DEMO_DATA / "model"
    command = [str(Path(sys.executable).parent / "vllm-av"), "serve", str(model), "--av-path", str(DEMO_DATA / "avs"),
               "--av-allow-runtime-updates", "--max-num-seqs", "32", *CPU_FLAGS, "--max-model-len", "256"]
    with ServerProcess(command, log_dir / "server.log") as server:
        log(f"server ready in {server.start_s:.0f} s: {' '.join(command)}")
        result = asyncio.run(drive_updates(server.url, str(model), settings))
    result["server_command"] = command
    return result


# --------------------------------------------------------------------------- 2. tensor parallel


def run_tensor_parallel(settings: dict) -> dict:
    from vllm import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(settings["tp_requests"])]
    params = [SamplingParams(max_tokens=settings["tp_tokens"], temperature=0, ignore_eos=True,
                             extra_args={"av": random_mix(rng)}) for _ in prompts]
    engine = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=64, gpu_memory_utilization=0.4,
                  additional_config={"av": {"path": str(DEMO_DATA / "avs")}})
    engines = {}
    for size, binding in ((1, "0-1"), (2, "0|1")):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding  # read by the workers as they start
        engines[size] = LLM(str(DEMO_DATA / "model"), tensor_parallel_size=size, **engine)
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
    outputs, rounds = {}, []
    for r in range(settings["tp_rounds"] + 1):  # round 0 warms both engines up and is not reported
        order = (1, 2) if r % 2 else (2, 1)
        speed = {}
        for size in order:
            t0 = time.perf_counter()
            result = engines[size].generate(prompts, params, use_tqdm=False)
            speed[size] = sum(len(o.outputs[0].token_ids) for o in result) / (time.perf_counter() - t0)
            outputs[size] = [list(o.outputs[0].token_ids) for o in result]
        if r:
            rounds.append({"tp1_tok_per_s": speed[1], "tp2_tok_per_s": speed[2], "first": order[0]})
            log(f"  round {r}: TP=1 {speed[1]:.0f} tok/s, TP=2 {speed[2]:.0f} tok/s ({speed[2] / speed[1]:.2f}x)")
    engines.clear()
    same = sum(a == b for a, b in zip(outputs[1], outputs[2]))
    return {
        "rounds": rounds,
        "tp2_over_tp1": statistics.median(r["tp2_tok_per_s"] / r["tp1_tok_per_s"] for r in rounds),
        "requests": len(prompts), "max_tokens": settings["tp_tokens"],
        "identical_outputs": same,
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the JSON and the server log")
    parser.add_argument("--results", type=Path, help="also copy the JSON here (benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="the CI form: fewer rounds, requests and tokens")
    parser.add_argument("--skip-tp", action="store_true", help="measure the updates only")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    settings = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"settings": settings, "date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count()}
    log(f"1. {settings['rounds']} rounds of {settings['quiet_s']} s quiet + {settings['quiet_s']} s of updates while "
        f"{settings['concurrency']} clients stream")
    report["updates"] = run_updates(settings, args.out)
    if not args.skip_tp:
        log(f"2. tensor parallel: {settings['tp_requests']} mixed requests x {settings['tp_tokens']} tokens")
        report["tensor_parallel"] = run_tensor_parallel(settings)
    name = "runtime_updates_quick.json" if args.quick else "runtime_updates.json"
    (args.out / name).write_text(json.dumps(report, indent=2))
    if args.results:
        shutil.copy(args.out / name, args.results / name)
    u = report["updates"]
    log(f"updates: p50 {u['latency']['all']['p50_ms']:.1f} ms, p99 {u['latency']['all']['p99_ms']:.1f} ms over "
        f"{u['latency']['all']['n']}; tok/s during updates / quiet {u['update_over_quiet_tok_per_s']:.3f}; "
        f"failures {len(u['update_failures'])}, stream errors {u['stream_errors']}")
    if "tensor_parallel" in report:
        t = report["tensor_parallel"]
        log(f"tensor parallel: TP2/TP1 {t['tp2_over_tp1']:.3f}; identical outputs {t['identical_outputs']}/{t['requests']}")
    return 0 if not u["update_failures"] and not u["stream_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
