"""Serving benchmark: what does a per-user preference mix cost in throughput and latency?

Workloads, all on the same synthetic prompts (fixed seed):

* ``base``          no AV, on vanilla vLLM (no plugin, no LoRA)
* ``av-server-base`` the same requests, no mix, on the AV server (what the plugin costs by itself)
* ``av-distinct``   every request its own random mix of K AVs with random real scales
* ``av-same``       every request the same mix
* ``lora-per-mix``  what users do today: each distinct mix materialised offline as its own LoRA
                    (rank concatenation, exact), served by vLLM's native multi-LoRA
* ``prompt``        the preference written into the prompt instead (the AV paper's baseline)
* ``av-distinct-dense`` (not run by default) ``av-distinct`` on an AV server with the dense CPU
                    blend (``--av-cpu-blend dense``), to compare the CPU blends side by side

Online mode (default) drives OpenAI servers over streaming HTTP and reports, per workload,
request/s, output tok/s, TTFT, TPOT and ITL at p50/p99 (the definitions of ``vllm bench
serve``), errors and the exact server command lines. Each server's workloads run in rounds, interleaved,
and the medians over rounds are reported. It starts the servers itself on 127.0.0.1, one at a
time, and stops them by PID; with no ``--model`` it builds a tiny model and AV library (CPU demo).
Offline mode (``--offline``) times ``LLM.generate`` on a fixed request list (peak throughput), with
``base`` run before and after every other workload so that each ratio compares neighbouring runs.
Lockstep mode (``--lockstep``) times the same request lists with each workload's engine and the
``base`` engine in this process, stepping in turn: both sides of a ratio see the same machine from
one step to the next, so on a noisy shared machine its ratios spread a few percent where whole runs
spread tens of percent.

    python benchmarks/serve_bench.py                       # tiny model, CPU, all workloads
    python benchmarks/serve_bench.py --smoke               # a few requests per workload (CI)
    python benchmarks/serve_bench.py --no-online --lockstep --offline-rounds 9 --num-requests 512
    python benchmarks/serve_bench.py --model meta-llama/Llama-3.1-8B-Instruct --av-path avs/ \\
        --server-cmd "vllm serve" --num-requests 1000 --concurrency 64 --input-len 512 --output-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vllm_av.serving.settings.config import CPU_BLENDS
from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess

RESULTS = Path(__file__).parent / "results"
PREFERENCE_PROMPT = (
    "You are answering for a user with these preferences: {desc}. Adjust your expertise, caution "
    "and tone to match each preference in proportion to its weight. Question: "
)
WORDS = ("patient dose court contract market risk loan symptom evidence fund rate treatment plan "
         "judge tax bond heart interest fever invest").split()


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    server: str  # which server runs it: vanilla | av | lora
    requests: list[dict] = field(default_factory=list)  # request bodies (without model/stream)


def make_prompts(n: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(n)]


def random_mix(rng: random.Random, names: list[str], k: int, max_abs: float) -> dict[str, float]:
    return {name: round(rng.uniform(-max_abs, max_abs), 4) for name in rng.sample(names, min(k, len(names)))}


def mix_text(mix: dict[str, float]) -> str:
    return ",".join(f"{n}:{s}" for n, s in mix.items())


def build_workloads(args, names: list[str], lora_mixes: list[dict]) -> list[Workload]:
    rng = random.Random(args.seed)
    prompts = make_prompts(args.num_requests, args.input_len, args.seed)
    common = {"max_tokens": args.output_len, "ignore_eos": True, "temperature": 0}
    same = random_mix(rng, names, args.k, args.max_abs_scale)
    distinct = [random_mix(rng, names, args.k, args.max_abs_scale) for _ in prompts]
    workloads = [
        Workload("base", "vanilla", [{"prompt": p, **common} for p in prompts]),
        Workload("av-server-base", "av", [{"prompt": p, **common} for p in prompts]),
        Workload("av-distinct", "av", [{"prompt": p, "vllm_xargs": {"av": mix_text(m)}, **common}
                                       for p, m in zip(prompts, distinct)]),
        Workload("av-same", "av", [{"prompt": p, "vllm_xargs": {"av": mix_text(same)}, **common} for p in prompts]),
        # av-distinct on a second AV engine with the dense CPU blend (CPU only; not run by default)
        Workload("av-distinct-dense", "av-dense", [{"prompt": p, "vllm_xargs": {"av": mix_text(m)}, **common}
                                                   for p, m in zip(prompts, distinct)]),
        Workload("lora-per-mix", "lora", [{"prompt": p, "model": f"mix{i % len(lora_mixes)}", **common}
                                          for i, p in enumerate(prompts)]),
        Workload("prompt", "vanilla", [{"prompt": PREFERENCE_PROMPT.format(desc=mix_text(m)) + p, **common}
                                       for p, m in zip(prompts, distinct)]),
    ]
    return [w for w in workloads if w.name in args.workloads]


# --------------------------------------------------------------------------- servers


def server_commands(args, library: Path, lora_dir: Path, n_mixes: int, lora_rank: int) -> dict[str, list[str]]:
    vanilla = shlex.split(args.server_cmd) + [args.model] + shlex.split(args.server_args)
    av = [*vanilla, "--enable-av", "--av-path", str(library), "--av-max-abs-scale", str(args.max_abs_scale)]
    max_loras = min(args.max_loras, n_mixes)
    lora = [*vanilla, "--enable-lora", "--max-loras", str(max_loras), "--max-cpu-loras", str(n_mixes),
            "--max-lora-rank", str(lora_rank), "--lora-modules",
            *[f"mix{i}={lora_dir / f'mix{i}'}" for i in range(n_mixes)]]
    return {"vanilla": vanilla, "av": [*av, "--av-cpu-blend", args.av_cpu_blend],
            "av-dense": [*av, "--av-cpu-blend", "dense"], "lora": lora}


# --------------------------------------------------------------------------- client


async def stream_one(session, url: str, body: dict) -> dict:
    """One streaming completion; timestamps of every chunk that carries text."""
    t0 = time.perf_counter()
    stamps, tokens, prompt_tokens, error = [], 0, 0, None
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                return {"error": f"HTTP {response.status}: {(await response.text())[:200]}"}
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter() - t0)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
    except Exception as exc:  # reported per request, counted as an error
        error = f"{type(exc).__name__}: {exc}"
    if error or not stamps:
        return {"error": error or "no tokens"}
    return {"latency": time.perf_counter() - t0, "stamps": stamps, "tokens": tokens, "prompt_tokens": prompt_tokens}


async def run_workload(url: str, model: str, workload: Workload, concurrency: int, time_limit: float) -> dict:
    import aiohttp

    semaphore = asyncio.Semaphore(concurrency)
    deadline = time.perf_counter() + time_limit

    async def one(session, body):
        async with semaphore:
            if time.perf_counter() > deadline:
                return {"error": "skipped: time limit"}
            # lora-per-mix bodies name their adapter as the model
            payload = {"model": model, **body, "stream": True, "stream_options": {"include_usage": True}}
            return await stream_one(session, url, payload)

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    # A fresh connection per request: a reused keep-alive connection can be closed by the server's
    # keep-alive timer (uvicorn: 5 s) as the request goes out, most often while the server stalls,
    # and fails with ServerDisconnectedError or "Can not write request body" (seen with lora-per-mix).
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(session, body) for body in workload.requests))
        duration = time.perf_counter() - t0
    return summarize(results, duration)


def pct(values, q) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def summarize(results: list[dict], duration: float) -> dict:
    """vllm bench serve metrics: TTFT, TPOT = (latency - TTFT)/(tokens - 1), ITL = chunk gaps (ms)."""
    ok = [r for r in results if "error" not in r]
    ttft = [r["stamps"][0] for r in ok]
    tpot = [(r["latency"] - r["stamps"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    errors = [r["error"] for r in results if "error" in r]
    return {
        "completed": len(ok),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "duration_s": duration,
        "request_per_s": len(ok) / duration,
        "output_tok_per_s": sum(r["tokens"] for r in ok) / duration,
        "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in ok) if ok else float("nan"),
        "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
        "tpot_ms_p50": pct(tpot, 50), "tpot_ms_p99": pct(tpot, 99),
        "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99),
    }


# --------------------------------------------------------------------------- offline


def offline_inputs(workload: Workload, lora_dir: Path) -> tuple[list, list, list]:
    """``LLM.generate`` arguments for a workload: prompts, sampling params, LoRA requests."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind

    prompts, params, loras = [], [], []
    for body in workload.requests:
        av = body.get("vllm_xargs", {}).get("av")
        prompts.append(body["prompt"])
        params.append(SamplingParams(max_tokens=body["max_tokens"], ignore_eos=True, temperature=0,
                                     extra_args={"av": av} if av else None,
                                     output_kind=RequestOutputKind.FINAL_ONLY))  # as LLM.generate sets it
        model = body.get("model")
        loras.append(LoRARequest(model, int(model[3:]) + 1, str(lora_dir / model)) if model else None)
    return prompts, params, loras


