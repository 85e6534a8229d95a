"""RE-Control end to end on the preference-knob task, small, on CPU (issue 20).

    PYTHONPATH=. python -m benchmarks.recontrol.run --out /tmp/rc --results benchmarks/results   # full
    PYTHONPATH=. python -m benchmarks.recontrol.run --quick --out /tmp/rc-quick                  # CI

Base: the demo tiny model (``vllm_av/demo_data/model``, the knob task's base) and its AV library.
1. Collect: greedy base answers to the task's training prompts, the post-norm last hidden state of
   every generated position, each answer scored by ``expert_reward`` (expert 1, generic 0.5, else 0).
2. Train the value function (2-layer ReLU MLP, TD loss).
3. Serve through vLLM with the plugin, one engine and one batch for everything: base, an (α, n)
   sweep of RE-Control, the domain's expert AV at several λ, and an expert-level system prompt.
   Mean reward, level distribution, diversity: the paper's ∏_{n=2..4} unique/total n-grams of each
   answer, and distinct bigrams across a setting's answers (which falls when answers collapse).
   A few steered answers are checked against the reference decoder (exact greedy tokens).
4. Cost, 32 concurrent requests, side by side: output tok/s served without steering, steered at
   n=30 and at the best setting; the transformers reference at n=30 run as the published code runs
   (``generate``, every position steered, batches of 16) and as our lean oracle loop (one batch and
   batches of 16); and the value steps' own arithmetic in isolation (the served overhead per decode
   step against it). Served base tok/s over the reference's is the ceiling of any steering
   implementation's speed-up on this machine.
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
from benchmarks.recontrol.reward import expert_reward

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "vllm_av" / "demo_data" / "model"
AVS = ROOT / "vllm_av" / "demo_data" / "avs"
REWARD = "benchmarks.recontrol.reward:expert_reward"
MAX_TOKENS = 40
FULL = dict(train_prompts=672, test_prompts=96, epochs=60, width=256, lr=1e-3, alphas=[0.5, 1.0, 2.0, 5.0, 10.0, 20.0],
            steps=[5, 10, 30], lambdas=[0.25, 0.5, 1.0], oracle_samples=6, speed_requests=32, speed_rounds=7)
QUICK = dict(train_prompts=96, test_prompts=24, epochs=15, width=128, lr=1e-3, alphas=[2.0, 10.0], steps=[5, 30],
             lambdas=[0.5, 1.0], oracle_samples=2, speed_requests=32, speed_rounds=3)
SPEED_STEPS = 30  # the paper's n for its timing


def log(msg: str) -> None:
    print(msg, flush=True)


def diversity(text: str) -> float:
    """The paper's diversity of one answer: ∏_{n=2..4} unique n-grams / n-grams (words); 1 if too short."""
    words = text.split()
    score = 1.0
    for n in (2, 3, 4):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if grams:
            score *= len(set(grams)) / len(grams)
    return score


