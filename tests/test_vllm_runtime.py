"""Runtime AV updates on a running OpenAI server: ``POST /v1/av/load`` and ``/v1/av/unload``.

The server starts with ``--av-allow-runtime-updates --av-max-loaded 4`` and a library of two AVs
that touch the attention layers only; the AVs loaded later touch the MLP layers too (every
LoRA-capable layer holds AV slots from the start). Checked: a load while requests of other mixes
are in the engine leaves their tokens as in solo runs; a loaded AV equals the merged-weights oracle;
bad directories are 400s naming the file; unloading or replacing an AV that running requests use
is refused (409, naming their count) until they finish; a replaced AV serves its new weights and
never reuses KV computed with the old ones; capacity is fixed at start. The same runs on either
model runner.
Updates meet requests in flight on every machine because the tests pause vLLM's scheduler
(``/pause?mode=keep``) while they send both; the benchmark ``benchmarks.runtime_updates`` times
updates against unpaused streams.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from safetensors.torch import load_file, save_file

from test_vllm_server import tokenize
from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess
from vllm_av.testing.oracle import oracle_tokens

pytestmark = pytest.mark.vllm

VLLM_AV = str(Path(sys.executable).parent / "vllm-av")
MAX_TOKENS = 8
STREAM_TOKENS = 64  # the requests in the engine while an update happens (ignore_eos: they run that long)
LONG_PROMPT = "financial: " + " ".join(["the bank said the loan interest rate would rise"] * 12)


def attention_only(source: Path, target: Path) -> Path:
    """A copy of AV ``source`` keeping its attention modules only (q/k/v/o), named after ``target``."""
    target.mkdir(parents=True)
    tensors = load_file(source / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".self_attn." in k}, target / "adapter_model.safetensors")
    adapter = json.loads((source / "adapter_config.json").read_text())
    adapter["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    (target / "adapter_config.json").write_text(json.dumps(adapter))
    meta = json.loads((source / "av.json").read_text())
    (target / "av.json").write_text(json.dumps({**meta, "name": target.name}))
    return target


def view(root: Path, avs: dict[str, Path]) -> Path:
    """A directory naming each AV as the server knows it (links), for the oracle."""
    root.mkdir(parents=True)
    for name, path in avs.items():
        (root / name).symlink_to(path)
    return root


@pytest.fixture(scope="module")
def avs(demo, tmp_path_factory):
    """``(model, startup library, {name: directory})``: the startup AVs and those loaded at runtime."""
    model, library = demo
    root = tmp_path_factory.mktemp("runtime")
    startup = root / "startup"
    dirs = {name: attention_only(library / name.removesuffix("_attn"), startup / name) for name in ("alpha_attn", "beta_attn")}
    dirs.update(gamma=library / "gamma", beta=library / "beta")  # every linear module
    nan = shutil.copytree(library / "gamma", root / "nan")
    tensors = load_file(nan / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("mlp.down_proj.lora_B.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    dirs.update(nan=nan, nan_key=key)
    pickled = shutil.copytree(library / "gamma", root / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    dirs["pickled"] = pickled
    return model, startup, dirs


@pytest.fixture(scope="module")
def server(avs, tmp_path_factory):
    """The server, with vLLM's dev routes (``/pause``, ``/resume``) that :func:`paused` uses."""
    model, startup, _ = avs
    command = [VLLM_AV, "serve", str(model), "--av-path", str(startup), "--av-allow-runtime-updates",
               "--av-max-loaded", "4", "--enable-prompt-tokens-details", "--max-num-seqs", "16", *CPU_FLAGS]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_SERVER_DEV_MODE", "1")
        with ServerProcess(command, tmp_path_factory.mktemp("server") / "server.log") as process:
            yield process.url, str(model)


@contextmanager
def paused(server):
    """vLLM's scheduler paused, keeping its requests (``/pause?mode=keep``): requests sent meanwhile
    wait in the scheduler, so an update made in the block meets them queued on any machine."""
    response = requests.post(f"{server[0]}/pause", params={"mode": "keep", "clear_cache": "false"}, timeout=60)
    assert response.status_code == 200, response.text
    try:
        yield
    finally:
        assert requests.post(f"{server[0]}/resume", timeout=60).status_code == 200


