"""The CPU layers' blend, per decoder layer of the tiny serving model, by implementation.

One decoder layer's four linears (qkv 128->128+64+64, o 128->128, gate_up 128->2x256,
down 256->128), every token row with its own random mix of 4 AVs, for two libraries: 8 AVs of
rank 4 (what ``benchmarks/serve_bench.py`` builds) and 64 AVs of rank 16. Implementations:

* ``blend_native`` -- the C kernel (``vllm_av.serving.blend.native.NativeCPUBlend``; rows split over the threads from 32 rows);
* ``blend_onednn`` / ``blend_aten`` -- the dense blend over the whole library with vLLM-CPU's
  oneDNN GEMMs (``CPUBlend``) or aten GEMMs (``vllm_av.serving.blend.op.blend_scaled_ranks``);
* ``base_gemms`` -- the layer's base GEMMs alone (oneDNN, as vLLM-CPU runs them), for scale.

Median over repeats, microseconds per layer, at 1 and 2 torch threads. ``--dtype bfloat16``: the
layer's activations (x, y) and base weights in bfloat16, as a bfloat16 model runs (the blends sum
in float32 and round once).

    python benchmarks/cpu_blend_bench.py [--dtype bfloat16] [--json benchmarks/results/cpu_blend.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from vllm_av.serving.blend.dense import CPUBlend
from vllm_av.serving.blend.native import NativeCPUBlend
from vllm_av.kernels.cpu import load
from vllm_av.serving.blend.op import mix_coefficients

# (in, out slices) of one decoder layer's four linears; libraries as (AVs, rank); AVs per row
SHAPES = {
    "tiny": ([(128, [128, 64, 64]), (128, [128]), (128, [256, 256]), (256, [128])], [(8, 4), (64, 16)], 4),
    # SmolLM2-135M-Instruct with the two rank-16 style AVs of `vllm-av demo --real`, both in every mix
    "smollm2": ([(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])], [(2, 16)], 2),
}
TABLE_WIDTH = 8  # entries per table row (the default av.max_per_request)


def median_us(calls, repeats: int) -> float:
    for call in calls:
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def random_tables(tokens: int, num_avs: int, mix_size: int, gen: torch.Generator):
    """``index/scale [tokens, TABLE_WIDTH]``: ``mix_size`` distinct AVs per row, the rest -1."""
    index = torch.full((tokens, TABLE_WIDTH), -1, dtype=torch.int32)
    index[:, :mix_size] = torch.rand(tokens, num_avs, generator=gen).argsort(dim=1)[:, :mix_size].int()
    scale = torch.zeros(tokens, TABLE_WIDTH)
    scale[:, :mix_size] = torch.randn(tokens, mix_size, generator=gen)
    return index, scale


def measure(linears: list, mix_size: int, tokens: int, threads: int, num_avs: int, rank: int, repeats: int,
            dtype: torch.dtype = torch.float32) -> dict:
    """Median µs per decoder layer (``linears``: its (in, out slices)) of the base GEMMs and each blend."""
    from vllm import _custom_ops as ops

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(tokens + num_avs)
    kernel = load()
    calls = {"base_gemms": [], "blend_aten": [], "blend_onednn": [], "blend_native": []}
    for d_in, slices in linears:
        a = torch.randn(len(slices), num_avs, rank, d_in, generator=gen)
        b = torch.randn(num_avs, sum(slices), rank, generator=gen)
        x, y = torch.randn(tokens, d_in, generator=gen).to(dtype), torch.randn(tokens, sum(slices), generator=gen).to(dtype)
        index, scale = random_tables(tokens, num_avs, mix_size, gen)
        coef = mix_coefficients(index, scale, num_avs)
        base = ops.create_onednn_mm(torch.randn(sum(slices), d_in, generator=gen).to(dtype).t(), 32)
        aten, onednn = CPUBlend(a, b, slices, use_onednn=False), CPUBlend(a, b, slices)
        native = NativeCPUBlend(kernel, a, b, slices, [rank] * num_avs)
        calls["base_gemms"].append(lambda x=x, h=base: ops.onednn_mm(h, x, None))
        calls["blend_aten"].append(lambda y=y, x=x, c=coef, f=aten: f(y, x, c))
        calls["blend_onednn"].append(lambda y=y, x=x, c=coef, f=onednn: f(y, x, c))
        calls["blend_native"].append(lambda y=y, x=x, i=index, s=scale, f=native: f(y, x, i, s))
    row = {"tokens": tokens, "threads": threads, "num_avs": num_avs, "rank": rank, "dtype": str(dtype).split(".")[-1]}
    return {**row, **{name: median_us(c, repeats) for name, c in calls.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="activations and base weights")
    parser.add_argument("--shapes", choices=list(SHAPES), default="tiny", help="whose layer shapes and library")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 1024])
    args = parser.parse_args()
    linears, libraries, mix_size = SHAPES[args.shapes]
    dtype = getattr(torch, args.dtype)
    if load() is None:
        raise SystemExit("the C blend kernel did not build here (see the warning above)")
    rows = [
        measure(linears, mix_size, tokens, threads, num_avs, rank,
                max(5, args.repeats * 64 // max(64, tokens) // max(1, num_avs // 8)), dtype)
        for num_avs, rank in libraries for threads in (1, 2) for tokens in args.tokens
    ]
    print(f"per decoder layer, {args.dtype}, us (median); blend_native splits calls of 32+ rows over the threads")
    print(f"{'AVs':>4} {'rank':>4} {'threads':>7} {'tokens':>6} {'base GEMMs':>10} {'aten':>9} {'oneDNN':>9} {'native':>9}")
    for r in rows:
        print(f"{r['num_avs']:>4} {r['rank']:>4} {r['threads']:>7} {r['tokens']:>6} {r['base_gemms']:>10.1f} "
              f"{r['blend_aten']:>9.1f} {r['blend_onednn']:>9.1f} {r['blend_native']:>9.1f}")
    if args.json:
        meta = {"cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                "command": f"python benchmarks/cpu_blend_bench.py --dtype {args.dtype} --shapes {args.shapes}", "mix_size": mix_size, "table_width": TABLE_WIDTH}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
