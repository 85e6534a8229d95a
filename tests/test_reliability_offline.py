"""Offline ``LLM`` reliability (issue 7): fuzzed ``SamplingParams(extra_args={"av": ...})`` and row isolation.

Hostile specs (``benchmarks/fuzz.py``: the server's payloads plus Python objects no JSON can
carry) each raise a one-line ``ValueError`` naming the mix, and the engine keeps answering a
valid request with its reference tokens. A huge but legal scale overflows only its own row.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from fuzz import LIMITS, fuzz_offline  # noqa: E402

from vllm_av.testing.models import build_demo  # noqa: E402

pytestmark = pytest.mark.vllm

FUZZ_SPECS = 200


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from vllm import LLM

    model, library = build_demo(tmp_path_factory.mktemp("demo"))
    engine = LLM(str(model), dtype="float32", enforce_eager=True, max_model_len=512, max_num_seqs=16,
                 gpu_memory_utilization=0.4, additional_config={"av": {"path": str(library), **LIMITS}})
    yield engine
    del engine


def test_fuzzed_extra_args_raise_a_clear_error_and_the_engine_keeps_serving(llm):
    result = fuzz_offline(llm, FUZZ_SPECS)
    assert result["failures"] == []
    assert result["counts"]["specs"] >= FUZZ_SPECS * 0.9
    assert result["counts"]["valid_checked"] >= FUZZ_SPECS // 10


@pytest.mark.parametrize("extra_args", ["xavier", ["av"], 7])
def test_extra_args_that_are_not_a_dict_do_not_crash_admission(llm, extra_args):
    """``"av" in "xavier"`` is true: admission must not index a non-dict ``extra_args``."""
    from vllm import SamplingParams

    from vllm_av.serving.front.admission import admit

    assert admit(SamplingParams(max_tokens=1, extra_args=extra_args), None) == ()


def test_huge_legal_scale_overflows_only_its_own_row(llm):
    from vllm import SamplingParams

    prompt = "legal: the court said"
    normal = [None, {"alpha": 1.0}, {"beta": -0.5, "gamma": 1.5}]
    huge = [{"alpha": 1e30}, {"gamma": -1e30, "beta": 1e30}]

    def params(mix):
        return SamplingParams(max_tokens=8, temperature=0.0, logprobs=0,
                              extra_args={"av": mix} if mix is not None else None)

    solo = [llm.generate([prompt], params(mix), use_tqdm=False)[0].outputs[0] for mix in normal]
    batch = llm.generate([prompt] * 10, [params(m) for m in (normal + huge) * 2], use_tqdm=False)
    for i, mix in enumerate(normal):
        for row in (batch[i], batch[i + 5]):
            out = row.outputs[0]
            assert out.token_ids == solo[i].token_ids, mix
            assert all(math.isfinite(step[t].logprob) for step, t in zip(out.logprobs, out.token_ids)), mix
    # The huge rows are answered too (their overflowing logits may end them early).
    assert all(batch[i].finished and batch[i].outputs[0].finish_reason in ("length", "stop") for i in (3, 4, 8, 9))


def test_av_only_engine_refuses_lora_requests(llm, tmp_path):
    """LoRA was enabled only to carry the AVs (its math is skipped): a LoRA request must not be served silently."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    library = Path(llm.llm_engine.vllm_config.additional_config["av"]["path"])
    with pytest.raises(ValueError, match="serves AVs only; start it with --enable-lora"):
        llm.generate(["hello"], SamplingParams(max_tokens=2), lora_request=LoRARequest("a", 1, str(library / "alpha")),
                     use_tqdm=False)


def test_av_only_engine_matches_the_merged_weights_oracle(llm):
    import torch
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from vllm_av.testing.oracle import merged_model

    config = llm.llm_engine.vllm_config
    model_dir, library = config.model_config.model, config.additional_config["av"]["path"]
    mix = {"alpha": 0.7, "gamma": -1.2}
    prompt = "medical: the patient"
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, extra_args={"av": mix}), use_tqdm=False)
    ids = AutoTokenizer.from_pretrained(model_dir)(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = merged_model(model_dir, library, mix).generate(ids, max_new_tokens=10, do_sample=False)
    assert list(out.outputs[0].token_ids) == want[0, ids.shape[1]:].tolist()
