"""The CPU layers' blend, per decoder layer of the tiny serving model, by GEMM backend.

One decoder layer's four linears (qkv 128->128+64+64, o 128->128, gate_up 128->2x256,
down 256->128) with 8 AVs of rank 4, as ``benchmarks/serve_bench.py`` builds them: the dense
blend with aten GEMMs (``vllm_av.ops.blend_scaled_ranks``) against vLLM-CPU's oneDNN GEMMs
(``vllm_av.cpu_blend.CPUBlend``), and the base GEMMs alone (oneDNN, as vLLM-CPU runs them) for
scale. Median over repeats, microseconds per layer, at 1 and 2 threads.

    python benchmarks/cpu_blend_bench.py [--json benchmarks/results/cpu_blend.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from vllm_av.cpu_blend import CPUBlend

LINEARS = [(128, [128, 64, 64]), (128, [128]), (128, [256, 256]), (256, [128])]
NUM_AVS, RANK = 8, 4


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


def measure(tokens: int, threads: int, repeats: int) -> dict:
    from vllm import _custom_ops as ops

    torch.set_num_threads(threads)
    calls = {"base_gemms": [], "blend_aten": [], "blend_onednn": []}
    for d_in, slices in LINEARS:
        a = torch.randn(len(slices), NUM_AVS, RANK, d_in)
        b = torch.randn(NUM_AVS, sum(slices), RANK)
        x, y = torch.randn(tokens, d_in), torch.randn(tokens, sum(slices))
        coef_rank = torch.randn(tokens, NUM_AVS * RANK)
        base = ops.create_onednn_mm(torch.randn(sum(slices), d_in).t(), 32)
        aten, onednn = CPUBlend(a, b, slices, use_onednn=False), CPUBlend(a, b, slices)
        calls["base_gemms"].append(lambda x=x, h=base: ops.onednn_mm(h, x, None))
        calls["blend_aten"].append(lambda y=y, x=x, c=coef_rank, f=aten: f(y, x, c))
        calls["blend_onednn"].append(lambda y=y, x=x, c=coef_rank, f=onednn: f(y, x, c))
    return {"tokens": tokens, "threads": threads, **{name: median_us(c, repeats) for name, c in calls.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rows = [measure(tokens, threads, args.repeats) for threads in (1, 2) for tokens in (64, 1024)]
    print(f"{'threads':>7} {'tokens':>6} {'base GEMMs us':>14} {'blend aten us':>14} {'blend oneDNN us':>16}")
    for r in rows:
        print(f"{r['threads']:>7} {r['tokens']:>6} {r['base_gemms']:>14.1f} {r['blend_aten']:>14.1f} {r['blend_onednn']:>16.1f}")
    if args.json:
        meta = {"cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                "command": "python benchmarks/cpu_blend_bench.py", "num_avs": NUM_AVS, "rank": RANK}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
