"""Benchmark of the fused blend kernel on Llama-3-8B linear shapes (issue 4).

Every variant runs the four linears of ``--layers`` decoder layers (distinct weights, so L2
does not flatter anything), captured in one CUDA graph and timed by replay (median):

* ``base``    the base GEMMs ``y = x W^T`` alone (the denominator);
* ``trivial`` base + one trivial in-place pass over ``y`` per linear, two ways: torch
  ``y.mul_(1.0)`` (``trivial_torch``) and a vectorised Triton load/store of ``y`` in its own
  dtype (``trivial_triton``); the faster one is the floor's trivial pass;
* ``ours``    base + ``blend_triton`` per linear, default (shape-based) configuration;
  ``variant_<name>``: alternative configurations at the target points (``VARIANTS``);
  ``prev``: an earlier kernel module given by ``--prev`` (same API, with or without ``step_active``), for before/after;
* ``dense``   baseline (a): plain torch, ``x A_all^T``, row scale by the mix coefficients, ``B_all^T``;
* ``seglora`` baseline (b): one LoRA per distinct mix, materialised by rank concatenation
  (scales folded into B), run as a segmented LoRA GEMM (torch ``bmm`` over equal segments).

``sep_floor = min(trivial)/base + adapter bytes touched / (bandwidth * base)``, with the bandwidth
measured in the same run by a large device copy.  Correctness of the kernel against the torch
reference is checked on the benchmark shapes before anything is timed.

Usage: ``python benchmarks/kernel_bench.py --out DIR`` (GPU) writes ``kernel_bench_<device>_<date>.json``;
``python benchmarks/kernel_bench.py --report JSON`` writes the markdown table and the plot next to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER = 4096, 14336
LINEARS = {  # name: (in, out slices)
    "qkv": (HIDDEN, [4096, 1024, 1024]),
    "o": (HIDDEN, [4096]),
    "gate_up": (HIDDEN, [INTER, INTER]),
    "down": (INTER, [HIDDEN]),
}
TARGET = dict(N=16, K=4, r=16)
VARIANTS = {  # name: BlendConfig -> BlendConfig, timed at the target points only
    "one_launch": lambda c: dataclasses.replace(c, two_launches=False),  # in-kernel barrier instead
    "ks_quarter": lambda c: dataclasses.replace(c, k_split=max(1, c.k_split // 4)),
}


def points(quick: bool):
    """(T, N, K, r, mix) grid: the target points first, then a trimmed sweep."""
    pts = [(T, 16, 4, 16, mix) for T in (1, 16, 64, 256) for mix in ("distinct", "same")]
    pts += [(2048, 16, 4, 16, mix) for mix in ("distinct", "same")]
    if not quick:
        for T in (16, 256):
            for N, K, r in ((4, 1, 16), (64, 8, 16), (16, 4, 64), (64, 8, 64), (4, 2, 64)):
                pts.append((T, N, K, r, "distinct"))
        pts += [(1, 64, 8, 64, "distinct"), (2048, 64, 8, 64, "same")]
    return pts


# ----------------------------------------------------------------------------- GPU side


def ensure_kernels_importable() -> None:
    """Make ``vllm_av.kernels`` importable from a plain checkout (no ``pip install``).

    Maps the package name onto ``kernels/`` exactly as pyproject's package-dir does.
    """
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    try:
        import vllm_av.kernels  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "vllm_av.kernels", root / "kernels" / "__init__.py", submodule_search_locations=[str(root / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["vllm_av.kernels"] = module
        spec.loader.exec_module(module)


def _graph_time(fn, reps: int, torch) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph."""
    fn()  # warm-up: compiles kernels, allocates scratch outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times)