def wait_until_used(server, counts: dict[str, int], timeout: float = 60) -> None:
    """Wait until ``GET /v1/av`` says the engine holds ``counts[name]`` queued or running requests
    using each AV ``name`` (the requests sent so far have reached the scheduler)."""
    deadline = time.monotonic() + timeout
    while True:
        listing = requests.get(f"{server[0]}/v1/av", timeout=10).json()["data"]
        seen = {av["name"]: av["in_use"] for av in listing if av["name"] in counts}
        if seen == counts:
            return
        assert time.monotonic() < deadline, f"the engine holds {seen} requests per AV, not {counts}"
        time.sleep(0.05)


def post(url, route, **body):
    return requests.post(f"{url}{route}", json=body, timeout=120)


def complete(server, prompt, av=None, max_tokens=MAX_TOKENS, **extra):
    url, model = server
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            **extra}
    if av is not None:
        body["vllm_xargs"] = {"av": av}
    return requests.post(f"{url}/v1/completions", json=body, timeout=120)


def tokens(response) -> list[int]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


def oracle(avs, tmp_path, server, mix: str, prompt: str, served_as: dict[str, str]) -> list[int]:
    """The merged-weights oracle's greedy tokens for ``mix``; ``served_as``: AV name -> its directory key."""
    model, _, dirs = avs
    names = view(tmp_path / f"view{len(list(tmp_path.iterdir()))}", {n: dirs[key] for n, key in served_as.items()})
    return oracle_tokens(model, names, mix, tokenize(*server, prompt), MAX_TOKENS)


def names(server) -> list[str]:
    return [av["name"] for av in requests.get(f"{server[0]}/v1/av", timeout=10).json()["data"]]


class Stream:
    """A streamed greedy completion in a thread: its token ids."""

    def __init__(self, server, prompt, av):
        self.server, self.prompt, self.av = server, prompt, av
        self.tokens, self.error = [], None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        url, model = self.server
        body = {"model": model, "prompt": self.prompt, "max_tokens": STREAM_TOKENS, "temperature": 0, "stream": True,
                "ignore_eos": True, "return_token_ids": True, **({"vllm_xargs": {"av": self.av}} if self.av else {})}
        try:
            with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line.startswith(b"data: {"):
                        self.tokens += json.loads(line[6:])["choices"][0]["token_ids"] or []
        except Exception as exc:  # noqa: BLE001 -- reported by the test
            self.error = exc

    def join(self) -> list[int]:
        self.thread.join(120)
        assert self.error is None, self.error
        return self.tokens


def solo(server, prompt, av) -> list[int]:
    return tokens(complete(server, prompt, av, max_tokens=STREAM_TOKENS, ignore_eos=True))


def test_listing_shows_the_fixed_slots(server):
    listing = requests.get(f"{server[0]}/v1/av", timeout=10).json()
    assert [av["name"] for av in listing["data"]] == ["alpha_attn", "beta_attn"]
    assert listing["runtime_updates"] == {"max_loaded": 4, "loaded": 2}
    assert all(len(av["digest"]) == 16 and av["in_use"] == 0 for av in listing["data"])


def test_a_load_while_other_mixes_stream_leaves_them_unchanged(server, avs, tmp_path):
    """Streams under several mixes are in the engine while an AV touching modules no startup AV touched
    is loaded: their tokens equal solo runs, and the new AV equals the oracle, alone and mixed."""
    _, _, dirs = avs
    rows = [("medical: the patient", None), ("legal: the court said", "alpha_attn:1"),
            ("medical: the dose", "beta_attn:-1.5"), ("legal: the contract", "alpha_attn:0.5,beta_attn:1")] * 2
    with paused(server):
        streams = [Stream(server, prompt, mix) for prompt, mix in rows]
        wait_until_used(server, {"alpha_attn": 4, "beta_attn": 4})
        loaded = post(server[0], "/v1/av/load", name="gamma_rt", path=str(dirs["gamma"]))
    try:
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["name"] == "gamma_rt" and loaded.json()["replaced"] is False
        results = [stream.join() for stream in streams]
        assert results == [solo(server, prompt, mix) for prompt, mix in rows]
        assert names(server) == ["alpha_attn", "beta_attn", "gamma_rt"]
        served_as = {"alpha_attn": "alpha_attn", "gamma_rt": "gamma"}
        for mix in ("gamma_rt:1", "alpha_attn:0.5,gamma_rt:-1.2"):
            got = tokens(complete(server, "medical: the patient", mix))
            assert got == oracle(avs, tmp_path, server, mix, "medical: the patient", served_as), mix
        assert got != tokens(complete(server, "medical: the patient", "alpha_attn:0.5"))
    finally:
        post(server[0], "/v1/av/unload", name="gamma_rt")


