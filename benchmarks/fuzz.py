"""Fuzz AV request admission: hostile ``av`` mixes and ``vllm_xargs`` payloads, server and offline.

Hypothesis generates payloads that the server's own parser (:func:`vllm_av.serving.front.mix.parse_mix`, same
limits) rejects: bad separators, unicode look-alikes, huge numbers, NaN/Inf spelled every way,
empty and long names, duplicates, thousands of entries, wrong JSON types, and ``vllm_xargs``
that is not an object. Each one must get HTTP 4xx whose message names the problem (never a
5xx), and the valid request sent right after it must return exactly its reference tokens.
Offline, the same specs as ``SamplingParams(extra_args={"av": ...})`` (plus Python objects no
JSON can carry) must raise ``ValueError`` and the engine must keep serving.

    python benchmarks/fuzz.py --count 1200 --offline-count 1000 --out benchmarks/results/fuzz.json

``tests/test_reliability_server.py`` runs a few hundred of these in CI.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.front.mix import MixError, parse_mix

NAMES = ("alpha", "beta", "gamma")
# The fuzzed server: 3 AVs per request, |scale| up to 1e30 (huge but legal: see the isolation
# test), names up to 16 characters.
LIMITS = dict(max_per_request=3, max_abs_scale=1e30, max_name_length=16)
SERVER_FLAGS = ["--av-max-per-request", "3", "--av-max-abs-scale", "1e30", "--av-max-name-length", "16"]
CONFIG = AVConfig(path="/unused", **LIMITS)
VALID_MIXES = [None, "alpha:1", "beta:-0.5,gamma:1.5", "alpha:0.8,beta:-0.5,gamma:1.7"]
PROMPT = "medical: the patient"
MAX_TOKENS = 4

NAN_INF = ["nan", "NaN", "NAN", "-nan", "+nan", "nan(0x1)", "snan", "inf", "-inf", "+inf", "Inf", "INF",
           "infinity", "Infinity", "-Infinity", "INFINITY", "1e400", "-1e999", "1e309", "9" * 400, "1e31",
           "-2e30", "∞", "-∞", "NaN1", "in f"]
BAD_NUMBERS = ["", " ", ".", "-", "+", "e1", "1e", "1.2.3", "--1", "+-1", "0x10", "0b1", "1_000", "1,5", "１", "١",
               "٣.٥", "1\u00a0e3", "1e+", "1j", "½", "true", "null", "[1]", "{}", "'1'", '"1"', "1\x00"]
NAMES_BAD = ["", " ", "ALPHA", "alpha ", "alph", "alpha\u200b", "аlpha", "alpha\u0301", "../alpha", "a/b", "a\\b",
             "alpha;beta", "x" * 17, "x" * 5000, "é", "🙂", "\x00", "\n", "delta", "alpha*", "*", "%61lpha"]
SEPARATORS = [",", ";", " ", ", ", ",,", "|", "&", "\n", "\t", "\u060c", "\uff0c", "\u3001", "\u200b"]
ASSIGN = [":", "=", "::", " : ", "：", "->", ""]


def names_the_mix(message: str) -> bool:
    """The message is about the ``av`` mix (or the ``extra_args`` that carry it)."""
    return bool(re.search(r"\bav\b|\bAVs\b|extra_args", message))


def rejected(spec) -> bool:
    """True when the server's parser refuses ``spec`` (the payloads fuzzed here)."""
    try:
        parse_mix(spec, NAMES, CONFIG)
    except MixError:
        return True
    return False


def _entry() -> st.SearchStrategy[str]:
    name = st.sampled_from(NAMES) | st.sampled_from(NAMES_BAD) | st.text(max_size=20)
    scale = (st.sampled_from(NAN_INF + BAD_NUMBERS) | st.floats().map(repr)
             | st.integers(-10**40, 10**40).map(str) | st.text(max_size=12))
    return st.builds(lambda n, a, s: f"{n}{a}{s}", name, st.sampled_from(ASSIGN), scale)


def _joined(entries: st.SearchStrategy[list[str]]) -> st.SearchStrategy[str]:
    return st.builds(lambda es, sep: sep.join(es), entries, st.sampled_from(SEPARATORS))


def string_specs() -> st.SearchStrategy[str]:
    """Hostile ``av`` strings: few entries, duplicates, thousands of entries, very long strings."""
    few = _joined(st.lists(_entry(), min_size=1, max_size=5))
    duplicates = st.builds(lambda n, k: ",".join([f"{n}:1"] * k), st.sampled_from(NAMES), st.integers(2, 3))
    many = st.builds(lambda k, n: ",".join(f"{n}:{i % 3}" for i in range(k)), st.integers(4, 3000), st.sampled_from(NAMES))
    long = st.builds(lambda c, k: c * k, st.sampled_from(["a", ",", ":", "alpha:1,", "é", "0"]), st.integers(200, 20000))
    return (few | duplicates | many | long | st.text(max_size=200)).filter(rejected)