def _inplace_pass(torch):
    """A vectorised in-place Triton pass over a contiguous tensor (load and store, own dtype)."""
    import triton
    import triton.language as tl

    @triton.jit
    def touch(ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(ptr + offs, tl.load(ptr + offs, mask=offs < n), mask=offs < n)

    def run(y):
        n = y.numel()
        touch[(triton.cdiv(n, 4096),)](y, n, BLOCK=4096, num_warps=4)
    return run


def _copy_bandwidth(torch) -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _graph_time(lambda: dst.copy_(src), 10, torch)
    return 2 * src.numel() / (ms * 1e-3)


def _mixes(T, N, K, mix, gen, torch):
    """av_index/av_scale [T, K]: K distinct adapters per row; all rows equal when mix == 'same'."""
    rows = 1 if mix == "same" else T
    index = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(rows)]).to(torch.int32)
    scale = torch.rand(rows, K, generator=gen) * 1.5 + 0.25
    if mix == "same":
        index, scale = index.expand(T, K).contiguous(), scale.expand(T, K).contiguous()
    return index.cuda(), scale.cuda()


class Library:
    """Per-layer AV libraries in the op layout, plus the views the baselines need."""

    def __init__(self, layers, N, r, gen, torch):
        self.N, self.r = N, r
        self.a, self.b = [], []
        for _ in range(layers):
            a_l, b_l = {}, {}
            for name, (d_in, slices) in LINEARS.items():
                a_l[name] = (torch.randn(len(slices), N, r, d_in, device="cuda", dtype=torch.bfloat16) / d_in**0.5)
                b_l[name] = torch.randn(N, sum(slices), r, device="cuda", dtype=torch.bfloat16) * 0.02
            self.a.append(a_l)
            self.b.append(b_l)

    def bytes_touched(self, used_adapters: int, layers: int) -> int:
        per_adapter = sum((len(s) * d_in + sum(s)) * self.r * 2 for d_in, s in LINEARS.values())
        return per_adapter * used_adapters * layers


