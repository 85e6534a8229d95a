"""RE-Control served by vLLM: per-request value function, α and n, beside AV mixes, in one batch.

Every steered request's greedy tokens must equal the reference decoder (autograd SGD on the hidden
state of the merged-weights model, in transformers), with plain and AV-only requests in the same
batch, under prefix caching and chunked prefill. Runs under either model runner.
"""

from __future__ import annotations

import pytest

from vllm_av.testing.oracle import oracle_recontrol_tokens, oracle_tokens
from vllm_av.testing.values import build_value_library

pytestmark = pytest.mark.vllm

MAX_TOKENS = 12
# At most 32 tokens a step: the long prompt is prefilled in chunks; prefix caching on.
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=8, gpu_memory_utilization=0.4,
              block_size=32, enable_prefix_caching=True, max_num_batched_tokens=32)
LONG = "legal: the court said that the contract " * 8
REQUESTS = [  # (prompt, av mix, RE-Control setting (value, α, n))
    ("medical: the patient", None, None),
    ("medical: the patient", "alpha:1", None),
    ("medical: the patient", None, ("helpful", 0.5, 5)),
    ("medical: the patient", "beta:-0.5,gamma:1.5", ("helpful", 1.0, 3)),
    ("finance: the", None, ("brief", -0.5, 8)),
    (LONG, "gamma:2", ("brief", 0.25, 10)),
    (LONG, None, ("helpful", 1.0, 1)),
    ("travel: a", None, None),
]


@pytest.fixture(scope="module")
def values(demo, tmp_path_factory):
    model, _ = demo
    return build_value_library(model, tmp_path_factory.mktemp("values"))


@pytest.fixture(scope="module")
def llm(demo, values):
    from vllm import LLM

    model, library = demo
    engine = LLM(str(model), **ENGINE, additional_config={"av": {"path": str(library), "recontrol_path": str(values),
                                                                 "recontrol_max_steps": 20}})
    yield engine
    del engine


def params(mix=None, setting=None, **extra):
    from vllm import SamplingParams

    args = dict(extra)
    if mix:
        args["av"] = mix
    if setting:
        args.update(recontrol=setting[0], recontrol_alpha=setting[1], recontrol_steps=setting[2])
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, extra_args=args or None)


def expected(demo, values, prompt_ids, mix, setting):
    if setting is None:
        return oracle_tokens(*demo, mix, prompt_ids, MAX_TOKENS)
    name, alpha, steps = setting
    return oracle_recontrol_tokens(*demo, mix, values / name, alpha, steps, prompt_ids, MAX_TOKENS)


def generate(llm, requests):
    outputs = llm.generate([p for p, _, _ in requests], [params(m, s) for _, m, s in requests], use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]


def test_mixed_batch_equals_the_reference_decoder(llm, demo, values):
    results = generate(llm, REQUESTS)
    for (prompt_ids, tokens), (prompt, mix, setting) in zip(results, REQUESTS):
        assert tokens == expected(demo, values, prompt_ids, mix, setting), (prompt, mix, setting)
    assert results[2][1] != results[0][1], "steering was meant to change this request's tokens"


def test_prefix_cache_reuse_across_settings(llm, demo, values):
    """The same long prompt, steered then plain then steered otherwise: KV blocks are shared (the KV
    depends on the tokens only) and each result still equals its reference."""
    requests = [(LONG, None, ("brief", 0.5, 4)), (LONG, None, None), (LONG, "alpha:1", ("helpful", 0.5, 2))]
    for request in requests:  # one at a time: each finds the blocks the earlier ones left
        (prompt_ids, tokens), = generate(llm, [request])
        assert tokens == expected(demo, values, prompt_ids, request[1], request[2]), request


def test_zero_alpha_or_steps_is_off(llm, demo):
    outputs = llm.generate(["medical: a"] * 2, [params(setting=("helpful", 0.0, 5)), params(setting=("helpful", 1.0, 0))],
                           use_tqdm=False)
    want = oracle_tokens(*demo, None, list(outputs[0].prompt_token_ids), MAX_TOKENS)
    assert [list(o.outputs[0].token_ids) for o in outputs] == [want, want]


@pytest.mark.parametrize("extra, message", [
    ({"recontrol": "nope", "recontrol_alpha": 1.0, "recontrol_steps": 2}, "unknown value function 'nope'"),
    ({"recontrol": "helpful", "recontrol_steps": 2}, "needs recontrol_alpha"),
    ({"recontrol": "helpful", "recontrol_alpha": 1.0}, "needs recontrol_steps"),
    ({"recontrol_alpha": 1.0, "recontrol_steps": 2}, "need recontrol"),
    ({"recontrol": "helpful", "recontrol_alpha": 11.0, "recontrol_steps": 2}, "at most 10.0"),
    ({"recontrol": "helpful", "recontrol_alpha": 1.0, "recontrol_steps": 21}, "must be 0..20"),
    ({"recontrol": "helpful", "recontrol_alpha": 1.0, "recontrol_steps": 2.5}, "whole number"),
    ({"recontrol": "helpful", "recontrol_alpha": "x", "recontrol_steps": 2}, "must be a number"),
    ({"recontrol": {"value": "helpful", "alpha": 1.0, "steps": 2, "beta": 1}}, "unknown field 'beta'"),
])
def test_bad_settings_are_refused_and_others_still_served(llm, demo, extra, message):
    from vllm import SamplingParams

    with pytest.raises(ValueError, match=message):
        llm.generate(["medical: a"], [SamplingParams(max_tokens=2, extra_args=extra)], use_tqdm=False)
    (prompt_ids, tokens), = generate(llm, [("medical: a", None, ("helpful", 0.5, 2))])
    assert tokens == oracle_recontrol_tokens(*demo, None, llm_values(llm) / "helpful", 0.5, 2, prompt_ids, MAX_TOKENS)


def llm_values(llm):
    from pathlib import Path

    return Path(llm.llm_engine.vllm_config.additional_config["av"]["recontrol_path"])


def test_object_form_offline(llm, demo, values):
    from vllm import SamplingParams

    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                              extra_args={"recontrol": {"value": "brief", "alpha": 0.5, "steps": 3}, "av": {"beta": 1}})
    output, = llm.generate(["cooking: the"], [sampling], use_tqdm=False)
    want = oracle_recontrol_tokens(*demo, {"beta": 1}, values / "brief", 0.5, 3, list(output.prompt_token_ids),
                                   MAX_TOKENS)
    assert list(output.outputs[0].token_ids) == want
