"""The OpenAI server: ``vllm-av serve`` on 127.0.0.1 with a real OpenAI client.

Concurrent requests with different mixes (and a regular LoRA) must each equal the
merged-weights oracle; bad mixes get HTTP 400 naming the problem and the server keeps serving;
``GET /v1/av`` lists the library; a bad library stops the start with one line naming the file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess
from vllm_av.testing.models import build_demo
from vllm_av.testing.oracle import oracle_tokens

pytestmark = pytest.mark.vllm

VLLM_AV = str(Path(sys.executable).parent / "vllm-av")
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory):
    model, library = demo
    command = [
        VLLM_AV, "serve", str(model), "--av-path", str(library), "--av-max-per-request", "3", "--av-max-abs-scale", "3",
        "--enable-lora", "--max-loras", "2", "--lora-modules", f"beta_lora={library / 'beta'}", *CPU_FLAGS,
    ]
    with ServerProcess(command, tmp_path_factory.mktemp("server") / "server.log") as process:
        yield process.url, str(model)


def complete(url, model, prompt, av=None, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    if av is not None:
        body["vllm_xargs"] = {"av": av}
    body.update(extra)
    return requests.post(f"{url}/v1/completions", json=body, timeout=60)


def test_listing_endpoint(server):
    url, _ = server
    listing = requests.get(f"{url}/v1/av", timeout=10).json()
    assert [av["name"] for av in listing["data"]] == ["alpha", "beta", "gamma"]
    assert all(av["compatibility"] == "same_base" and av["rank"] == 4 for av in listing["data"])
    assert listing["limits"]["max_per_request"] == 3 and listing["limits"]["max_abs_scale"] == 3.0


def test_concurrent_mixed_requests_match_oracle(server, demo):
    from openai import OpenAI

    url, model = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    mixes = [None, "alpha:1", "alpha:0.8,beta:-0.5,gamma:1.7", "beta:2.5", " gamma : -1 ", "beta:1,alpha:0"] * 2
    prompts = ["medical: the patient", "legal: the court said"]

    def run(i):
        extra = {"return_token_ids": True, **({"vllm_xargs": {"av": mixes[i]}} if mixes[i] else {})}
        return client.completions.create(
            model=model, prompt=prompts[i % 2], max_tokens=MAX_TOKENS, temperature=0, extra_body=extra
        )

    with ThreadPoolExecutor(len(mixes)) as pool:
        responses = list(pool.map(run, range(len(mixes))))
    prompt_ids = [tokenize(url, model, p) for p in prompts]
    for i, response in enumerate(responses):
        got = response.choices[0].model_dump()["token_ids"]
        assert got == oracle_tokens(*demo, mixes[i], prompt_ids[i % 2], MAX_TOKENS), mixes[i]


def tokenize(url, model, prompt):
    return requests.post(f"{url}/tokenize", json={"model": model, "prompt": prompt}, timeout=10).json()["tokens"]


def test_chat_completion_with_mix(server, demo):
    from openai import OpenAI

    url, model = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "legal: the contract"}]

    def chat(av):
        extra = {"vllm_xargs": {"av": av}} if av else {}
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra)
        return reply.choices[0].message.content

    assert chat("alpha:1") == chat("alpha:1.0")
    assert chat("alpha:1") != chat(None)


def test_json_object_mix_equals_string_mix(server):
    from openai import OpenAI

    url, model = server
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    as_string = complete(url, model, "medical: the patient", av="alpha:0.8,beta:-0.5").json()["choices"][0]["token_ids"]
    as_object = complete(url, model, "medical: the patient", av={"alpha": 0.8, "beta": -0.5}).json()["choices"][0]["token_ids"]
    assert as_object == as_string
    assert as_object != complete(url, model, "medical: the patient").json()["choices"][0]["token_ids"]
    messages = [{"role": "user", "content": "legal: the contract"}]

    def chat(av):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                               extra_body={"vllm_xargs": {"av": av}})
        return reply.choices[0].message.content

    assert chat({"gamma": 1.5}) == chat("gamma:1.5")


def test_regular_lora_beside_av(server):
    url, model = server
    prompt = "legal: the court said"
    as_lora = complete(url, "beta_lora", prompt).json()["choices"][0]["token_ids"]
    as_av = complete(url, model, prompt, av="beta:1").json()["choices"][0]["token_ids"]
    assert as_lora == as_av


@pytest.mark.parametrize(
    "av, message",
    [
        ("nope:1", "unknown av 'nope'"),
        ("alpha=1", "must look like name:scale"),
        ("alpha:nan", "not a number"),
        ("alpha:inf", "not a number"),
        ("alpha:1e400", "must be finite"),
        ("alpha:3.5", "exceeds this server's limit"),
        ("alpha:1,beta:1,gamma:1,alpha:1", "at most 3"),
        ("alpha:1,alpha:2", "appears more than once"),
        ("", "empty"),
        (":1", "non-empty"),
        (["alpha", 1], "must be [name, scale] pairs"),
        (7, "must be a string like"),
        ({"nope": 1}, "unknown av 'nope'"),  # the JSON-object form, rewritten by serving/http_mix.py
        ({"alpha": "x"}, "not a number"),
    ],
)
def test_bad_mix_is_http_400_and_server_keeps_serving(server, av, message):
    url, model = server
    for endpoint, body in [
        ("completions", {"prompt": "hello"}),
        ("chat/completions", {"messages": [{"role": "user", "content": "hello"}]}),
    ]:
        response = requests.post(
            f"{url}/v1/{endpoint}",
            json={"model": model, "max_tokens": 4, "vllm_xargs": {"av": av}, **body},
            timeout=30,
        )
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]["message"]
    assert complete(url, model, "hello", av="alpha:1").status_code == 200


def test_bad_library_stops_start_with_one_line_naming_the_file(demo, tmp_path):
    model, library = demo
    bad = tmp_path / "lib"
    bad.mkdir()
    shutil.copytree(library / "alpha", bad / "alpha")
    pickled = bad / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((library / "beta" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not opened")
    result = subprocess.run(
        [VLLM_AV, "serve", str(model), "--av-path", str(bad), *CPU_FLAGS],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"vllm-av: error: {pickled / 'adapter_model.bin'}: pickle weights are refused; convert the adapter to adapter_model.safetensors"
