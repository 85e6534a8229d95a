"""Extraction on a real model: SmolLM2-135M-Instruct fine-tuned into a style, its AV at several ranks.

Builds (or reuses, cached) the real checkpoint, fine-tunes it into one style of
``vllm_av.demo.style_tune`` (every parameter trained, as a user's SFT), then extracts
aligned − base at each rank and reports, per rank: extraction seconds, the delta energy the AV
keeps (of all of it, and of the LoRA-target share), the relative error over the LoRA modules, the
dropped share by kind (the tied embeddings, norms), and the per-module retained range.

    python benchmarks/real_extract.py [--style pirate] [--steps 24] [--ranks 8 16 64] [--json PATH]
    python benchmarks/real_extract.py --quick      # 8 steps, ranks 8 and 16
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from vllm_av.offline.extract import extract
from vllm_av.demo.real_model import build_smollm2
from vllm_av.offline.report import dropped_groups
from vllm_av.demo.style_tune import QUESTIONS, base_answers, finetune_style


def measure(model: Path, tuned: Path, rank: int, out: Path) -> dict:
    start = time.perf_counter()
    meta = extract(model, tuned, out, rank=rank, force=True, progress=False)
    seconds = time.perf_counter() - start
    retained = [m.retained_energy for m in meta.served_modules.values()]
    t = meta.totals
    return {"rank": rank, "extract_s": round(seconds, 1), "modules": len(meta.served_modules),
            "retained_share": t.retained_share, "lora_share": t.lora_share,
            "retained_of_lora": t.retained_share / t.lora_share, "rel_error": t.rel_error,
            "dropped_share": t.dropped_share, "dropped_by_kind": dropped_groups(meta),
            "module_retained_min": min(retained), "module_retained_max": max(retained)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--style", default="pirate")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--quick", action="store_true", help="8 fine-tune steps, ranks 8 and 16 (CI)")
    parser.add_argument("--cache", help="cache directory for the real checkpoint")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.ranks = 8, [8, 16]
    model = build_smollm2(args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        answers = base_answers(model, QUESTIONS)
        record = finetune_style(model, tmp / "tuned", args.style, answers, steps=args.steps, progress=False)
        tune_s = time.perf_counter() - start
        rows = [measure(model, tmp / "tuned", rank, tmp / f"av-{rank}") for rank in args.ranks]
        shutil.rmtree(tmp / "tuned")
    print(f"SmolLM2-135M-Instruct, {args.steps}-step SFT into {args.style!r} ({tune_s:.0f} s incl. base answers; "
          f"loss {record['losses'][0]} -> {record['losses'][-1]})")
    print(f"{'rank':>4} {'extract s':>9} {'kept':>7} {'kept of LoRA share':>18} {'rel err':>7} {'dropped':>8}  dropped by kind")
    for r in rows:
        kinds = ", ".join(f"{k} {v:.2%}" for k, v in r["dropped_by_kind"].items())
        print(f"{r['rank']:>4} {r['extract_s']:>9.1f} {r['retained_share']:>7.2%} {r['retained_of_lora']:>18.2%} "
              f"{r['rel_error']:>7.3f} {r['dropped_share']:>8.2%}  {kinds}")
    if args.json:
        meta = {"cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
                "style": args.style, "steps": args.steps, "tune_s": round(tune_s, 1), "losses": record["losses"]}
        Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
