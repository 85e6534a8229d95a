"""DPO on the real model with TRL's ``DPOTrainer`` (issue 18, part 3): full fine-tuning, every weight.

The loss is TRL's sigmoid DPO plus its ``sft`` term on the chosen answer (``loss_type=["sigmoid",
"sft"]``, the RPO recipe), which lets a few steps on 2 CPU cores move a 135M model. Autocast to
bfloat16 on CPU; the master weights and the saved checkpoint stay float32, so the extracted AV
is the float32 weight delta.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from . import real_data as R


def dpo_rows(queries: list[R.Query], level: int, seed: int = 0) -> list[dict]:
    """Conversational preference rows: the answer at ``level`` chosen over each other level's answer."""
    rows = [{"prompt": q.messages(), "chosen": [{"role": "assistant", "content": q.responses[level]}],
             "rejected": [{"role": "assistant", "content": q.responses[other]}]}
            for q in queries for other in range(3) if other != level]
    random.Random(seed).shuffle(rows)
    return rows


def dpo(base_dir: Path, rows: list[dict], out_dir: Path, *, steps: int, batch_size: int = 8, lr: float = 5e-5,
        beta: float = 0.1, sft_weight: float = 1.0, seed: int = 0, threads: int = 2) -> dict:
    """Train ``base_dir`` with TRL's DPOTrainer on ``rows`` for ``steps`` steps; save to ``out_dir``.

    Returns the training record: loss, reward margin and accuracy of the last logged step, seconds.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    scratch = tempfile.TemporaryDirectory(prefix="vllm-av-trl-")  # TRL's run directory, not the checkpoint
    config = DPOConfig(output_dir=scratch.name, per_device_train_batch_size=batch_size, max_steps=steps,
                       learning_rate=lr, beta=beta, loss_type=["sigmoid", "sft"], loss_weights=[1.0, sft_weight],
                       max_length=192, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=True,
                       dataloader_num_workers=0, seed=seed, disable_tqdm=False)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    scratch.cleanup()
    trainer.model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    logs = [h for h in trainer.state.log_history if "loss" in h]
    last = logs[-1] if logs else {}
    return {"trainer": "trl.DPOTrainer", "trl_version": __import__("trl").__version__, "fine_tuning": "full",
            "steps": steps, "batch_size": batch_size, "lr": lr, "beta": beta, "loss_type": ["sigmoid", "sft"],
            "sft_weight": sft_weight, "loss": float(last.get("loss", float("nan"))),
            "margin": float(last.get("rewards/margins", float("nan"))),
            "reward_accuracy": float(last.get("rewards/accuracies", float("nan"))), "seconds": seconds,
            "losses": [float(h["loss"]) for h in logs]}


def av_name(domain: str, level: str, rank: int | None = None) -> str:
    return f"{domain}_{level}" + (f"_r{rank}" if rank else "")


def build(out: Path, cfg: dict, train: dict[str, list[R.Query]], timings: dict, log) -> tuple[Path, Path, dict]:
    """The real base model, one TRL DPO per (domain, level), and its AV at ``cfg["av_rank"]`` (plus the
    expert AVs at each of ``cfg["ranks"]``). The DPO checkpoints are deleted once extracted (540 MB each)."""
    import shutil

    from vllm_av.offline.extract import extract
    from vllm_av.demo.real_model import build_smollm2

    base_dir, library = build_smollm2(), out / "avs"
    pairs = cfg["dpo_steps"] * cfg["dpo_batch"]
    stats, timings["dpo_s"], timings["extract_s"] = {}, {}, {}
    for d in R.DOMAINS:
        for li, level in enumerate(R.LEVELS):
            name = av_name(d, level)
            aligned = out / "aligned" / name
            rows = dpo_rows(train[d], li, seed=li)[:pairs]
            stats[name] = dpo(base_dir, rows, aligned, steps=cfg["dpo_steps"], batch_size=cfg["dpo_batch"], lr=cfg["dpo_lr"])
            timings["dpo_s"][name] = stats[name]["seconds"]
            t = time.perf_counter()
            meta = extract(base_dir, aligned, library / name, rank=cfg["av_rank"], name=name, force=True, progress=False,
                           description=f"{d} domain, {level} level: TRL DPO of {base_dir.name}, rank {cfg['av_rank']}")
            timings["extract_s"][name] = time.perf_counter() - t
            stats[name]["dropped_share"] = meta.totals.dropped_share
            stats[name]["retained_share"] = meta.totals.retained_share
            if level == "expert":
                for r in cfg["ranks"]:
                    extract(base_dir, aligned, library / av_name(d, level, r), rank=r, name=av_name(d, level, r),
                            force=True, progress=False, description=f"{d} expert AV at SVD rank {r}")
            shutil.rmtree(aligned)
            log(f"  DPO {name}: {cfg['dpo_steps']} steps, loss {stats[name]['loss']:.2f}, margin "
                f"{stats[name]['margin']:.2f}, {stats[name]['seconds']:.0f}s; delta energy kept at rank "
                f"{cfg['av_rank']}: {meta.totals.retained_share:.1%}")
    return base_dir, library, stats


def retrain_combos(base_dir: Path, out: Path, train: dict, test: dict, combos: list[tuple[int, ...]], cfg: dict) -> list[dict]:
    """The alternative to AV arithmetic: one TRL DPO per multidomain combination, then evaluation."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import greedy

    rows = []
    for combo in combos:
        per_domain = cfg["dpo_steps"] * cfg["dpo_batch"] // 3 + 1
        pairs = [r for d, li in zip(R.DOMAINS, combo) for r in dpo_rows(train[d], li, seed=li)[:per_domain]]
        random.Random(0).shuffle(pairs)
        target = out / "retrained"
        record = dpo(base_dir, pairs, target, steps=cfg["dpo_steps"], batch_size=cfg["dpo_batch"], lr=cfg["dpo_lr"])
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(target))
        shares = []
        for d, li in zip(R.DOMAINS, combo):
            levels = [R.classify(x) for x in greedy(model, tok, [q.prompt() for q in test[d]], 40)]
            shares.append(sum(lv == li for lv in levels) / len(levels))
        shutil.rmtree(target)
        rows.append({"combo": [R.LEVELS[i] for i in combo], "shares": shares, "reached": min(shares) >= 0.5,
                     "train_s": record["seconds"], "eval_s": time.perf_counter() - t})
    return rows
