"""Per-step host cost of the plugin: filling the AV tables for a batch (``AVWorkerState.update``).

Both table forms: ``op`` (index/scale, what the CUDA kernel and the CPU C kernel read; the copy
to the GPU is not included) and ``dense`` (the dense CPU blend's coefficient table: one float per
token and AV, 64).
Decode steps (one token per request) at 1, 64, 256 and 1024 running requests, each request with
its own random mix of up to 8 AVs from a library of 64, after the mixes are cached (a request's
mix is parsed once, when it is first scheduled), in three cases:

* ``changed``: the batch differs from the last step's (here by one request, alternating between
  two batches): the tables are filled in full. What continuous batching pays when requests join
  or finish; the issue's target (<= 50 us at 256 requests) is about this case.
* ``repeat``: the same batch as the last step (requests, order, token counts): the tables
  already hold it and the update returns after comparing.
* ``first step``: a fresh batch, which parses every mix.

Both model runners' step paths, side by side in one run: ``v1`` (the classic runner: the
scheduler's token counts, the runner's own requests) and ``mrv2`` (Model Runner V2: token counts
from the ``InputBatch``'s ``query_start_loc``, mixes from the requests the hooks keep; a changed
step also pays the hooks' bookkeeping of the request that left and the one that joined).

Median of repeated runs, in microseconds.

    python benchmarks/host_overhead.py [--quick] [--json benchmarks/results/host_overhead.json]
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

from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.library.avs import AVEntry
from vllm_av.serving.worker.runner_hooks import fill_step, fill_tables_mrv2, record_new_requests
from vllm_av.serving.blend.base import COEFFICIENTS, ENTRIES
from vllm_av.serving.worker.state import AVWorker
from vllm_av.serving.worker.tables import AVWorkerState, make_tables

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


def new_state(max_seqs: int, form: str) -> AVWorker:
    """A worker's AV state as the runner hooks see it (tables in ``form``: ``op`` or ``dense``)."""
    entries = [AVEntry(name=n, path=n, rank=RANK, modules=()) for n in LIBRARY]
    config = AVConfig(path="lib", max_per_request=M)
    tables = make_tables(COEFFICIENTS if form == "dense" else ENTRIES, 8192, M, len(LIBRARY), torch.device("cpu"))
    return AVWorker(config, backend=None, mixes=AVWorkerState(entries, config, tables, max_seqs), layers={},
                    needs_lora_mapping=False)


def step_us(step, batches: list, repeats: int) -> tuple[float, float]:
    """Median and p90 of ``step(batch)`` over ``repeats`` steps cycling through ``batches``."""
    times = []
    for i in range(repeats):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, float(np.percentile(times, 90)) * 1e6


def runner_steps(runner: str, state: AVWorker, reqs: dict, n: int):
    """The per-step work of ``runner``'s hooks, and the two batches a changed step alternates between."""
    order = list(reqs)[:n]
    other = order[:-1] + [list(reqs)[n]]  # one request finished, another joined
    counts = np.ones(n, dtype=np.int32)
    if runner == "v1":
        return (lambda batch: fill_step(state, batch, counts, reqs)), order, other
    state.requests.update({rid: reqs[rid] for rid in order})
    layout = np.arange(n + 1, dtype=np.int32)  # query_start_loc of a decode step
    batches = {id(b): SimpleNamespace(req_ids=b, num_reqs=n, query_start_loc_np=layout) for b in (order, other)}

    def step(batch):
        left, joined = (other[-1], order[-1]) if batch is order else (order[-1], other[-1])
        if joined not in state.requests:  # the batch changed: MRV2 removes one request, adds one
            state.requests.pop(left, None)
            record_new_requests(state, SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id=joined, **vars(reqs[joined]))]))
        fill_tables_mrv2(state, batches[id(batch)])

    return step, order, other


def measure(n: int, repeats: int, form: str, runner: str) -> dict:
    rng = np.random.default_rng(n)
    reqs = fake_requests(n + 1, rng)
    cold = []
    for _ in range(5):
        state = new_state(max(n, 256), form)
        step, order, other = runner_steps(runner, state, reqs, n)
        t0 = time.perf_counter()
        step(order)
        cold.append(time.perf_counter() - t0)
    step(other)  # both batches' mixes parsed
    changed, changed_p90 = step_us(step, [order, other], repeats)
    repeat, _ = step_us(step, [order], repeats)
    return {
        "runner": runner,
        "form": form,
        "requests": n,
        "changed_us_median": changed,
        "changed_us_p90": changed_p90,
        "repeat_us_median": repeat,
        "first_step_us_median": statistics.median(cold) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="CI form: 100 repeats, 1 and 64 requests")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    repeats, sizes = (100, (1, 64)) if args.quick else (args.repeats, (1, 64, 256, 1024))
    # the runners interleaved per size, so both see the same machine state
    rows = [measure(n, repeats, form, runner) for form in ("op", "dense") for n in sizes for runner in ("v1", "mrv2")]
    print(f"{'runner':>6} {'form':>6} {'requests':>8} {'changed p50 us':>15} {'changed p90 us':>15} "
          f"{'repeat p50 us':>14} {'first step us':>14}")
    for r in rows:
        print(f"{r['runner']:>6} {r['form']:>6} {r['requests']:>8} {r['changed_us_median']:>15.1f} "
              f"{r['changed_us_p90']:>15.1f} {r['repeat_us_median']:>14.1f} {r['first_step_us_median']:>14.1f}")
    for form in ("op", "dense"):
        for n in sizes:
            v1, v2 = (next(r for r in rows if (r["runner"], r["form"], r["requests"]) == (k, form, n)) for k in ("v1", "mrv2"))
            print(f"mrv2/v1 {form:>5} {n:>5} requests: changed {v2['changed_us_median'] / v1['changed_us_median']:.2f}x, "
                  f"repeat {v2['repeat_us_median'] / v1['repeat_us_median']:.2f}x")
    if args.json:
        meta = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/host_overhead.py", "max_per_request": M,
                "library_size": len(LIBRARY), "rank": RANK}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