def test_bad_directories_are_refused_naming_the_file_and_serving_goes_on(server, avs, tmp_path):
    _, startup, dirs = avs
    before = tokens(complete(server, "legal: the court said", "alpha_attn:1"))
    weights = dirs["nan"] / "adapter_model.safetensors"
    cases = [
        ({"name": "bad", "path": str(dirs["nan"])}, 400, f"{weights}: tensor {dirs['nan_key']}: contains NaN or Inf"),
        ({"name": "bad", "path": str(tmp_path / "nope")}, 400, f"{tmp_path / 'nope'}: AV directory not found"),
        ({"name": "bad", "path": str(dirs["pickled"])}, 400,
         f"{dirs['pickled'] / 'adapter_model.bin'}: pickle weights are refused"),
        ({"name": "a/b", "path": str(dirs["gamma"])}, 400, "AV name 'a/b' must be 1-64 characters"),
        ({"path": str(dirs["gamma"])}, 400, 'a load needs "name" and "path"'),
        ({"name": "alpha_attn", "path": str(dirs["gamma"])}, 409,
         "AV 'alpha_attn' is already loaded; pass \"replace\": true to replace it"),
    ]
    for body, status, message in cases:
        response = post(server[0], "/v1/av/load", **body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["message"].startswith(message), (body, response.text)
    assert post(server[0], "/v1/av/unload", name="nope").status_code == 404
    bad_body = requests.post(f"{server[0]}/v1/av/load", data=b"[1, 2]", timeout=10)
    assert bad_body.status_code == 400 and "the body must be a JSON object" in bad_body.text
    assert names(server) == ["alpha_attn", "beta_attn"]
    assert tokens(complete(server, "legal: the court said", "alpha_attn:1")) == before
    assert complete(server, "x", "bad:1").status_code == 400


def test_unloading_or_replacing_an_av_in_use_is_refused_until_its_requests_finish(server, avs):
    _, _, dirs = avs
    assert post(server[0], "/v1/av/load", name="gamma_rt", path=str(dirs["gamma"])).status_code == 200
    try:
        with paused(server):
            streams = [Stream(server, "medical: the patient", "gamma_rt:1,alpha_attn:0.5"),
                       Stream(server, "legal: the court said", "gamma_rt:-0.5")]
            wait_until_used(server, {"gamma_rt": 2})
            refused = post(server[0], "/v1/av/unload", name="gamma_rt")
            replace = post(server[0], "/v1/av/load", name="gamma_rt", path=str(dirs["beta"]), replace=True)
        results = [stream.join() for stream in streams]
        assert results == [solo(server, stream.prompt, stream.av) for stream in streams], "a request changed weights"
        for response in (refused, replace):
            assert response.status_code == 409, response.text
            assert "AV 'gamma_rt' is used by 2 queued or running request(s)" in response.json()["error"]["message"]
    finally:
        unloaded = post(server[0], "/v1/av/unload", name="gamma_rt")
    assert unloaded.status_code == 200, unloaded.text
    after = complete(server, "x", "gamma_rt:1")
    assert after.status_code == 400 and "unknown av 'gamma_rt'" in after.text
    assert names(server) == ["alpha_attn", "beta_attn"]


def test_a_replaced_av_serves_its_new_weights_and_never_reuses_old_kv(server, avs, tmp_path):
    """The long prompt is prefix-cached under the AV's old weights; after the replace the same
    request must equal the oracle of the new weights and hit no cached block."""
    assert post(server[0], "/v1/av/load", name="swap", path=str(avs[2]["gamma"])).status_code == 200
    try:
        first, second = (complete(server, LONG_PROMPT, "swap:1") for _ in range(2))
        assert tokens(first) == tokens(second) == oracle(avs, tmp_path, server, "swap:1", LONG_PROMPT, {"swap": "gamma"})
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, "the cache should be hit"
        replaced = post(server[0], "/v1/av/load", name="swap", path=str(avs[2]["beta"]), replace=True)
        assert replaced.status_code == 200 and replaced.json()["replaced"] is True, replaced.text
        after = complete(server, LONG_PROMPT, "swap:1")
        assert tokens(after) == oracle(avs, tmp_path, server, "swap:1", LONG_PROMPT, {"swap": "beta"})
        assert tokens(after) != tokens(first)
        assert after.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        post(server[0], "/v1/av/unload", name="swap")


def test_capacity_is_fixed_at_start(server, avs):
    dirs = avs[2]
    loads = [post(server[0], "/v1/av/load", name=name, path=str(dirs["gamma"])) for name in ("one", "two", "three")]
    try:
        assert [r.status_code for r in loads] == [200, 200, 409]
        assert loads[2].json()["error"]["message"] == (
            "all 4 AV slots are in use (--av-max-loaded); unload an AV first")
        assert post(server[0], "/v1/av/unload", name="one").status_code == 200
        assert post(server[0], "/v1/av/load", name="three", path=str(dirs["gamma"])).status_code == 200
        with ThreadPoolExecutor(3) as pool:  # every slot serves: the mixes of all four at once
            results = list(pool.map(lambda mix: complete(server, "legal: the court said", mix),
                                    ["two:1", "three:1", "two:1,alpha_attn:1,beta_attn:1"]))
        assert tokens(results[0]) == tokens(results[1]), "two slots holding the same files must agree"
    finally:
        for name in ("one", "two", "three"):
            post(server[0], "/v1/av/unload", name=name)
    assert names(server) == ["alpha_attn", "beta_attn"]


def _lora_targets_and_wrapped(worker):
    runner = worker.model_runner
    modules = runner.lora_manager._adapter_manager.modules.values()
    return runner.vllm_config.lora_config.target_modules, sorted({type(m).__name__ for m in modules})


def test_offline_an_empty_library_filled_at_runtime(demo, tmp_path):
    """``AVRuntime`` over ``LLM``: an engine started with no AV serves one loaded later (= the oracle),
    refuses a second name beyond ``max_loaded`` and forgets an unloaded one. Its LoRA wraps the
    linear layers only (issue 33: not the embeddings, lm_head or MoE experts)."""
    from vllm import LLM, SamplingParams

    from test_vllm_plugin import ENGINE
    from vllm_av.serving.front.runtime import AVRuntime, AVUpdateError
    from vllm_av.testing.oracle import oracle_greedy

    model, library = demo
    (tmp_path / "empty").mkdir()
    settings = {"path": str(tmp_path / "empty"), "allow_runtime_updates": True, "max_loaded": 1}
    llm = LLM(str(model), **ENGINE, additional_config={"av": settings})
    try:
        (targets, wrapped), = llm.collective_rpc(_lora_targets_and_wrapped)
        assert targets == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
        assert wrapped == ["MergedColumnParallelLinearWithLoRA", "MergedQKVParallelLinearWithLoRA",
                           "RowParallelLinearWithLoRA"]
        runtime = AVRuntime(llm)
        assert runtime.list() == []
        assert runtime.load("beta", str(library / "beta"))["replaced"] is False
        assert [(av["name"], av["in_use"]) for av in runtime.list()] == [("beta", 0)]
        with pytest.raises(AVUpdateError, match="all 1 AV slots are in use") as full:
            runtime.load("gamma", str(library / "gamma"))
        assert full.value.status == 409
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, extra_args={"av": {"beta": 1.0}})
        got = llm.generate(["medical: the patient"], params, use_tqdm=False)[0].outputs[0].token_ids
        assert list(got) == oracle_greedy(model, library, {"beta": 1.0}, ["medical: the patient"], MAX_TOKENS)[0][0]
        runtime.unload("beta")
        assert runtime.list() == []
        with pytest.raises(ValueError, match="unknown av 'beta'"):
            llm.generate(["x"], params, use_tqdm=False)
    finally:
        del llm