def run_gpu(args) -> dict:
    import torch

    ensure_kernels_importable()
    from vllm_av.kernels.blend import blend_config, blend_triton
    prev = _load_prev(args.prev) if args.prev else None
    touch = _inplace_pass(torch)
    from vllm_av.serving.blend.op import blend_reference

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    active = torch.ones(1, dtype=torch.int32, device="cuda")  # every timed step holds mixes
    layers = args.layers
    dev_name = torch.cuda.get_device_name()
    bandwidth = _copy_bandwidth(torch)
    print(f"device {dev_name}, copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    meta = dict(device=dev_name, date=args.date, commit=args.commit, torch=torch.__version__,
                triton=__import__("triton").__version__, bandwidth_Bps=bandwidth, layers=layers, reps=args.reps)

    weights = [{n: torch.randn(sum(s), d_in, device="cuda", dtype=torch.bfloat16) * 0.02
                for n, (d_in, s) in LINEARS.items()} for _ in range(layers)]
    libs: dict = {}
    results, checks = [], []

    def lib_for(N, r):
        if (N, r) not in libs:
            libs.clear()
            torch.cuda.empty_cache()
            libs[(N, r)] = Library(layers, N, r, gen, torch)
        return libs[(N, r)]

    for (T, N, K, r, mix) in points(args.quick):
        t0 = time.time()
        lib = lib_for(N, r)
        index, scale = _mixes(T, N, K, mix, gen, torch)
        xs = {n: torch.randn(T, d_in, device="cuda", dtype=torch.bfloat16) for n, (d_in, _) in LINEARS.items()}
        ys = {n: torch.empty(T, sum(s), device="cuda", dtype=torch.bfloat16) for n, (_, s) in LINEARS.items()}

        # correctness on these exact shapes (layer 0) before timing
        worst = worst_delta = 0.0
        for name, (d_in, slices) in LINEARS.items():
            y0 = torch.randn(T, sum(slices), device="cuda", dtype=torch.bfloat16)
            got, ref = y0.clone(), y0.clone()
            blend_triton(got, xs[name], lib.a[0][name], lib.b[0][name], index, scale, active, slices)
            blend_reference(ref, xs[name], lib.a[0][name], lib.b[0][name], index, scale, slices)
            err = (got.float() - ref.float()).abs().max().item()
            worst = max(worst, err / ref.float().abs().max().item())
            worst_delta = max(worst_delta, err / max((ref.float() - y0.float()).abs().max().item(), 1e-6))
        checks.append(dict(T=T, N=N, K=K, r=r, mix=mix, max_err_rel_to_max_y=worst,
                           max_err_rel_to_max_delta=worst_delta))
        if worst > 1e-2:  # bf16: both sides round y to bf16, so they differ by up to one ulp of y
            raise SystemExit(f"kernel mismatch at {(T, N, K, r, mix)}: {worst:.3g}")

        def base():
            for l in range(layers):
                for name in LINEARS:
                    torch.mm(xs[name], weights[l][name].t(), out=ys[name])

        def trivial(pass_over_y):
            def fn():
                for l in range(layers):
                    for name in LINEARS:
                        torch.mm(xs[name], weights[l][name].t(), out=ys[name])
                        pass_over_y(ys[name])
            return fn

        def ours(variant=None, module=None):
            configs = {}
            for n, (d_in, s) in LINEARS.items():
                cfg = blend_config(T, d_in, len(s), N, K, r)
                configs[n] = VARIANTS[variant](cfg) if variant else cfg
            blend = module.blend_triton if module else blend_triton
            # a kernel from before the step_active flag (--prev) takes no flag
            flag = (active,) if "step_active" in inspect.signature(blend).parameters else ()

            def fn():
                for l in range(layers):
                    for name, (_, slices) in LINEARS.items():
                        torch.mm(xs[name], weights[l][name].t(), out=ys[name])
                        blend(ys[name], xs[name], lib.a[l][name], lib.b[l][name], index, scale, *flag, slices,
                              config=None if module else configs[name])
            return fn

        # baseline (a): dense torch over the whole library, coefficients computed once per step
        a_all = [{n: lib.a[l][n].reshape(len(s), N * r, d_in) for n, (d_in, s) in LINEARS.items()}
                 for l in range(layers)]
        b_all = [{n: lib.b[l][n].permute(1, 0, 2).reshape(sum(s), N * r) for n, (_, s) in LINEARS.items()}
                 for l in range(layers)]

        def dense():
            valid = index >= 0
            onehot = torch.nn.functional.one_hot(torch.where(valid, index, 0).long(), N).to(torch.bfloat16)
            coef = (onehot * torch.where(valid, scale, 0.0).to(torch.bfloat16).unsqueeze(-1)).sum(1)
            coef_r = coef.repeat_interleave(r, dim=1)
            for l in range(layers):
                for name, (_, slices) in LINEARS.items():
                    y = torch.mm(xs[name], weights[l][name].t(), out=ys[name])
                    off = 0
                    for k, w in enumerate(slices):
                        h = (xs[name] @ a_all[l][name][k].t()) * coef_r
                        y[:, off:off + w].addmm_(h, b_all[l][name][off:off + w].t())
                        off += w

        row = dict(T=T, N=N, K=K, r=r, mix=mix, layers=layers)
        row["base_ms"] = _graph_time(base, args.reps, torch)
        row["trivial_torch_ms"] = _graph_time(trivial(lambda y: y.mul_(1.0)), args.reps, torch)
        row["trivial_triton_ms"] = _graph_time(trivial(touch), args.reps, torch)
        row["trivial_ms"] = min(row["trivial_torch_ms"], row["trivial_triton_ms"])
        row["ours_ms"] = _graph_time(ours(), args.reps, torch)
        if (N, K, r) == (TARGET["N"], TARGET["K"], TARGET["r"]) and not args.no_variants:
            for name, change in VARIANTS.items():
                if any(change(c) != c for c in (blend_config(T, d, len(s), N, K, r) for d, s in LINEARS.values())):
                    row[f"variant_{name}_ms"] = _graph_time(ours(variant=name), args.reps, torch)
        if prev is not None:
            row["prev_ms"] = _graph_time(ours(module=prev), args.reps, torch)
        row["config_qkv"] = blend_config(T, HIDDEN, 3, N, K, r).__dict__
        dense_flops = 2 * T * N * r * sum(len(s) * d + sum(s) for d, s in LINEARS.values()) * layers
        if dense_flops < 5e12:
            row["dense_ms"] = _graph_time(dense, args.reps, torch)
        a_all = b_all = None  # free the dense copies before the next baseline (dense is not run again)

        # baseline (b): rank-concatenated LoRA per distinct mix, segmented GEMM over equal segments
        groups = 1 if mix == "same" else T
        seg_bytes = groups * K * r * sum(len(s) * d + sum(s) for d, s in LINEARS.values()) * 2
        mat_layers = layers if seg_bytes * layers < 6e9 else 1  # reuse across layers when too big
        if seg_bytes * mat_layers < 6e9:
            g_idx = index[:groups].long()
            g_scale = scale[:groups]
            seg = []
            for l in range(mat_layers):
                per = {}
                for name, (d_in, slices) in LINEARS.items():
                    a_cat = lib.a[l][name][:, g_idx]  # [S, G, K, r, in]
                    a_cat = a_cat.reshape(len(slices), groups, K * r, d_in)
                    b_cat = lib.b[l][name][g_idx] * g_scale[:, :, None, None].to(torch.bfloat16)  # [G, K, out, r]
                    b_cat = b_cat.permute(0, 2, 1, 3).reshape(groups, sum(slices), K * r)
                    per[name] = (a_cat.contiguous(), b_cat.contiguous())
                seg.append(per)
            rows_per = T // groups

            def seglora():
                for l in range(layers):
                    for name, (_, slices) in LINEARS.items():
                        y = torch.mm(xs[name], weights[l][name].t(), out=ys[name])
                        a_cat, b_cat = seg[l % mat_layers][name]
                        xg = xs[name].view(groups, rows_per, -1)
                        off = 0
                        for k, w in enumerate(slices):
                            h = torch.bmm(xg, a_cat[k].transpose(1, 2))  # [G, rows, K r]
                            d = torch.bmm(h, b_cat[:, off:off + w].transpose(1, 2))
                            y[:, off:off + w] += d.view(T, w)
                            off += w

            row["seglora_ms"] = _graph_time(seglora, args.reps, torch)
            row["seglora_layers_materialised"] = mat_layers
            del seg

        used = int(torch.unique(index[index >= 0]).numel())
        adapter_bytes = lib.bytes_touched(used, layers)
        base = row["base_ms"]
        row["adapters_touched"] = used
        row["adapter_bytes"] = adapter_bytes
        row["sep_floor"] = row["trivial_ms"] / base + adapter_bytes / (bandwidth * base * 1e-3)
        for key in [k[:-3] for k in list(row) if k.endswith("_ms") and k != "base_ms"]:
            row[f"{key}/base"] = row[f"{key}_ms"] / base
        results.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k != "config_qkv"}), f"[{time.time() - t0:.0f}s]", flush=True)
        _write(args, dict(meta, checks=checks, results=results))  # partial results survive a crash
        if time.time() - START > args.budget_s:
            print("time budget reached, stopping the sweep", flush=True)
            break

    return dict(meta, checks=checks, results=results)


