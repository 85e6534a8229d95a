"""A bfloat16 model served with AV mixes (the C kernel's bfloat16 entry point) against the oracle.

bfloat16 greedy tokens may part from a float32 oracle's, so the served engine scores fixed text
(prompt logprobs) and each token's logprob is compared with the float32 merged-weights model's.
Measured gaps: <= 0.055 to the oracle, <= 0.004 between the C kernel and the dense blend; a wrong
sign or a missing mix moves them by > 2.5. The tolerances sit between.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_vllm_plugin import ENGINE, MIXES
from vllm_av.testing.oracle import merged_model

pytestmark = pytest.mark.vllm

TEXTS = ["medical: the patient has a fever and the doctor said that", "legal: the court said that the contract is void"]
ORACLE_TOL = 0.25  # bfloat16 engine against the float32 oracle
BLEND_TOL = 0.05  # C kernel against the dense blend, both bfloat16


def bf16_engine(demo, blend: str):
    from vllm import LLM

    model, library = demo
    return LLM(str(model), **{**ENGINE, "dtype": "bfloat16"}, additional_config={"av": {"path": str(library), "cpu_blend": blend}})


@pytest.fixture(scope="module")
def engines(demo):
    engines = {blend: bf16_engine(demo, blend) for blend in ("native", "dense")}
    yield engines
    for engine in engines.values():
        engine.llm_engine.engine_core.shutdown()


def served_logprobs(llm, mix) -> list[list[float]]:
    """Each text's logprob of every token after the first, as the engine scores it."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, extra_args={"av": mix} if mix else None)
    return [[next(iter(step.values())).logprob for step in out.prompt_logprobs[1:]]
            for out in llm.generate(TEXTS, params, use_tqdm=False)]


def oracle_logprobs(demo, mix) -> list[list[float]]:
    from transformers import AutoTokenizer

    model_dir, library = demo
    model, tokenizer = merged_model(model_dir, library, mix), AutoTokenizer.from_pretrained(str(model_dir))
    result = []
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            logprobs = model(ids).logits[0].double().log_softmax(-1)
        result.append([logprobs[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1)])
    return result


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(x) for x in b], "both must score the same tokens"
    return max(abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b))


@pytest.mark.parametrize("mix", MIXES[:3], ids=lambda m: "+".join(f"{k}{v:+}" for k, v in m.items()))
def test_bfloat16_engine_matches_oracle_and_dense_blend(engines, demo, mix):
    native = served_logprobs(engines["native"], mix)
    assert max_gap(native, oracle_logprobs(demo, mix)) < ORACLE_TOL
    assert max_gap(native, served_logprobs(engines["dense"], mix)) < BLEND_TOL
    flipped = {name: -scale for name, scale in mix.items()}
    assert max_gap(native, oracle_logprobs(demo, flipped)) > 4 * ORACLE_TOL, "the test must tell mixes apart"