def distinct_bigrams(texts: list[str]) -> float:
    """Unique word bigrams over all bigrams across ``texts`` (0 when there are none)."""
    grams = [tuple(words[i:i + 2]) for words in (t.split() for t in texts) for i in range(len(words) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarise(texts: list[str]) -> dict:
    levels = [D.classify(t) for t in texts]
    shares = {name: sum(lv == i for lv in levels) / len(levels) for i, name in enumerate(D.LEVELS)}
    shares["undecided"] = sum(lv is None for lv in levels) / len(levels)
    return {"reward": float(np.mean(expert_reward(prompts=[""] * len(texts), completions=texts))),
            "levels": shares, "diversity": float(np.mean([diversity(t) for t in texts])),
            "distinct2": distinct_bigrams(texts), "words": float(np.mean([len(t.split()) for t in texts]))}


def settings(cfg: dict, queries: list) -> list[tuple[str, dict, dict]]:
    """``(label, meta, extra_args)`` per (setting, test query); the prompt baseline changes the prompt instead."""
    rows = [("base", {"kind": "base"}, {})]
    for alpha in cfg["alphas"]:
        for steps in cfg["steps"]:
            rows.append((f"recontrol a={alpha} n={steps}", {"kind": "recontrol", "alpha": alpha, "steps": steps},
                         {"recontrol": "expert", "recontrol_alpha": alpha, "recontrol_steps": steps}))
    for lam in cfg["lambdas"]:
        rows.append((f"AV expert λ={lam}", {"kind": "av", "lambda": lam}, {"av_level": lam}))
    rows.append(("prompt: expert instruction", {"kind": "prompt"}, {}))
    return rows


def sweep(llm, cfg: dict, queries: list) -> dict:
    from vllm import SamplingParams

    jobs = []
    for label, meta, extra in settings(cfg, queries):
        for q in queries:
            args = dict(extra)
            if "av_level" in args:
                args = {"av": {f"{q.domain}_expert": args.pop("av_level")}}
            prompt = q.prompt(D.LEVEL_INSTRUCTIONS["expert"]) if meta["kind"] == "prompt" else q.prompt()
            jobs.append((label, meta, prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                             extra_args=args or None)))
    start = time.perf_counter()
    outputs = llm.generate([j[2] for j in jobs], [j[3] for j in jobs], use_tqdm=False)
    seconds = time.perf_counter() - start
    by_label: dict = {}
    for (label, meta, _, _), out in zip(jobs, outputs):
        entry = by_label.setdefault(label, {**meta, "texts": [], "tokens": [], "prompt_ids": []})
        entry["texts"].append(out.outputs[0].text)
        entry["tokens"].append(list(out.outputs[0].token_ids))
        entry["prompt_ids"].append(list(out.prompt_token_ids))
    results = {}
    for label, entry in by_label.items():
        results[label] = {**{k: v for k, v in entry.items() if k not in ("texts", "tokens", "prompt_ids")},
                          **summarise(entry["texts"]), "examples": entry["texts"][:3]}
    log(f"  sweep: {len(jobs)} requests in one batch, {seconds:.1f}s")
    return {"results": results, "seconds": seconds, "requests": len(jobs), "_raw": by_label}


def oracle(values: Path, raw: dict, samples: int) -> dict:
    """Steered served answers against the reference decoder (autograd SGD on the hidden state)."""
    from vllm_av.testing.oracle import oracle_recontrol_tokens

    checks = []
    steered = [e for e in raw.values() if e["kind"] == "recontrol"]
    for i in range(samples):
        entry = steered[i % len(steered)]
        j = (i * 7) % len(entry["tokens"])
        want = oracle_recontrol_tokens(BASE, AVS, None, values / "expert", entry["alpha"], entry["steps"],
                                       entry["prompt_ids"][j], len(entry["tokens"][j]))
        checks.append(want == entry["tokens"][j])
    return {"samples": len(checks), "equal": int(sum(checks))}


def interleaved_generate(llm, prompts: list[str], runs: dict[str, dict | None], rounds: int) -> dict:
    """Output tok/s of each of ``runs`` (label -> extra_args), run in turn ``rounds`` times after a
    warm-up: per label the median seconds, and per round the seconds (for ratios within a round)."""
    from vllm import SamplingParams

    params = {label: SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, extra_args=extra)
              for label, extra in runs.items()}
    for p in params.values():
        llm.generate(prompts[:4], p, use_tqdm=False)  # warm
    seconds = {label: [] for label in runs}
    for _ in range(rounds):
        for label, p in params.items():
            start = time.perf_counter()
            llm.generate(prompts, p, use_tqdm=False)
            seconds[label].append(time.perf_counter() - start)
    tokens = len(prompts) * MAX_TOKENS
    return {label: {"seconds": float(np.median(s)), "tok_per_s": tokens / float(np.median(s)), "rounds": s}
            for label, s in seconds.items()}


def isolated_steps(values: Path, rows: int, steps: int, alpha: float, repeats: int = 100) -> float:
    """Seconds of one sampled-rows steering call (``steps`` closed-form steps on ``rows`` rows), alone
    (measured before the engine starts, so nothing else runs; the median of 5 rounds)."""
    import torch

    from vllm_av.recontrol.valuefile import load_value_function
    from vllm_av.serving.worker.steering import Group, Plan, steer_rows

    value = load_value_function(values / "expert")
    plan = Plan(rows, [Group(value, torch.arange(rows), torch.full((rows, 1), alpha), [rows] * steps)])
    hidden = torch.randn(rows, value.linears[0].in_features)
    rounds = []
    with torch.inference_mode():
        steer_rows(plan, hidden)
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                steer_rows(plan, hidden)
            rounds.append((time.perf_counter() - start) / repeats)
    return float(np.median(rounds))