def json_values(depth: int = 2) -> st.SearchStrategy:
    """Any JSON value (nested objects and lists included)."""
    scalars = (st.none() | st.booleans() | st.integers(-10**30, 10**30)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                        max_leaves=8)


def payloads() -> st.SearchStrategy[dict]:
    """``{"xargs": <vllm_xargs value>}`` or ``{"raw_av": <JSON text for av>}``; all rejected."""
    av_value = (string_specs() | json_values().filter(rejected)).map(lambda av: {"xargs": {"av": av}})
    not_object = (st.text(max_size=30) | st.lists(json_values(), max_size=3) | st.integers() | st.booleans()
                  | st.floats(allow_nan=False, allow_infinity=False))
    bad_xargs = not_object.map(lambda x: {"xargs": x})
    extra_keys = st.builds(lambda av, other: {"xargs": {**other, "av": av}},
                           string_specs(), st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
    raw_literals = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "[NaN]", '["alpha", NaN]',
                                    '{"alpha": NaN}', '{"alpha": Infinity}', "true", "null"]).map(lambda t: {"raw_av": t})
    return av_value | bad_xargs | extra_keys | raw_literals


class Fuzzer:
    """Sends payloads to a server, checks each answer and the valid request after it, keeps the counts."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model
        self.session = requests.Session()
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.reference = {mix: self.tokens(mix) for mix in VALID_MIXES}
        self.valid_checked = 0

    def body(self, endpoint: str) -> dict:
        if endpoint == "completions":
            body = {"prompt": PROMPT}
        else:
            body = {"messages": [{"role": "user", "content": PROMPT}]}
        return {"model": self.model, "max_tokens": MAX_TOKENS, "temperature": 0, **body}

    def tokens(self, mix: str | None) -> list[int]:
        body = {**self.body("completions"), "return_token_ids": True}
        if mix:
            body["vllm_xargs"] = {"av": mix}
        response = self.session.post(f"{self.url}/v1/completions", json=body, timeout=120)
        response.raise_for_status()
        return response.json()["choices"][0]["token_ids"]

    def send(self, payload: dict, endpoint: str) -> requests.Response:
        body = self.body(endpoint)
        if "raw_av" in payload:
            text = json.dumps(body)[:-1] + ', "vllm_xargs": {"av": ' + payload["raw_av"] + "}}"
            return self.session.post(f"{self.url}/v1/{endpoint}", data=text.encode(),
                                     headers={"Content-Type": "application/json"}, timeout=120)
        return self.session.post(f"{self.url}/v1/{endpoint}", json={**body, "vllm_xargs": payload["xargs"]}, timeout=120)

    def check(self, payload: dict, endpoint: str) -> None:
        """One hostile payload, then one valid request against its reference tokens."""
        response = self.send(payload, endpoint)
        self.counts["payloads"] += 1
        self.counts[f"http_{response.status_code}"] += 1
        problem = self.problem(payload, response)
        if problem:
            self.counts["bad_answers"] += 1
            self.failures.append(f"{problem}: {json.dumps(payload)[:300]} -> {response.status_code} {response.text[:300]}")
        mix = VALID_MIXES[self.counts["payloads"] % len(VALID_MIXES)]
        got = self.tokens(mix)
        self.valid_checked += 1
        if got != self.reference[mix]:
            self.counts["wrong_valid_answers"] += 1
            self.failures.append(f"valid request {mix!r} after {json.dumps(payload)[:200]}: {got} != {self.reference[mix]}")

    @staticmethod
    def problem(payload: dict, response: requests.Response) -> str | None:
        """Why the answer is wrong, or None: a 4xx whose message names the av mix or vllm_xargs."""
        if not 400 <= response.status_code < 500:
            return f"HTTP {response.status_code}"
        try:
            error = response.json()["error"]
            message, param = str(error["message"]), str(error.get("param"))
        except (ValueError, KeyError, TypeError):
            return "4xx without an OpenAI error body"
        if param == "vllm_xargs.av":
            spec = payload.get("xargs", {}).get("av") if isinstance(payload.get("xargs"), dict) else None
            if isinstance(spec, str):
                try:
                    parse_mix(spec, NAMES, CONFIG)
                except MixError as exc:
                    return None if message.startswith(str(exc)) else f"message {message!r} != parser's {str(exc)!r}"
            return None if names_the_mix(message) else "message does not name the av mix"
        if any(word in message or word in param for word in ("vllm_xargs", "extra_args", "JSON")):
            return None
        return f"message names neither the av mix nor vllm_xargs (param={param})"

    def run(self, count: int) -> None:
        @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate])
        @given(payloads(), st.sampled_from(["completions", "chat/completions"]))
        def one(payload, endpoint):
            self.check(payload, endpoint)

        one()


def offline_specs() -> st.SearchStrategy:
    """What ``SamplingParams(extra_args={"av": ...})`` may hold offline: any JSON value and Python objects."""
    python_objects = st.sampled_from([
        b"alpha:1", bytearray(b"x"), {"alpha"}, frozenset(), object(), 1j, range(3), iter([("alpha", 1)]),
        {"alpha": 1, "beta": 1, "gamma": 1, "alpha ": 1}, {("alpha",): 1}, {"alpha": b"1"}, {"alpha": 1j},
        [("alpha", 1, 2)], [("alpha",)], (("alpha", float("nan")),), {"alpha": float("inf")},
        {"alpha": 10**400}, {"alpha": -(10**400)}, {"alpha": "nan"}, {"alpha": 1e31},
    ])
    return (string_specs() | json_values() | st.floats().map(lambda f: {"alpha": f}) | python_objects).filter(rejected)


def fuzz_offline(llm, count: int) -> dict:
    """Every spec must raise a one-line ``ValueError`` naming the mix (or vLLM's own one-line
    ``VLLMValidationError`` for ``extra_args`` it cannot carry); then a valid request must equal its reference."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    def tokens(extra_args):
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, extra_args=extra_args)
        (out,) = llm.generate([PROMPT], params, use_tqdm=False)
        return list(out.outputs[0].token_ids)

    reference = tokens({"av": "alpha:1"})
    counts: Counter = Counter()
    failures: list[str] = []

    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.generate])
    @given(offline_specs())
    def one(spec):
        counts["specs"] += 1
        try:
            tokens({"av": spec})
            failures.append(f"accepted: {spec!r:.200}")
        except (ValueError, VLLMValidationError) as exc:
            counts[type(exc).__name__] += 1
            if not names_the_mix(str(exc)) or "\n" in str(exc):
                failures.append(f"message {str(exc)!r:.200} for {spec!r:.200}")
        except Exception as exc:  # noqa: BLE001 -- counted and reported
            counts[type(exc).__name__] += 1
            failures.append(f"{type(exc).__name__}: {exc!r:.200} for {spec!r:.200}")
        if counts["specs"] % 10 == 0:
            counts["valid_checked"] += 1
            if tokens({"av": "alpha:1"}) != reference:
                failures.append(f"valid request changed after {spec!r:.200}")

    one()
    counts["valid_checked"] += 1
    if tokens({"av": "alpha:1"}) != reference:
        failures.append("valid request changed at the end")
    return {"counts": dict(counts), "failures": failures[:50]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1200, help="hostile payloads sent to the server")
    parser.add_argument("--offline-count", type=int, default=1000, help="hostile specs given to the offline engine")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from av_server import av_server

    from vllm_av.testing.models import build_demo

    results: dict = {"date": time.strftime("%Y-%m-%d"), "limits": LIMITS}
    with tempfile.TemporaryDirectory() as tmp:
        model, library = build_demo(Path(tmp) / "demo")
        started = time.time()
        with av_server(model, library, *SERVER_FLAGS, log=Path(tmp) / "server.log") as (url, _pid):
            fuzzer = Fuzzer(url, str(model))
            fuzzer.run(args.count)
            healthy = requests.get(f"{url}/health", timeout=10).status_code == 200
        results["server"] = {"counts": dict(fuzzer.counts), "valid_requests_checked": fuzzer.valid_checked,
                             "healthy_at_end": healthy, "failures": fuzzer.failures[:50],
                             "seconds": round(time.time() - started, 1)}
        print(json.dumps(results["server"], indent=1)[:3000], flush=True)
        if args.offline_count:
            results["offline"] = _offline(model, library, args.offline_count)
            print(json.dumps(results["offline"], indent=1)[:3000], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    failed = results["server"]["failures"] or results.get("offline", {}).get("failures")
    return 1 if failed or not results["server"]["healthy_at_end"] else 0


def _offline(model: Path, library: Path, count: int) -> dict:
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    started = time.time()
    llm = LLM(str(model), dtype="float32", enforce_eager=True, max_model_len=512, gpu_memory_utilization=0.4,
              additional_config={"av": {"path": str(library), **LIMITS}})
    try:
        result = fuzz_offline(llm, count)
    finally:
        llm.llm_engine.engine_core.shutdown()  # else the engine may outlive the script at exit
    result["seconds"] = round(time.time() - started, 1)
    return result


if __name__ == "__main__":
    sys.exit(main())
