"""Per-step host cost of the plugin: filling the AV tables for a batch (``AVWorkerState.update``).

Both table forms: ``op`` (index/scale, what the CUDA kernel and the CPU C kernel read; the copy
to the GPU is not included) and ``dense`` (the dense CPU blend's coefficient table, rank 16: 1024
floats per token).
Decode steps (one token per request) at 1, 64, 256 and 1024 running requests, each request with
its own random mix of up to 8 AVs from a library of 64, after the mixes are cached (the steady
state: a request's mix is parsed once, when it is first scheduled). Also the first step of a
fresh batch, which parses every mix. Median of repeated runs, in microseconds.

    python benchmarks/host_overhead.py [--json benchmarks/results/host_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch

from vllm_av.config import AVConfig
from vllm_av.library import AVEntry
from vllm_av.worker import AVTables, AVWorkerState

LIBRARY = [f"av{i:02d}" for i in range(64)]
M = 8


def fake_requests(n: int, rng: np.random.Generator) -> dict:
    reqs = {}
    for i in range(n):
        k = int(rng.integers(1, M + 1))
        names = rng.choice(LIBRARY, size=k, replace=False)
        mix = ",".join(f"{name}:{rng.uniform(-2, 2):.4f}" for name in names)
        reqs[f"req-{i}"] = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={"av": mix}))
    return reqs


RANK = 16


def new_state(max_seqs: int, form: str) -> AVWorkerState:
    entries = [AVEntry(name=n, path=n, rank=RANK, modules=()) for n in LIBRARY]
    config = AVConfig(path="lib", max_per_request=M)
    tables = AVTables(8192, M, len(LIBRARY), RANK, torch.device("cpu"), dense=form == "dense")
    return AVWorkerState(entries, config, tables, max_seqs)


def measure(n: int, repeats: int, form: str) -> dict:
    rng = np.random.default_rng(n)
    reqs = fake_requests(n, rng)
    order = list(reqs)
    counts = np.ones(n, dtype=np.int32)
    cold = []
    for _ in range(5):
        state = new_state(max(n, 256), form)
        t0 = time.perf_counter()
        state.update(order, counts, reqs)
        cold.append(time.perf_counter() - t0)
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state.update(order, counts, reqs)
        warm.append(time.perf_counter() - t0)
    return {
        "form": form,
        "requests": n,
        "steady_us_median": statistics.median(warm) * 1e6,
        "steady_us_p90": float(np.percentile(warm, 90)) * 1e6,
        "first_step_us_median": statistics.median(cold) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = [measure(n, args.repeats, form) for form in ("op", "dense") for n in (1, 64, 256, 1024)]
    print(f"{'form':>6} {'requests':>8} {'steady p50 us':>14} {'steady p90 us':>14} {'first step us':>14}")
    for r in rows:
        print(f"{r['form']:>6} {r['requests']:>8} {r['steady_us_median']:>14.1f} {r['steady_us_p90']:>14.1f} "
              f"{r['first_step_us_median']:>14.1f}")
    if args.json:
        meta = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/host_overhead.py", "max_per_request": M,
                "library_size": len(LIBRARY), "rank": RANK}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