# ----------------------------------------------------------------------------- report side


def _fmt(v, nd=3):
    return "n/a" if v is None else f"{v:.{nd}f}"


def report(path: Path, ours_key: str = "ours") -> str:
    """Markdown table for a result JSON; also writes ``<json stem>.png`` (overhead vs T).

    ``ours_key``: the column reported and plotted as ours (``prev`` when the kernel kept after a
    run is the ``--prev`` one).
    """
    data = json.loads(path.read_text())
    for r in data["results"]:
        r["ours/base"], r["prev/base"] = r.get(f"{ours_key}/base"), r.get("ours/base" if ours_key == "prev" else "prev/base")
    lines = [
        f"Device **{data['device']}**, date {data['date']}, commit `{data['commit']}`, torch {data['torch']}, "
        f"triton {data['triton']}; {data['layers']} decoder layers in one CUDA graph, median of "
        f"{data['reps']} replays; copy bandwidth {data['bandwidth_Bps'] / 1e12:.2f} TB/s.",
        "",
        f"| T | N | K | r | mix | base ms | {'prev (kept)' if ours_key == 'prev' else 'ours'}/base | sep_floor"
        " | trivial torch/base | trivial triton/base"
        f" | {'run ours, not kept' if ours_key == 'prev' else 'prev'}/base | (a) dense/base | (b) seg-LoRA/base |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"]:
        lines.append(
            f"| {r['T']} | {r['N']} | {r['K']} | {r['r']} | {r['mix']} | {r['base_ms']:.3f} | "
            f"{_fmt(r.get('ours/base'))} | {_fmt(r['sep_floor'])} | {_fmt(r.get('trivial_torch/base'))} | "
            f"{_fmt(r.get('trivial_triton/base'))} | {_fmt(r.get('prev/base'))} | {_fmt(r.get('dense/base'))} | "
            f"{_fmt(r.get('seglora/base'))} |")
    _plot(data, path.with_suffix(".png"))
    return "\n".join(lines)