def load_reference(values: Path):
    """``(model, tokenizer, value function)`` of the transformers reference, loaded once for every timing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_av.recontrol.valuefile import load_value_function

    model = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(BASE)), load_value_function(values / "expert")


def reference_speed(reference, prompts: list[str], alpha: float, steps: int, batch_size: int, rounds: int,
                    published: bool = False) -> dict:
    """The reference decoder's output tok/s on ``prompts``, ``batch_size`` at a time (the paper ran 16),
    the median of ``rounds``: the lean oracle loop, or (``published``) ``generate_as_published``, the
    published code's way. ``reference``: :func:`load_reference`; ``tokens``: the ids of the first batch."""
    from vllm_av.recontrol.reference import generate_as_published, recontrol_generate

    decode = generate_as_published if published else recontrol_generate
    model, tok, value = reference
    ids = [tok(p).input_ids for p in prompts]
    pad = tok.pad_token_id or 0
    decode(model, value, ids[:4], alpha, steps, 4, pad_token_id=pad)  # warm
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        batches = [decode(model, value, ids[first:first + batch_size], alpha, steps, MAX_TOKENS, pad_token_id=pad)
                   for first in range(0, len(ids), batch_size)]
        times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {"seconds": seconds, "tok_per_s": len(prompts) * MAX_TOKENS / seconds, "batch_size": batch_size,
            "rounds": times, "tokens": batches[0]}


def same_until_eos(lean: list[list[int]], published: list[list[int]], eos: int) -> bool:
    """Whether the published-style decode gave the lean loop's tokens up to each answer's first end
    token ``eos`` (``generate`` with ``min_new_tokens`` forbids it; the lean loop without ``eos`` takes it)."""
    cut = [row[:row.index(eos)] if eos in row else row for row in lean]
    return all(c == p[:len(c)] for c, p in zip(cut, published))


