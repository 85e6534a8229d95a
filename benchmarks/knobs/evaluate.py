"""Serving and measuring: one vLLM engine with the vllm-av plugin for every generation (many
mixes in one batch), the merged-weights oracle check, KL divergences, and small statistics."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import data as D

MAX_TOKENS = 40


@dataclass
class Request:
    prompt: str
    mix: dict[str, float] | None
    meta: dict


class Engine:
    """vLLM (CPU, float32, eager) serving ``model_dir`` with the AV library ``library``."""

    def __init__(self, model_dir: Path, library: Path, max_per_request: int = 4, max_abs_scale: float = 4.0,
                 classify=D.classify):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        self.classify = classify
        start = time.perf_counter()
        self.llm = LLM(str(model_dir), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=256,
                       gpu_memory_utilization=0.4, seed=0,
                       additional_config={"av": {"path": str(library), "max_per_request": max_per_request,
                                                 "max_abs_scale": max_abs_scale}})
        self.start_s = time.perf_counter() - start

    def generate(self, requests: list[Request]) -> tuple[list[dict], float]:
        """Greedy completions for all requests in one ``generate`` call (one mix per request)."""
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                 extra_args={"av": r.mix} if r.mix else None) for r in requests]
        start = time.perf_counter()
        outputs = self.llm.generate([r.prompt for r in requests], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        results = []
        for r, o in zip(requests, outputs):
            text = o.outputs[0].text
            results.append({**r.meta, "mix": r.mix, "text": text, "level": self.classify(text),
                            "tokens": list(o.outputs[0].token_ids), "prompt_tokens": len(o.prompt_token_ids)})
        return results, seconds


def strip_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


def oracle_check(model_dir: Path, library: Path, served: list[dict], tie_tol: float = 1e-4) -> dict:
    """Greedy tokens of the merged-weights transformers model (``vllm_av.testing.oracle.merged_model``)
    against vLLM's for each served sample; a divergence is tolerated only at an exact near-tie
    (the oracle's top-2 logits within ``tie_tol``), and counted."""
    from transformers import AutoTokenizer

    from vllm_av.testing.oracle import merged_model

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    equal = ties = 0
    mismatches = []
    for s in served:
        model = merged_model(model_dir, library, s["mix"] or {})
        ids = tok(s["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        want = strip_eos(out.sequences[0, ids.shape[1]:].tolist(), tok.eos_token_id)
        got = strip_eos(s["tokens"], tok.eos_token_id)
        if want == got:
            equal += 1
            continue
        k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        top2 = out.scores[k][0].topk(2).values if k < len(out.scores) else None
        if top2 is not None and (top2[0] - top2[1]).item() < tie_tol:
            ties += 1
        else:
            mismatches.append({"prompt": s["prompt"], "mix": s["mix"], "vllm": got, "oracle": want, "at": k})
    return {"samples": len(served), "equal": equal, "near_ties": ties, "mismatches": mismatches}


@torch.no_grad()
def kl_to_reference(model_dir: Path, library: Path, ref_mix: dict, mix: dict, samples: list[dict]) -> float:
    """Mean per-token KL(P_ref ‖ P_mix) over the response tokens of ``samples`` (teacher-forced on
    the reference model's own greedy tokens), both models merged in transformers."""
    from transformers import AutoTokenizer

    from vllm_av.testing.oracle import merged_model

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ref, other = merged_model(model_dir, library, ref_mix), merged_model(model_dir, library, mix)
    total, count = 0.0, 0
    for s in samples:
        p = tok(s["prompt"]).input_ids
        ids = torch.tensor([p + s["tokens"]])
        a = torch.log_softmax(ref(ids).logits[0, len(p) - 1:-1].double(), -1)
        b = torch.log_softmax(other(ids).logits[0, len(p) - 1:-1].double(), -1)
        total += (a.exp() * (a - b)).sum().item()
        count += a.shape[0]
    return total / max(count, 1)


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); 0 when either side is constant."""
    def ranks(a):
        a = np.asarray(a, float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for v in np.unique(a):
            r[a == v] = r[a == v].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def summarise(results: list[dict], target: int) -> dict:
    """Mean level (unclassified excluded), accuracy for ``target`` and unclassified count."""
    levels = [r["level"] for r in results]
    known = [lv for lv in levels if lv is not None]
    return {"n": len(levels), "mean_level": float(np.mean(known)) if known else None,
            "accuracy": sum(lv == target for lv in levels) / max(len(levels), 1),
            "unclassified": sum(lv is None for lv in levels),
            "shares": [sum(lv == i for lv in levels) / max(len(levels), 1) for i in range(3)]}
