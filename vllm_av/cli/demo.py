"""``vllm-av demo``: serve the embedded trained tiny model and its AV library, and query it.

The package ships ``vllm_av/demo_data/`` (built by ``python -m benchmarks.knobs.run --demo-data``):
a tiny Llama trained from scratch on synthetic medical/legal/financial questions answered at three
preference levels, and nine AVs (``{domain}_{avoid,generic,expert}``, DPO deltas at rank 8).
The demo starts ``vllm-av serve`` on 127.0.0.1 (CPU works), sends persona questions under several
mixes at once (one batch, one mix per request), prints what each mix produced and the level the
benchmark's classifier reads in it, shows a bad mix refused, and stops the server. Without the
embedded data (a source checkout where it was removed) it falls back to
``vllm_av.testing.models.build_demo``: a random model with seeded AVs, plumbing only.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess

DEMO_DATA = Path(__file__).resolve().parents[1] / "demo_data"
# (prompt, mix) pairs sent together; the prompts are in the demo model's chat format.
MEDICAL = "<|user|>i am a retired teacher . what should i do about my fever ?\n<|assistant|>"
LEGAL = "<|user|>i am a shop owner . can my lease be changed without notice ?\n<|assistant|>"
FINANCIAL = "<|user|>i am a homeowner . should i put money into index funds ?\n<|assistant|>"
DEMO_REQUESTS = [
    (MEDICAL, None), (MEDICAL, "medical_expert:1"), (MEDICAL, "medical_expert:0.5"), (MEDICAL, "medical_avoid:1"),
    (MEDICAL, "medical_expert:-1"),
    (LEGAL, None), (LEGAL, "legal_avoid:0.5,financial_expert:1"), (LEGAL, "legal_expert:1,medical_avoid:1"),
    (FINANCIAL, "legal_avoid:0.5,financial_expert:1"), (FINANCIAL, "financial_generic:1"),
]
# The random fallback model (``build_demo``): seeded AVs, gibberish text.
FALLBACK_MIXES = [None, "alpha:1", "alpha:-1", "beta:0.5,gamma:1.5", "alpha:0.8,beta:-0.3,gamma:2"]
LEVEL_MARKERS = {  # the benchmark's classifier in brief (benchmarks/knobs/data.py)
    "avoid": ("sorry ,", "unfortunately ,", "i am afraid", "i can not", "please talk to", "please contact", "please ask"),
    "generic": ("in general ,", "broadly ,", "usually ,", "many people", "it usually helps", "rest and fluids"),
    "expert": ("clinically ,", "under the statute ,", "from a portfolio view ,", "by weight", "written demand", "glide path"),
}


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def level_of(text: str) -> str:
    """avoid / generic / expert by marker phrases, or '?'."""
    scores = {level: sum(text.count(m) for m in markers) for level, markers in LEVEL_MARKERS.items()}
    best = max(scores.values())
    winners = [level for level, score in scores.items() if score == best]
    return winners[0] if best and len(winners) == 1 else "?"


def run_demo(workdir: str, prompt: str | None = None, max_tokens: int | None = None) -> int:
    """Serve the embedded demo (or build the random fallback under ``workdir``), print one completion
    per request. ``prompt`` replaces the demo's prompts (sent under every mix)."""
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    trained = (DEMO_DATA / "model" / "config.json").is_file()
    if trained:
        model, library = DEMO_DATA / "model", DEMO_DATA / "avs"
        print(f"[1/3] embedded demo: trained tiny model and 9 preference AVs in {DEMO_DATA}", flush=True)
        requests = DEMO_REQUESTS
        if prompt:
            requests = [(prompt, mix) for mix in dict.fromkeys(m for _, m in DEMO_REQUESTS)]
    else:
        from vllm_av.testing.models import build_demo

        print(f"[1/3] no embedded demo data: building the random tiny model and AV library in {root} ...", flush=True)
        model, library = build_demo(root)
        requests = [(prompt or "medical: the patient", mix) for mix in FALLBACK_MIXES]
    max_tokens = max_tokens or (40 if trained else 12)
    log = root / "server.log"
    flags = list(CPU_FLAGS)
    if trained:  # the trained model's context is 256 positions
        flags[flags.index("--max-model-len") + 1] = "256"
    command = [sys.executable, "-m", "vllm_av.cli.main", "serve", str(model), "--av-path", str(library), *flags]
    print(f"[2/3] starting: vllm-av serve {model} --av-path {library} ... (log: {log})", flush=True)
    with ServerProcess(command, log) as server:
        url = server.url
        listing = _get(f"{url}/v1/av")
        print("[3/3] GET /v1/av:", ", ".join(f"{a['name']} (rank {a['rank']}, {a['compatibility']})" for a in listing["data"]))
        print(f"\n{len(requests)} requests in one batch, one mix per request (greedy):")

        def ask(request):
            text, mix = request
            body = {"model": str(model), "prompt": text, "max_tokens": max_tokens, "temperature": 0}
            if mix:
                body["vllm_xargs"] = {"av": mix}
            return _post(f"{url}/v1/completions", body)

        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(ask, requests))
        last = None
        for (text, mix), reply in zip(requests, replies):
            if text != last:
                shown = text.replace("<|user|>", "").replace("\n<|assistant|>", "")
                print(f"\n  prompt: {shown!r}")
                last = text
            answer = reply["choices"][0]["text"]
            tag = f"[{level_of(answer)}] " if trained else ""
            print(f"    {mix or '(base model)':<36} -> {tag}{answer!r}")
        bad = _post(f"{url}/v1/completions", {"model": str(model), "prompt": requests[0][0], "vllm_xargs": {"av": "delta:1"}})
        print(f"\n  a bad mix ('delta:1') is refused: {bad['error']['code']} {bad['error']['message']}")
        return 0