def speed(llm, values: Path, cfg: dict, queries: list, best: dict, isolated_s: float) -> dict:
    prompts = [q.prompt() for q in queries][: cfg["speed_requests"]]
    prompts = (prompts * (cfg["speed_requests"] // len(prompts) + 1))[: cfg["speed_requests"]]
    rows = len(prompts)
    setting = lambda a, n: {"recontrol": "expert", "recontrol_alpha": a, "recontrol_steps": n}  # noqa: E731
    res = {"requests": rows, "max_tokens": MAX_TOKENS}
    res.update(interleaved_generate(llm, prompts, {
        "base": None, "steered_n30": setting(best["alpha"], SPEED_STEPS),
        "steered_best": setting(best["alpha"], best["steps"])}, cfg["speed_rounds"]))
    rounds = zip(res["base"]["rounds"], res["steered_n30"]["rounds"])
    overheads = [(steered - base) / MAX_TOKENS for base, steered in rounds]
    res["isolated_step_call_s"] = isolated_s
    res["served_overhead_per_step_s"] = float(np.median(overheads))  # per round, steered minus base
    res["overhead_vs_isolated"] = res["served_overhead_per_step_s"] / res["isolated_step_call_s"]
    res["slowdown_n30"] = res["steered_n30"]["seconds"] / res["base"]["seconds"]
    reference_rounds = max(1, cfg["speed_rounds"] // 2)
    reference = load_reference(values)
    res["reference_n30"] = reference_speed(reference, prompts, best["alpha"], SPEED_STEPS, rows, reference_rounds)
    res["reference_n30_batch16"] = reference_speed(reference, prompts, best["alpha"], SPEED_STEPS, 16,
                                                   reference_rounds)
    res["published_n30_batch16"] = reference_speed(reference, prompts, best["alpha"], SPEED_STEPS, 16,
                                                   reference_rounds, published=True)
    res["published_same_tokens"] = same_until_eos(res["reference_n30_batch16"].pop("tokens"),
                                                  res["published_n30_batch16"].pop("tokens"), reference[1].eos_token_id)
    res["reference_n30"].pop("tokens")
    served, base_tps = res["steered_n30"]["tok_per_s"], res["base"]["tok_per_s"]
    for key in ("reference_n30", "reference_n30_batch16", "published_n30_batch16"):
        res[f"served_vs_{key}"] = served / res[key]["tok_per_s"]
        res[f"ceiling_vs_{key}"] = base_tps / res[key]["tok_per_s"]  # steering at no cost at all
    return res


def plots(res: dict, cfg: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_res = res["sweep"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4), dpi=80)
    for steps in cfg["steps"]:
        ys = [sweep_res[f"recontrol a={a} n={steps}"]["reward"] for a in cfg["alphas"]]
        ax.plot(cfg["alphas"], ys, marker="o", label=f"RE-Control n={steps}")
    ax.axhline(sweep_res["base"]["reward"], color="k", ls=":", label="base")
    ax.axhline(sweep_res["prompt: expert instruction"]["reward"], color="grey", ls="--", label="expert prompt")
    for lam in cfg["lambdas"]:
        ax.axhline(sweep_res[f"AV expert λ={lam}"]["reward"], color="tab:red", lw=0.8, alpha=0.3 + 0.6 * lam / max(cfg["lambdas"]))
    ax.set(xscale="log", xlabel="step size α", ylabel="mean reward (expert=1, generic=0.5)",
           title="RE-Control sweep (red lines: expert AV at λ " + ", ".join(map(str, cfg["lambdas"])) + ")")
    ax.legend(fontsize=7)
    fig.tight_layout()
    sweep_png = out / "recontrol_sweep.png"
    fig.savefig(sweep_png)
    plt.close(fig)

    labels = ["base", res["best"]["label"], res["matched_av"]["label"], "prompt: expert instruction"]
    fig, ax = plt.subplots(figsize=(6.5, 3.0), dpi=80)
    bottom = np.zeros(len(labels))
    for level in (*D.LEVELS, "undecided"):
        shares = np.array([sweep_res[label]["levels"][level] for label in labels])
        ax.bar(range(len(labels)), shares, bottom=bottom, label=level)
        bottom += shares
    ax.set_xticks(range(len(labels)), [label.replace("recontrol ", "RC ") for label in labels], fontsize=7)
    ax.set(ylabel="share of answers", title="answer level")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    levels_png = out / "recontrol_levels.png"
    fig.savefig(levels_png)
    plt.close(fig)
    return [sweep_png, levels_png]


def table(res: dict) -> str:
    lines = ["| setting | mean reward | avoid / generic / expert / undecided | diversity | distinct-2 | words |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, r in res["sweep"].items():
        lv = r["levels"]
        lines.append(f"| {label} | {r['reward']:.3f} | {lv['avoid']:.2f} / {lv['generic']:.2f} / {lv['expert']:.2f} / "
                     f"{lv['undecided']:.2f} | {r['diversity']:.3f} | {r['distinct2']:.3f} | {r['words']:.1f} |")
    s = res["speed"]
    lines += ["", f"Cost, {s['requests']} concurrent requests × {s['max_tokens']} tokens (served: median of "
              f"{len(s['base']['rounds'])} interleaved rounds; reference: median of its rounds):", "",
              "| run | output tok/s |", "|---|---:|",
              f"| vLLM, no steering | {s['base']['tok_per_s']:.0f} |",
              f"| vLLM, RE-Control n={SPEED_STEPS} | {s['steered_n30']['tok_per_s']:.0f} |",
              f"| vLLM, RE-Control best ({res['best']['label']}) | {s['steered_best']['tok_per_s']:.0f} |",
              f"| transformers reference, n={SPEED_STEPS}, all {s['requests']} in one batch | {s['reference_n30']['tok_per_s']:.0f} |",
              f"| transformers reference, n={SPEED_STEPS}, batches of 16 (the paper's) | "
              f"{s['reference_n30_batch16']['tok_per_s']:.0f} |",
              f"| transformers reference as published (`generate`, every position steered), n={SPEED_STEPS}, "
              f"batches of 16 | {s['published_n30_batch16']['tok_per_s']:.0f} |", "",
              "| served RE-Control n=30 against | speed-up | ceiling (served base, no steering) |", "|---|---:|---:|"]
    for key, what in (("published_n30_batch16", "reference as published, batches of 16"),
                      ("reference_n30_batch16", "lean reference, batches of 16"),
                      ("reference_n30", f"lean reference, all {s['requests']} in one batch")):
        lines.append(f"| {what} | {s[f'served_vs_{key}']:.2f}× | {s[f'ceiling_vs_{key}']:.2f}× |")
    lines += ["", f"Served slowdown at n={SPEED_STEPS}: {s['slowdown_n30']:.2f}×; served overhead per decode step "
              f"{s['served_overhead_per_step_s'] * 1e3:.2f} ms against {s['isolated_step_call_s'] * 1e3:.2f} ms for the "
              f"value steps alone ({s['overhead_vs_isolated']:.2f}×). The published-style reference gave the lean "
              f"loop's tokens: {s['published_same_tokens']}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work directory")
    ap.add_argument("--quick", action="store_true", help="CI version (fewer prompts, epochs and settings)")
    ap.add_argument("--results", help="also copy recontrol*.json|png|md here (e.g. benchmarks/results)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from vllm_av.recontrol.collect import collect
    from vllm_av.recontrol.train import train_value

    train_set, test_set = D.split()
    prompts = [q.prompt() for d in D.DOMAINS for q in train_set[d]]
    prompts = prompts[:: max(1, len(prompts) // cfg["train_prompts"])][: cfg["train_prompts"]]
    tests = [q for d in D.DOMAINS for q in test_set[d]]
    tests = tests[:: max(1, len(tests) // cfg["test_prompts"])][: cfg["test_prompts"]]
    res: dict = {"config": cfg, "reward": REWARD}

    log(f"1. collect: {len(prompts)} greedy base answers")
    shutil.rmtree(out / "data", ignore_errors=True)
    res["collect"] = collect(BASE, prompts, REWARD, out / "data", max_new_tokens=MAX_TOKENS, batch_size=32,
                             progress=False)
    res["collect"].pop("texts", None)
    log(f"2. train the value function ({cfg['epochs']} epochs, width {cfg['width']})")
    values = out / "values"
    shutil.rmtree(values, ignore_errors=True)
    res["train"] = train_value(out / "data", values / "expert", name="expert", layers=2, width=cfg["width"],
                               epochs=cfg["epochs"], lr=cfg["lr"], progress=False)

    isolated_s = isolated_steps(values, cfg["speed_requests"], SPEED_STEPS, alpha=1.0)
    log("3. serve the sweep")
    from vllm import LLM

    llm = LLM(str(BASE), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=256,
              gpu_memory_utilization=0.4, seed=0,
              additional_config={"av": {"path": str(AVS), "recontrol_path": str(values), "recontrol_max_steps": 60,
                                         "recontrol_max_alpha": 50.0}})
    swept = sweep(llm, cfg, tests)
    raw = swept.pop("_raw")
    res["sweep"], res["sweep_seconds"] = swept["results"], swept["seconds"]
    recontrol = {k: v for k, v in res["sweep"].items() if v["kind"] == "recontrol"}
    best_label = max(recontrol, key=lambda k: (recontrol[k]["reward"], -recontrol[k]["steps"]))
    res["best"] = {"label": best_label, **{k: recontrol[best_label][k] for k in ("alpha", "steps", "reward")}}
    avs = {k: v for k, v in res["sweep"].items() if v["kind"] == "av"}
    matched = min(avs, key=lambda k: abs(avs[k]["reward"] - res["best"]["reward"]))
    res["matched_av"] = {"label": matched, "lambda": avs[matched]["lambda"], "reward": avs[matched]["reward"]}
    res["oracle"] = oracle(values, raw, cfg["oracle_samples"])
    log(f"  best {best_label}: reward {res['best']['reward']:.3f} (base {res['sweep']['base']['reward']:.3f}); "
        f"oracle {res['oracle']['equal']}/{res['oracle']['samples']}")

    log(f"4. cost at {cfg['speed_requests']} concurrent requests")
    res["speed"] = speed(llm, values, cfg, tests, res["best"], isolated_s)
    del llm
    res["seconds"] = time.perf_counter() - start
    stem = "recontrol_quick" if args.quick else "recontrol"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    (out / f"{stem}.md").write_text(table(res) + "\n")
    pngs = plots(res, cfg, out)
    log(table(res))
    log(f"done in {res['seconds']:.0f}s")
    if args.results:
        dest = Path(args.results)
        dest.mkdir(parents=True, exist_ok=True)
        for path in [out / f"{stem}.json", out / f"{stem}.md", *pngs]:
            shutil.copy(path, dest / path.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