def _plot(data, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, mix in zip(axes, ("distinct", "same")):
        rows = sorted((r for r in data["results"] if r["mix"] == mix and
                       (r["N"], r["K"], r["r"]) == (TARGET["N"], TARGET["K"], TARGET["r"])), key=lambda r: r["T"])
        ts = [r["T"] for r in rows]
        for key, label, style in (("ours/base", "ours", "o-"), ("sep_floor", "sep_floor", "k--"),
                                  ("trivial/base", "trivial pass", "k:"), ("dense/base", "(a) torch dense", "s-"),
                                  ("seglora/base", "(b) seg-LoRA", "^-")):
            pts = [(t, r[key] - 1) for t, r in zip(ts, rows) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("overhead over base (time/base - 1)")
        ax.set_title(f"N=16 K=4 r=16, {mix} mixes — {data['device']}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


START = time.time()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="directory for the result JSON (GPU run)")
    p.add_argument("--report", type=Path, help="result JSON to turn into a table and a plot")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="target points only")
    p.add_argument("--budget-s", type=float, default=420, help="stop the sweep after this long")
    p.add_argument("--prev", type=Path, help="an earlier kernels/blend.py to time as 'prev'")
    p.add_argument("--ours-key", default="ours", help="with --report: the column to report as ours (ours|prev)")
    p.add_argument("--no-variants", action="store_true", help="skip the alternative configurations")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--commit", default=None)
    args = p.parse_args()
    if args.report:
        print(report(args.report, args.ours_key))
        return
    if args.commit is None:
        try:
            args.commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        except (OSError, subprocess.CalledProcessError):
            args.commit = os.environ.get("BENCH_COMMIT", "unknown")
    print(f"wrote {_write(args, run_gpu(args))}")


def _load_prev(path: Path):
    """Import an earlier blend module (same ``blend_triton`` API) under a private name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_prev_blend", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_prev_blend"] = module  # dataclasses look the module up while it executes
    spec.loader.exec_module(module)
    return module


def _write(args, data) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    name = data["device"].replace(" ", "_").replace("/", "_")
    out = args.out / f"kernel_bench_{name}_{args.date}.json"
    out.write_text(json.dumps(data, indent=1))
    return out


if __name__ == "__main__":
    main()
