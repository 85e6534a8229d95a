"""Reliability of the OpenAI server (issue 7), one lenient server for the module.

* Lenient start: a library with three broken AVs (a pickle that would create a file if
  unpickled, a NaN ``lora_alpha``, weights linked out of the library) starts, refuses each in
  one warning line naming the file, and serves the rest; the pickle is never opened.
* Fuzzing: a few hundred hostile ``av`` mixes and ``vllm_xargs`` payloads (``benchmarks/fuzz.py``)
  each get a 4xx naming the problem, never a 5xx, and every valid request after one is answered
  with its reference tokens. The 1,200-payload run is ``python benchmarks/fuzz.py``.
* Isolation: rows beside requests with a huge but legal scale (1e30, which overflows their own
  rows) equal their solo runs, with finite logprobs, and the huge requests are answered too.
* Beam search with a mix is refused (it would silently drop the mix).
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from av_server import av_server  # noqa: E402
from fuzz import SERVER_FLAGS, Fuzzer  # noqa: E402

from vllm_av.testing.models import build_demo  # noqa: E402

pytestmark = pytest.mark.vllm

FUZZ_PAYLOADS = 300


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(path, "w")``: the file appearing means something unpickled it."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def broken_library(source: Path, root: Path) -> tuple[Path, Path, dict[str, str]]:
    """The demo library plus three broken AVs; return (library, marker file, {AV dir: message})."""
    library = root / "avs"
    shutil.copytree(source, library)
    marker = root / "unpickled"
    pickled = library / "delta"
    pickled.mkdir()
    shutil.copy(source / "alpha" / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(CreatesFileWhenUnpickled(marker)))
    nan_alpha = library / "epsilon"
    shutil.copytree(source / "beta", nan_alpha)
    (nan_alpha / "av.json").unlink()
    config = json.loads((nan_alpha / "adapter_config.json").read_text())
    (nan_alpha / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("nan")}))
    linked = library / "zeta"
    shutil.copytree(source / "gamma", linked)
    (linked / "av.json").unlink()
    outside = root / "outside.safetensors"
    (linked / "adapter_model.safetensors").rename(outside)
    (linked / "adapter_model.safetensors").symlink_to(outside)
    messages = {
        "delta": f"{pickled / 'adapter_model.bin'}: pickle weights are refused",
        "epsilon": f"{nan_alpha / 'adapter_config.json'}: lora_alpha must be a finite number, got nan",
        "zeta": f"{linked / 'adapter_model.safetensors'}: is a link out of the AV library; refused",
    }
    return library, marker, messages


@pytest.fixture(scope="module")
def lenient_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model, source = build_demo(root / "demo")
    library, marker, messages = broken_library(source, root)
    log = root / "server.log"
    with av_server(model, library, *SERVER_FLAGS, "--av-lenient", log=log) as (url, _pid):
        yield url, str(model), log, marker, messages


def complete(url, model, av=None, **extra):
    body = {"model": model, "prompt": "legal: the court said", "max_tokens": 8, "temperature": 0,
            "return_token_ids": True, "logprobs": 1, **extra}
    if av is not None:
        body["vllm_xargs"] = {"av": av}
    return requests.post(f"{url}/v1/completions", json=body, timeout=120)


def test_lenient_start_refuses_broken_avs_in_one_line_and_serves_the_rest(lenient_server):
    url, _, log, marker, messages = lenient_server
    listing = requests.get(f"{url}/v1/av", timeout=10).json()
    assert [av["name"] for av in listing["data"]] == ["alpha", "beta", "gamma"]
    assert listing["limits"] == {"max_per_request": 3, "max_abs_scale": 1e30, "max_rank": 64,
                                 "max_name_length": 16, "lenient": True}
    warnings = [line for line in log.read_text().splitlines() if "AV refused (lenient loading)" in line]
    for name, message in messages.items():
        assert any(line.split("AV refused (lenient loading): ", 1)[1].startswith(message) for line in warnings), name
    assert not marker.exists(), "the pickle was unpickled"


def test_fuzzed_requests_get_4xx_naming_the_problem_and_valid_ones_stay_exact(lenient_server):
    url, model, *_ = lenient_server
    fuzzer = Fuzzer(url, model)
    fuzzer.run(FUZZ_PAYLOADS)
    assert fuzzer.failures == []
    assert fuzzer.counts["payloads"] >= FUZZ_PAYLOADS * 0.9
    assert not any(key.startswith("http_5") for key in fuzzer.counts)
    assert fuzzer.valid_checked == fuzzer.counts["payloads"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


def test_huge_legal_scale_does_not_leak_into_other_rows(lenient_server):
    url, model, *_ = lenient_server
    normal = [None, "alpha:1", "beta:-0.5,gamma:1.5", "gamma:2"]
    huge = ["alpha:1e30", "gamma:-1e30,beta:1e30", "beta:1e4"]
    solo = {mix: complete(url, model, mix).json()["choices"][0] for mix in normal}
    batch = (normal + huge) * 3
    with ThreadPoolExecutor(len(batch)) as pool:
        # No logprobs for the huge rows: their own logits overflow, and NaN logprobs are not JSON.
        answers = list(pool.map(lambda mix: complete(url, model, mix, logprobs=1 if mix in solo else None), batch))
    assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers if a.status_code != 200]
    for mix, answer in zip(batch, answers):
        choice = answer.json()["choices"][0]
        if mix in solo:
            assert choice["token_ids"] == solo[mix]["token_ids"], mix
            assert all(math.isfinite(lp) for lp in choice["logprobs"]["token_logprobs"]), mix
    assert complete(url, model, "alpha:1").json()["choices"][0]["token_ids"] == solo["alpha:1"]["token_ids"]


def test_beam_search_with_a_mix_is_refused_not_silently_dropped(lenient_server):
    url, model, *_ = lenient_server
    refused = complete(url, model, "alpha:1", use_beam_search=True, logprobs=None)
    assert refused.status_code == 400
    assert "av mixes cannot be used with beam search" in refused.json()["error"]["message"]
    chat = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "use_beam_search": True, "vllm_xargs": {"av": "alpha:1"}})
    assert chat.status_code == 400 and "beam search" in chat.json()["error"]["message"]
    assert complete(url, model, None, use_beam_search=True, logprobs=None).status_code == 200
