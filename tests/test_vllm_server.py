"""The OpenAI server: ``vllm-av serve`` on 127.0.0.1 with a real OpenAI client.

Concurrent requests with different mixes (and a regular LoRA) must each equal the
merged-weights oracle; bad mixes get HTTP 400 naming the problem and the server keeps serving;
``GET /v1/av`` lists the library; a bad library stops the start with one line naming the file.
RE-Control requests (``vllm_xargs`` recontrol, recontrol_alpha, recontrol_steps) must equal the
reference decoder, alone and with a mix.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import DEMO_SIZES, EXPECTED_BLEND, max_tokens

from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess
from vllm_av.testing.models import build_demo
from vllm_av.testing.oracle import oracle_recontrol_tokens, oracle_tokens
from vllm_av.testing.values import build_value_library

pytestmark = pytest.mark.vllm
blend_path = pytest.mark.blend_path

VLLM_AV = str(Path(sys.executable).parent / "vllm-av")
MAX_TOKENS = max_tokens(8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), sizes=DEMO_SIZES)


@pytest.fixture(scope="module")
def values(demo, tmp_path_factory):
    return build_value_library(demo[0], tmp_path_factory.mktemp("values"))


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(demo, values, server_log):
    model, library = demo
    command = [
        VLLM_AV, "serve", str(model), "--av-path", str(library), "--av-max-per-request", "3", "--av-max-abs-scale", "3",
        "--enable-lora", "--max-loras", "2", "--lora-modules", f"beta_lora={library / 'beta'}",
        "--av-recontrol-path", str(values), "--av-recontrol-max-steps", "16", *CPU_FLAGS,
    ]
    with ServerProcess(command, server_log) as process:
        yield process.url, str(model)


def complete(url, model, prompt, av=None, **extra):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True}
    if av is not None:
        body["vllm_xargs"] = {"av": av}
    body.update(extra)
    return requests.post(f"{url}/v1/completions", json=body, timeout=60)


@blend_path
def test_the_log_names_the_blend_implementation(server, server_log):
    """The server says which blend its AV layers run (the Triton kernel in CI's blend_path pass)."""
    assert f"blend implementation: {EXPECTED_BLEND}" in server_log.read_text()


def test_listing_endpoint(server):
    url, model = server
    listing = requests.get(f"{url}/v1/av", timeout=10).json()
    assert [av["name"] for av in listing["data"]] == ["alpha", "beta", "gamma"]
    assert all(av["compatibility"] == "same_base" and av["rank"] == 4 for av in listing["data"])
    assert listing["limits"]["max_per_request"] == 3 and listing["limits"]["max_abs_scale"] == 3.0
    assert [v["name"] for v in listing["value_functions"]] == ["brief", "helpful"]
    assert all(v["compatibility"] == "same_base" and v["hidden_size"] == hidden_size(model)
               for v in listing["value_functions"])
    assert listing["limits"]["recontrol_max_steps"] == 16 and "recontrol_path" not in listing["limits"]
    assert "runtime_updates" not in listing


def test_the_av_routes_declare_their_bodies_and_answers(server):
    """``/openapi.json`` describes the AV routes' request bodies and answers (pydantic models, as vLLM's
    own /v1/load_lora_adapter), so generated clients and API fuzzers see them."""
    url, _ = server
    spec = requests.get(f"{url}/openapi.json", timeout=10).json()
    schemas = spec["components"]["schemas"]
    load = spec["paths"]["/v1/av/load"]["post"]
    assert set(load["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {"name", "path", "replace"}
    assert load["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/AVLoaded"}
    assert {"400", "404", "409"} <= set(load["responses"])
    unload = spec["paths"]["/v1/av/unload"]["post"]
    assert set(unload["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {"name"}
    listing = spec["paths"]["/v1/av"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listing == {"$ref": "#/components/schemas/AVListing"}
    assert {"data", "value_functions", "limits", "lora_requests", "runtime_updates"} <= set(schemas["AVListing"]["properties"])
    assert {"name", "rank", "digest", "in_use"} <= set(schemas["AVSummary"]["properties"])


def test_runtime_updates_are_off_by_default(server, demo):
    url, _ = server
    for route, body in (("load", {"name": "x", "path": str(demo[1] / "alpha")}), ("unload", {"name": "alpha"})):
        response = requests.post(f"{url}/v1/av/{route}", json=body, timeout=10)
        assert response.status_code == 404, response.text
        assert "runtime AV updates are off; start the server with --av-allow-runtime-updates" in response.text


@blend_path
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


def hidden_size(model) -> int:
    return json.loads((Path(model) / "config.json").read_text())["hidden_size"]


def tokenize(url, model, prompt):
    return requests.post(f"{url}/tokenize", json={"model": model, "prompt": prompt}, timeout=10).json()["tokens"]


@blend_path
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


@blend_path
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
        ({"nope": 1}, "unknown av 'nope'"),  # the JSON-object form, rewritten by serving/front/http.py
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


def steer(name, alpha, steps):
    return {"recontrol": name, "recontrol_alpha": alpha, "recontrol_steps": steps}


@blend_path
def test_concurrent_recontrol_requests_match_the_reference(server, demo, values):
    url, model = server
    cases = [("medical: the patient", None, None), ("medical: the patient", None, ("helpful", 0.5, 4)),
             ("legal: the court", "gamma:1", ("brief", -0.5, 6)), ("finance: the", "alpha:1", None)]

    def run(case):
        prompt, av, setting = case
        xargs = {**({"av": av} if av else {}), **(steer(*setting) if setting else {})}
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True, "vllm_xargs": xargs}
        response = requests.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    with ThreadPoolExecutor(len(cases)) as pool:
        choices = list(pool.map(run, cases))
    for choice, (prompt, av, setting) in zip(choices, cases):
        prompt_ids = choice["prompt_token_ids"]
        if setting is None:
            want = oracle_tokens(*demo, av, prompt_ids, MAX_TOKENS)
        else:
            want = oracle_recontrol_tokens(*demo, av, values / setting[0], setting[1], setting[2], prompt_ids,
                                           MAX_TOKENS)
        assert choice["token_ids"] == want, (prompt, av, setting)
    assert choices[1]["token_ids"] != choices[0]["token_ids"]


@pytest.mark.parametrize("xargs, message", [
    (steer("nope", 1.0, 2), "unknown value function 'nope'"),
    ({"recontrol": "helpful", "recontrol_steps": 2}, "needs recontrol_alpha"),
    (steer("helpful", 1.0, 17), "must be 0..16"),
    (steer("helpful", -10.5, 2), "at most 10.0"),
    (steer("helpful", 1.0, -1), "must be 0..16"),
    ({"recontrol_steps": 2, "recontrol_alpha": 1.0}, "need recontrol"),
])
def test_bad_recontrol_is_http_400_and_server_keeps_serving(server, xargs, message):
    url, model = server
    for endpoint, body in [("completions", {"prompt": "hello"}),
                           ("chat/completions", {"messages": [{"role": "user", "content": "hello"}]})]:
        response = requests.post(f"{url}/v1/{endpoint}", json={"model": model, "max_tokens": 4, "vllm_xargs": xargs,
                                                               **body}, timeout=30)
        assert response.status_code == 400, response.text
        assert message in response.json()["error"]["message"]
    assert complete(url, model, "hello", vllm_xargs=steer("helpful", 0.5, 2)).status_code == 200


def test_recontrol_with_beam_search_is_http_400(server):
    url, model = server
    response = complete(url, model, "hello", use_beam_search=True, n=2, vllm_xargs=steer("helpful", 0.5, 2))
    assert response.status_code == 400 and "beam search" in response.json()["error"]["message"]


def test_bad_value_library_stops_start_with_one_line_naming_the_tensor(demo, values, tmp_path):
    from safetensors.torch import load_file, save_file

    model, library = demo
    bad = tmp_path / "values"
    shutil.copytree(values, bad)
    weights = bad / "brief" / "value.safetensors"
    tensors = load_file(str(weights))
    tensors["linears.1.bias"][0] = float("nan")
    save_file(tensors, str(weights))
    result = subprocess.run([VLLM_AV, "serve", str(model), "--av-path", str(library), "--av-recontrol-path", str(bad),
                             *CPU_FLAGS], capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"vllm-av: error: {weights}: tensor linears.1.bias: contains NaN or Inf")