def start_engines(args, library: Path, kinds: dict, n_mixes: int, lora_rank: int, **extra) -> dict:
    """An ``LLM`` per key of ``kinds``, configured as its server kind (vanilla, av, av-dense, lora), with
    ``--offline-engine-kwargs`` (``extra`` as defaults)."""
    from vllm import LLM

    engine_kwargs = {**extra, **json.loads(args.offline_engine_kwargs)}
    configs = {
        "vanilla": {},
        **{kind: {"additional_config": {"av": {"path": str(library), "max_abs_scale": args.max_abs_scale,
                                               "cpu_blend": blend}}}
           for kind, blend in (("av", args.av_cpu_blend), ("av-dense", "dense"))},
        "lora": {"enable_lora": True, "max_loras": min(args.max_loras, n_mixes), "max_cpu_loras": n_mixes,
                 "max_lora_rank": lora_rank},
    }
    return {key: LLM(args.model, **engine_kwargs, **configs[kind]) for key, kind in kinds.items()}


def shut_down(engines: dict) -> None:
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()  # else the engines may outlive the run (or the process)


def offline_summary(rounds: dict[str, list[dict]], vs_base: dict[str, list[float]]) -> dict:
    """Per workload: medians over its runs, its per-round ratios to ``base``, their median and 95 % CI;
    for ``av-distinct`` also its ratio to ``av-same`` (the median of the per-round ratio of their ratios)."""
    out = {}
    for name, rs in rounds.items():
        per_round = vs_base[name]
        out[name] = {**median_rounds(rs), "rounds": rs, "vs_base_rounds": per_round,
                     "vs_base": statistics.median(per_round) if per_round else None,
                     "vs_base_ci95": median_ci95(per_round) if name != "base" else None}
    if vs_base.get("av-distinct") and vs_base.get("av-same"):
        per_round = [d / s for d, s in zip(vs_base["av-distinct"], vs_base["av-same"])]
        out["av-distinct"]["vs_av_same"] = statistics.median(per_round)
        out["av-distinct"]["vs_av_same_ci95"] = median_ci95(per_round)
    return out


