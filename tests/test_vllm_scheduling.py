"""Mixes across vLLM's scheduling: requests joining and leaving a running batch, and preemption.

Both model runners track requests differently (the classic runner keeps them; Model Runner V2
drops a preempted request and is sent it again in full when it resumes), so this module runs
under either (``VLLM_USE_V2_MODEL_RUNNER``). Every request's greedy tokens must equal the
merged-weights oracle, in float32.
"""

from __future__ import annotations

import pytest

from vllm_av.testing.oracle import oracle_greedy

pytestmark = pytest.mark.vllm

# A KV cache of 6 blocks of 32 tokens: four 60-token requests need 12, so the scheduler preempts.
# At most 32 tokens per step: a longer prompt is prefilled in chunks over several steps.
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=8, gpu_memory_utilization=0.4,
              block_size=32, num_gpu_blocks_override=6, enable_prefix_caching=False, disable_log_stats=False,
              max_num_batched_tokens=32)
REQUESTS = [  # (prompt, mix)
    ("medical: the patient", "alpha:1"),
    ("legal: the court said that the contract", "beta:-0.5,gamma:1.5"),
    ("finance: the", None),
    ("medical: a", "gamma:2"),
]


def as_dict(mix: str | None) -> dict[str, float]:
    return {name: float(scale) for name, scale in (p.split(":") for p in mix.split(","))} if mix else {}


@pytest.fixture(scope="module")
def llm(demo):
    from vllm import LLM

    model, library = demo
    engine = LLM(str(model), **ENGINE, additional_config={"av": {"path": str(library)}})
    yield engine
    del engine


def greedy(max_tokens, mix):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          extra_args={"av": mix} if mix else None)


def preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_preempted_requests_resume_with_their_mix(llm, demo):
    before = preemptions(llm)
    outputs = llm.generate([p for p, _ in REQUESTS], [greedy(60, mix) for _, mix in REQUESTS], use_tqdm=False)
    assert preemptions(llm) > before, "the KV cache was meant to force a preemption"
    for output, (prompt, mix) in zip(outputs, REQUESTS):
        (want, _), = oracle_greedy(*demo, as_dict(mix), [prompt], 60, ignore_eos=True)
        assert list(output.outputs[0].token_ids) == want, (prompt, mix)


def test_requests_joining_and_leaving_a_running_batch_keep_their_mix(llm, demo):
    """Requests enter at different engine steps and finish at different steps (lengths 6..14)."""
    engine = llm.llm_engine
    lengths = [14, 6, 10, 8]
    arrivals = {0: [0], 2: [1], 3: [2], 5: [3]}  # engine step -> requests added before it
    finished, step = {}, 0
    while len(finished) < len(REQUESTS):
        for i in arrivals.get(step, []):
            prompt, mix = REQUESTS[i]
            engine.add_request(f"join-{i}", prompt, greedy(lengths[i], mix))
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
        step += 1
        assert step < 200
    for i, (prompt, mix) in enumerate(REQUESTS):
        (want, _), = oracle_greedy(*demo, as_dict(mix), [prompt], lengths[i], ignore_eos=True)
        assert finished[f"join-{i}"] == want, (prompt, mix)


def test_a_prompt_prefilled_in_chunks_keeps_its_mix_beside_decoding_rows(llm, demo):
    """A ~65-token prompt over several 32-token steps, while a short request decodes beside it."""
    from transformers import AutoTokenizer

    engine = llm.llm_engine
    long_prompt = "legal: " + " ".join(["the court said that the contract"] * 7)
    assert len(AutoTokenizer.from_pretrained(str(demo[0]))(long_prompt).input_ids) > 40
    requests = {"chunked": (long_prompt, "beta:1.5,gamma:-0.5"), "beside": ("medical: the patient", "alpha:1")}
    engine.add_request("beside", requests["beside"][0], greedy(12, requests["beside"][1]))
    engine.add_request("chunked", requests["chunked"][0], greedy(8, requests["chunked"][1]))
    finished, steps, first_token_step = {}, 0, None
    while len(finished) < 2:
        for output in engine.step():
            if output.request_id == "chunked" and output.outputs[0].token_ids and first_token_step is None:
                first_token_step = steps
            if output.finished:
                finished[output.request_id] = list(output.outputs[0].token_ids)
        steps += 1
        assert steps < 200
    assert first_token_step >= 2, "the long prompt was meant to be prefilled over several steps"
    for rid, (prompt, mix) in requests.items():
        (want, _), = oracle_greedy(*demo, as_dict(mix), [prompt], len(finished[rid]), ignore_eos=True)
        assert finished[rid] == want, rid


def test_ngram_speculative_decoding_verifies_every_draft_row_under_its_mix():
    """Decode steps of several rows per request (last token + n-gram drafts): tokens equal the oracle.

    The trained demo model repeats phrases of its prompts, so drafts are proposed and some accepted.
    """
    from conftest import RUNNER
    from vllm import LLM

    from vllm_av.cli.demo import DEMO_DATA, DEMO_REQUESTS

    if RUNNER == "v2":
        pytest.skip("MRV2's n-gram proposer is a Triton kernel that Triton's CPU interpreter cannot run "
                    "('mask has unsupported dtype'); on GPU it runs compiled")
    model, library = DEMO_DATA / "model", DEMO_DATA / "avs"
    llm = LLM(str(model), dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
              gpu_memory_utilization=0.4, disable_log_stats=False, additional_config={"av": {"path": str(library)}},
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "prompt_lookup_max": 3})
    try:
        requests = DEMO_REQUESTS[:6]
        outputs = llm.generate([p for p, _ in requests], [greedy(40, mix) for _, mix in requests], use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        del llm
    assert metrics["vllm:spec_decode_num_draft_tokens"].value > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens"].value > 0
    for output, (prompt, mix) in zip(outputs, requests):
        (want, _), = oracle_greedy(model, library, as_dict(mix), [prompt], 40, ignore_eos=True)
        assert list(output.outputs[0].token_ids) == want, mix
