"""The C kernel's row split over torch's threads, side by side: from 32 rows (the default) against from 128.

Two builds of ``kernels/cpu_blend.c`` differing only in ``MIN_ROWS_PER_THREAD`` (16 and 64 rows per
thread) blend the same two decoder layers of the serving benchmark's tiny model (``LINEARS`` of
``cpu_blend_bench.py``), every row with its own random mix of 4 AVs, interleaved in one process.
Per build: the blend alone, and each linear's base GEMM followed by its blend (as a layer runs in
serving, where torch's threads are still spinning from the GEMM when the blend starts). Medians,
µs per two layers (8 calls).

    python benchmarks/cpu_thread_split_bench.py [--threads 2] [--json benchmarks/results/cpu_thread_split.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from cpu_blend_bench import LINEARS, median_us, random_tables
from vllm_av.serving.blend.native import NativeCPUBlend
from vllm_av.kernels.cpu import load

BUILDS = {"split from 32 rows": 16, "split from 128 rows": 64}  # name: MIN_ROWS_PER_THREAD
CASES = [(8, 4, t) for t in (16, 32, 48, 64, 128)] + [(64, 16, t) for t in (32, 64)]  # (AVs, rank, tokens)


def measure(num_avs: int, rank: int, tokens: int, repeats: int) -> dict:
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(tokens + num_avs)
    kernels = {name: load((f"-DMIN_ROWS_PER_THREAD={rows}",)) for name, rows in BUILDS.items()}
    calls = {"base GEMMs": [], **{f"blend, {n}": [] for n in BUILDS}, **{f"GEMM + blend, {n}": [] for n in BUILDS}}
    for d_in, slices in LINEARS * 2:
        a = torch.randn(len(slices), num_avs, rank, d_in, generator=gen) * 0.1
        b = torch.randn(num_avs, sum(slices), rank, generator=gen) * 0.1
        x, y = torch.randn(tokens, d_in, generator=gen), torch.randn(tokens, sum(slices), generator=gen)
        index, scale = random_tables(tokens, num_avs, gen)
        base = ops.create_onednn_mm(torch.randn(sum(slices), d_in, generator=gen).t(), 32)
        calls["base GEMMs"].append(lambda x=x, h=base: ops.onednn_mm(h, x, None))
        for name, kernel in kernels.items():
            blend = NativeCPUBlend(kernel, a, b, slices, [rank] * num_avs)
            calls[f"blend, {name}"].append(lambda y=y, x=x, i=index, s=scale, f=blend: f(y, x, i, s))
            calls[f"GEMM + blend, {name}"].append(
                lambda x=x, h=base, i=index, s=scale, f=blend: f(ops.onednn_mm(h, x, None), x, i, s))
    times = {name: [] for name in calls}
    for _ in range(5):  # interleaved: each build sees the machine's slow and fast spells alike
        for name, c in calls.items():
            times[name].append(median_us(c, repeats))
    return {"num_avs": num_avs, "rank": rank, "tokens": tokens, **{n: sorted(t)[2] for n, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the split needs 2 or more)")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if load() is None:
        raise SystemExit("the C blend kernel did not build here (see the warning above)")
    rows = [measure(n, r, t, args.repeats) for n, r, t in CASES]
    new, old = BUILDS
    print(f"two decoder layers, float32, {args.threads} torch threads, us (median)")
    print(f"{'AVs':>4} {'rank':>4} {'tokens':>6} {'GEMMs':>7} {'blend new':>9} {'old':>7} {'new/old':>7} {'GEMM+blend new':>14} {'old':>7}")
    for r in rows:
        print(f"{r['num_avs']:>4} {r['rank']:>4} {r['tokens']:>6} {r['base GEMMs']:>7.1f} {r[f'blend, {new}']:>9.1f} "
              f"{r[f'blend, {old}']:>7.1f} {r[f'blend, {new}'] / r[f'blend, {old}']:>7.2f} "
              f"{r[f'GEMM + blend, {new}']:>14.1f} {r[f'GEMM + blend, {old}']:>7.1f}")
    if args.json:
        meta = {"cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                "command": f"python benchmarks/cpu_thread_split_bench.py --threads {args.threads}", "builds": BUILDS}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