def warmed_up_jobs(workloads: list[Workload], engine_of: dict, engines: dict, lora_dir: Path) -> dict:
    """Per workload: ``(engine, prompts, params, loras)``; each engine has run its first 8 requests once."""
    jobs = {w.name: (engines[engine_of[w.name]], *offline_inputs(w, lora_dir)) for w in workloads}
    for llm, prompts, params, loras in jobs.values():  # warm-up, not recorded
        llm.generate(prompts[:8], params[:8], lora_request=loras[:8], use_tqdm=False)
    return jobs


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` rotated left by ``r`` (round ``r``'s order)."""
    return names[r % len(names):] + names[: r % len(names)] if names else []


def run_offline(args, library: Path, lora_dir: Path, workloads: list[Workload], n_mixes: int, lora_rank: int) -> dict:
    """Peak throughput: ``LLM.generate`` over each workload's request list.

    One engine per server kind, all started first. Each of ``--offline-rounds`` rounds runs every
    workload once (the order rotated by one each round), with ``base`` run before the first and
    after each one: a workload's ratio to ``base`` in a round is its throughput over the mean of the
    two ``base`` runs around it, so a drift in machine load (large on shared machines, over
    seconds) hits both sides of each ratio alike. Every run follows an ``--offline-settle`` pause.
    Reported: :func:`offline_summary`.
    """
    engine_of = {w.name: w.server for w in workloads}
    engines = start_engines(args, library, {kind: kind for kind in engine_of.values()}, n_mixes, lora_rank)
    rounds: dict[str, list[dict]] = {w.name: [] for w in workloads}
    vs_base: dict[str, list[float]] = {w.name: [] for w in workloads}

    def timed(name: str) -> float:
        llm, prompts, params, loras = jobs[name]
        # vLLM's workers busy-poll for 1 s after their last step: let the previous engine's go
        # idle, else they share a core with the engine being timed
        time.sleep(args.offline_settle)
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        duration = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        rounds[name].append({"duration_s": duration, "request_per_s": len(outputs) / duration,
                             "output_tok_per_s": tokens / duration})
        return tokens / duration

    try:
        jobs = warmed_up_jobs(workloads, engine_of, engines, lora_dir)
        others = [name for name in jobs if name != "base"]
        for r in range(args.offline_rounds):
            before = timed("base") if "base" in jobs else None
            for name in rotated(others, r):
                throughput = timed(name)
                if before is not None:  # base around every workload
                    after = timed("base")
                    vs_base[name].append(throughput / ((before + after) / 2))
                    before = after
            if before is not None:
                vs_base["base"].append(1.0)
    finally:
        shut_down(engines)
    return offline_summary(rounds, vs_base)


def run_lockstep(args, library: Path, lora_dir: Path, workloads: list[Workload], n_mixes: int, lora_rank: int) -> dict:
    """Each workload against ``base`` with the two engines' steps alternated, one process.

    The engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so an engine steps only
    when called. Each of ``--offline-rounds`` rounds pairs every workload with ``base`` (the order
    rotated each round): both request lists are added, then the two engines take turns, one step
    each (who goes first alternating), until both are done. Each side's time is its own request
    adding plus its own steps, so a slow spell of the machine, from milliseconds to minutes, hits
    both sides of a ratio alike. Reported as :func:`offline_summary`, plus ``steps`` per run.
    Call it last: an in-process engine freezes vLLM's environment for the rest of the process.
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm.envs as envs

    if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
        raise RuntimeError("--lockstep needs in-process vLLM engines, but this process has frozen vLLM's "
                           "environment already: run it in a fresh process")
    # an engine per (server kind, second copy): the workloads that pair with base on its kind (prompt) get another
    engine_of = {w.name: (w.server, w.server == "vanilla" and w.name != "base") for w in workloads}
    kinds = {key: key[0] for key in engine_of.values()}
    engines = start_engines(args, library, kinds, n_mixes, lora_rank, distributed_executor_backend="uni")
    rounds: dict[str, list[dict]] = {w.name: [] for w in workloads}
    vs_base: dict[str, list[float]] = {w.name: [] for w in workloads}
    request_ids = itertools.count()

    def lockstep(names: list[str]) -> dict[str, float]:
        spent, tokens, steps = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0), dict.fromkeys(names, 0)
        for name in names:
            llm, prompts, params, loras = jobs[name]
            t0 = time.perf_counter()
            for prompt, param, lora in zip(prompts, params, loras):
                llm.llm_engine.add_request(f"lockstep-{next(request_ids)}", prompt, param, lora_request=lora)
            spent[name] += time.perf_counter() - t0
        turn = 0
        while running := [n for n in names if jobs[n][0].llm_engine.has_unfinished_requests()]:
            for name in running if turn % 2 == 0 else running[::-1]:
                t0 = time.perf_counter()
                outputs = jobs[name][0].llm_engine.step()
                spent[name] += time.perf_counter() - t0
                steps[name] += 1
                tokens[name] += sum(len(o.outputs[0].token_ids) for o in outputs if o.finished)
            turn += 1
        throughput = {}
        for name in names:
            throughput[name] = tokens[name] / spent[name]
            rounds[name].append({"duration_s": spent[name], "request_per_s": len(jobs[name][1]) / spent[name],
                                 "output_tok_per_s": throughput[name], "steps": steps[name]})
        return throughput

    try:
        jobs = warmed_up_jobs(workloads, engine_of, engines, lora_dir)
        others = [name for name in jobs if name != "base"]
        for r in range(args.offline_rounds):
            for name in rotated(others, r):
                if "base" in jobs:
                    throughput = lockstep(["base", name])
                    vs_base[name].append(throughput[name] / throughput["base"])
                else:
                    lockstep([name])
            if "base" in jobs:
                if not others:
                    lockstep(["base"])
                vs_base["base"].append(1.0)
    finally:
        shut_down(engines)
    return offline_summary(rounds, vs_base)


# --------------------------------------------------------------------------- setup and report


def prepare(args, work: Path) -> tuple[Path, list[str], Path, list[dict], int, float]:
    """The AV library (built if needed), its names, and the lora-per-mix adapters (timed)."""
    from vllm_av.serving.library.avs import load_library
    from vllm_av.serving.settings.config import AVConfig
    from vllm_av.offline.materialize import materialize_mix
    from vllm_av.testing.models import build_demo

    if args.model is None:  # the tiny CPU setup: a random Llama and num_avs rank-4 AVs
        model, library = build_demo(work / "tiny", avs={f"av{i}": 100 + i for i in range(args.num_avs)})
        args.model, args.av_path = str(model), str(library)
    library = Path(args.av_path)
    entries = load_library(str(library), AVConfig(path=str(library)))
    names = [Path(e.path).name for e in entries]
    rng = random.Random(args.seed + 1)
    mixes = [random_mix(rng, names, args.k, args.max_abs_scale) for _ in range(args.lora_mixes)]
    lora_dir = work / "lora_per_mix"
    t0 = time.time()
    for i, mix in enumerate(mixes):
        materialize_mix(library, mix, lora_dir / f"mix{i}")
    build_s = time.time() - t0
    rank_by_av = {Path(e.path).name: e.rank for e in entries}
    lora_rank = max(sum(rank_by_av[n] for n in mix) for mix in mixes)
    lora_rank = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= lora_rank)
    return library, names, lora_dir, mixes, lora_rank, build_s


def interval(ci: tuple[float, float] | None) -> str:
    return f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "n/a"


def markdown_table(online: dict, offline: dict, lockstep: dict) -> str:
    lines = []
    if online:
        lines += ["| workload | req/s | out tok/s | vs base | TTFT p50/p99 ms | TPOT p50/p99 ms | ITL p50/p99 ms | errors |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = online.get("base", {}).get("output_tok_per_s")
    for name, r in online.items():
        ratio = f"{r['output_tok_per_s'] / base:.3f}" if base else "n/a"
        lines.append(f"| {name} | {r['request_per_s']:.2f} | {r['output_tok_per_s']:.1f} | {ratio} | "
                     f"{r['ttft_ms_p50']:.1f} / {r['ttft_ms_p99']:.1f} | {r['tpot_ms_p50']:.2f} / {r['tpot_ms_p99']:.2f} | "
                     f"{r['itl_ms_p50']:.2f} / {r['itl_ms_p99']:.2f} | {r['errors']} |")
    for design, results in (("offline", offline), ("lockstep", lockstep)):
        if results:
            lines += [""] if lines else []
            lines += ratio_table(design, results)
    if offline or lockstep:
        lines.append("\n95 % CI: distribution-free, from the order statistics of the rounds (n/a below 6 rounds).")
    return "\n".join(lines)


def ratio_table(design: str, results: dict) -> list[str]:
    """Markdown lines for an offline design's results (``offline`` rounds or ``lockstep`` pairs)."""
    lines = [f"| {design} workload | req/s | out tok/s | vs base (median of rounds) | 95 % CI of that median "
             "| vs base, lowest–highest round |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        per_round = r.get("vs_base_rounds") or []
        ratio = f"{r['vs_base']:.3f}" if r.get("vs_base") is not None else "n/a"
        spread = f"{min(per_round):.3f}–{max(per_round):.3f}" if per_round else "n/a"
        lines.append(f"| {name} | {r['request_per_s']:.2f} | {r['output_tok_per_s']:.1f} | {ratio} | "
                     f"{interval(r.get('vs_base_ci95'))} | {spread} |")
    distinct = results.get("av-distinct", {})
    if distinct.get("vs_av_same") is not None:
        lines.append(f"\n{design} av-distinct / av-same (median of rounds): {distinct['vs_av_same']:.3f} "
                     f"(95 % CI {interval(distinct.get('vs_av_same_ci95'))})")
    return lines


def plot(online: dict, offline: dict, lockstep: dict, path: Path) -> None:
    """Bars per workload: online throughput and p99 TPOT, offline throughput, lockstep ratio to base (what was run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if online:
        panels.append((online, "output_tok_per_s", "output tokens / s", "online throughput (higher is better)", "tab:blue"))
        panels.append((online, "tpot_ms_p99", "ms", "online p99 TPOT (lower is better)", "tab:orange"))
    if offline:
        panels.append((offline, "output_tok_per_s", "output tokens / s", "offline throughput (higher is better)", "tab:green"))
    if lockstep:
        panels.append((lockstep, "vs_base", "throughput / base", "lockstep: vs base (higher is better)", "tab:purple"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (results, key, unit, title, color) in zip(axes[0], panels):
        names = list(results)
        ax.bar(names, [results[n][key] or 0.0 for n in names], color=color)
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def median_ci95(values: list[float]) -> tuple[float, float] | None:
    """A distribution-free 95 % confidence interval of the median of ``values`` (None below 6 values).

    The order statistics ``(x_(j), x_(n+1-j))`` with the largest ``j`` such that a Binomial(n, 1/2)
    falls below ``j`` with probability <= 2.5 %: they bracket the true median with >= 95 %
    probability, whatever the distribution, as long as the values are independent (offline rounds
    nearly are: neighbouring rounds share one ``base`` run).
    """
    n, xs = len(values), sorted(values)
    j, tail = 0, 0.0
    while j < n and tail + math.comb(n, j) / 2**n <= 0.025:
        tail += math.comb(n, j) / 2**n
        j += 1
    return (xs[j - 1], xs[n - j]) if j else None


def median_rounds(rounds: list[dict]) -> dict:
    """Per metric, the median over rounds (errors are summed)."""
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        if key in ("errors", "completed"):
            out[key] = sum(values)
        elif key == "error_examples":
            out[key] = sorted({e for v in values for e in v})[:3]
        else:
            out[key] = statistics.median(values)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model to serve (default: build a tiny CPU model + AV library)")
    p.add_argument("--av-path", help="AV library (needed with --model)")
    p.add_argument("--server-cmd", default=f"{sys.executable} -m vllm.entrypoints.openai.api_server --model",
                   help="command that starts a vLLM OpenAI server for MODEL (GPU: 'vllm serve')")
    p.add_argument("--server-args", default=" ".join([*CPU_FLAGS, "--max-num-seqs", "64"]),
                   help="extra flags for every server (default: the tiny CPU model's)")
    p.add_argument("--workloads", nargs="+", default=["base", "av-server-base", "av-distinct", "av-same", "lora-per-mix", "prompt"],
                   help="also: av-distinct-dense (av-distinct with the dense CPU blend, on an engine of its own)")
    p.add_argument("--num-requests", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=32, help="prompt length in words")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--k", type=int, default=4, help="AVs per request mix")
    p.add_argument("--max-abs-scale", type=float, default=2.0)
    p.add_argument("--num-avs", type=int, default=8, help="AVs in the built tiny library")
    p.add_argument("--av-cpu-blend", choices=CPU_BLENDS, default="auto",
                   help="the AV engine's CPU blend (--av-cpu-blend of vllm serve)")
    p.add_argument("--lora-mixes", type=int, default=64, help="distinct mixes materialised for lora-per-mix")
    p.add_argument("--max-loras", type=int, default=8, help="vLLM --max-loras for lora-per-mix")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--time-limit", type=float, default=600, help="seconds per workload round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offline", action="store_true", help="also time LLM.generate (peak throughput)")
    p.add_argument("--online", action=argparse.BooleanOptionalAction, default=True,
                   help="drive OpenAI servers (--no-online: offline only)")
    p.add_argument("--offline-rounds", type=int, default=5,
                   help="offline and lockstep rounds (each runs every workload once, with base); medians are reported")
    p.add_argument("--lockstep", action="store_true",
                   help="also time each workload against base with their engines' steps alternated in this "
                        "process (in-process engines; runs last): ratios that a noisy machine barely moves")
    p.add_argument("--offline-settle", type=float, default=1.5,
                   help="seconds of pause before each timed offline run (idle engines stop polling)")
    p.add_argument("--offline-engine-kwargs", default='{"dtype": "float32", "enforce_eager": true, '
                   '"max_model_len": 512, "gpu_memory_utilization": 0.4, "max_num_seqs": 64}')
    p.add_argument("--smoke", action="store_true", help="a few requests per workload, one round (CI)")
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON result path (default: benchmarks/results/serve_bench_<date>.json)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_requests, args.rounds, args.lora_mixes, args.output_len, args.concurrency = 8, 1, 4, 8, 4
        args.offline_rounds, args.offline_settle = 1, 0.0
    if (args.model is None) != (args.av_path is None):
        p.error("--model and --av-path go together")
    return args


def main(argv=None) -> dict:
    import tempfile

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="serve_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    library, names, lora_dir, lora_mixes, lora_rank, build_s = prepare(args, work)
    workloads = build_workloads(args, names, lora_mixes)
    commands = server_commands(args, library, lora_dir, len(lora_mixes), lora_rank)
    rounds: dict[str, list[dict]] = {w.name: [] for w in workloads}
    servers: dict[str, ServerProcess] = {}
    for kind in dict.fromkeys(w.server for w in workloads if args.online):  # one at a time: idle ones cost CPU
        mine = [w for w in workloads if w.server == kind]
        servers[kind] = ServerProcess(commands[kind], work / f"server_{kind}.log")
        with servers[kind] as server:
            for workload in mine:  # warm-up, not recorded
                warm = Workload(workload.name, kind, workload.requests[: min(8, args.concurrency)])
                asyncio.run(run_workload(server.url, args.model, warm, args.concurrency, args.time_limit))
            for _ in range(args.rounds):  # this server's workloads interleaved, round by round
                for workload in mine:
                    rounds[workload.name].append(
                        asyncio.run(run_workload(server.url, args.model, workload, args.concurrency, args.time_limit))
                    )
    online = {name: median_rounds(rs) for name, rs in rounds.items() if rs}
    offline = run_offline(args, library, lora_dir, workloads, len(lora_mixes), lora_rank) if args.offline else {}
    lockstep = run_lockstep(args, library, lora_dir, workloads, len(lora_mixes), lora_rank) if args.lockstep else {}
    report = {
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "argv": vars(args),
                 "cpu_count": os.cpu_count(), "library": names, "lora_per_mix": {
                     "mixes": len(lora_mixes), "rank": lora_rank, "build_s": build_s,
                     "server_start_s": servers["lora"].start_s if "lora" in servers else None}},
        "servers": {kind: {"command": s.command, "start_s": s.start_s} for kind, s in servers.items()},
        "online": online, "online_rounds": rounds, "offline": offline, "lockstep": lockstep,
    }
    out = Path(args.out) if args.out else RESULTS / f"serve_bench_{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    table = markdown_table(online, offline, lockstep)
    out.with_suffix(".md").write_text(table + "\n")
    plot(online, offline, lockstep, out.with_suffix(".png"))
    print(table)
    print(f"\nlora-per-mix: {len(lora_mixes)} adapters of rank {lora_rank} built in {build_s:.1f} s; "
          f"server start {report['meta']['lora_per_mix']['server_start_s']}")
    print(f"results: {out}")
    return report


if __name__ == "__main__":
    main()
