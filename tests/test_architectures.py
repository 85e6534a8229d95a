"""The architecture matrix: every decoder family in ``vllm_av.testing.architectures``, end to end.

For each: a random tiny checkpoint, two AVs extracted from perturbed copies, one vLLM engine with
the plugin serving a batch where every request has its own mix, and every row's greedy tokens and
logprobs equal to the merged-weights oracle (float32; logprob tolerance as in test_vllm_plugin).
What a family cannot carry is refused or reported, never dropped silently: a Qwen2-MoE's expert
deltas are left out of the AV by extract and reported, an adapter that holds expert modules
anyway is refused at load with one line naming the tensor, and on vLLM-CPU (which cannot run MoE
layers with LoRA on) the engine start is refused with one line; on a GPU it must serve.
"""

from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch
from conftest import ARCH_SIZES, max_tokens
from safetensors.torch import load_file, save_file

from vllm_av.testing.architectures import ARCHITECTURES, build_arch_demo
from vllm_av.testing.oracle import oracle_greedy

pytestmark = pytest.mark.vllm

MAX_TOKENS = max_tokens(8)
# float32 rounding differs between vLLM (delta as a separate x·Aᵀ·Bᵀ) and the oracle (delta folded
# into W); Gemma's scaled embeddings and soft-capping grow it to ~1.1e-3 here. A 2 % error in one
# AV's scale moves these logprobs by 0.01-0.06 (measured on gemma2), so 3e-3 still catches it.
LOGPROB_TOL = 3e-3
# vLLM runs MoE layers through Triton/CUDA MoE-LoRA kernels whenever LoRA is on; vLLM-CPU has neither
REFUSED_ON_CPU = {"qwen2_moe": r"mixture-of-experts model \(4 experts\): vLLM-CPU cannot serve MoE models"}
PROMPTS = ["medical: the patient", "legal: the court said that"]
MIXES = [None, {"a": 1.0}, {"b": -0.7}, {"a": 0.5, "b": 1.2}]


# Phi-3's fused qkv_proj / gate_up_proj: the family CI also serves with the Triton blend in the engine
FAMILIES = [pytest.param(family, marks=pytest.mark.blend_path) if family == "phi3" else family for family in ARCHITECTURES]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_serves_a_mixed_batch_equal_to_the_oracle(family, tmp_path, torch_one_thread):
    from vllm import LLM, SamplingParams

    model, library = build_arch_demo(family, tmp_path, sizes=ARCH_SIZES)
    kwargs = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=8,
                  gpu_memory_utilization=0.4, additional_config={"av": {"path": str(library)}})
    if family in REFUSED_ON_CPU and not torch.cuda.is_available():
        with pytest.raises(ValueError, match=REFUSED_ON_CPU[family]):
            LLM(str(model), **kwargs)
        return
    llm = LLM(str(model), **kwargs)
    try:
        jobs = [(prompt, mix) for mix in MIXES for prompt in PROMPTS]
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0,
                                 extra_args={"av": mix} if mix else None) for _, mix in jobs]
        outputs = llm.generate([p for p, _ in jobs], params, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    for mix in MIXES:
        expected = oracle_greedy(model, library, mix or {}, PROMPTS, MAX_TOKENS)
        for prompt, (tokens, logprobs) in zip(PROMPTS, expected):
            out = outputs[jobs.index((prompt, mix))].outputs[0]
            assert list(out.token_ids) == tokens, (family, mix, prompt)
            served = [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]
            assert max(abs(a - b) for a, b in zip(served, logprobs)) < LOGPROB_TOL, (family, mix, prompt)
    base, steered = outputs[0].outputs[0], outputs[jobs.index((PROMPTS[0], MIXES[1]))].outputs[0]
    assert base.token_ids != steered.token_ids or max(  # the AV moves the output (random models may repeat one token)
        abs(a[t].logprob - b[t].logprob) for a, b, t in zip(base.logprobs, steered.logprobs, base.token_ids)) > 0.05


def test_moe_expert_deltas_are_reported_and_expert_adapters_refused(tmp_path):
    from vllm_av.format.avfile import AVMeta
    from vllm_av.offline.report import dropped_groups
    from vllm_av.serving.settings.config import AVConfig
    from vllm_av.serving.library.avs import AVLibraryError, load_library

    model, library = build_arch_demo("qwen2_moe", tmp_path)
    meta = AVMeta.from_dict(json.loads((library / "a" / "av.json").read_text()))
    assert not [m for m in meta.modules if ".experts." in m]
    assert any(".shared_expert." in m for m in meta.modules)
    assert dropped_groups(meta)["experts"] > 0.3  # the perturbation moved every expert

    bad = tmp_path / "bad-library" / "with_experts"
    shutil.copytree(library / "a", bad)
    weights = bad / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    expert = "base_model.model.model.layers.0.mlp.experts.0.gate_proj"
    tensors[f"{expert}.lora_A.weight"] = tensors["base_model.model.model.layers.0.mlp.shared_expert.gate_proj.lora_A.weight"].clone()
    tensors[f"{expert}.lora_B.weight"] = tensors["base_model.model.model.layers.0.mlp.shared_expert.gate_proj.lora_B.weight"][:64].clone()
    save_file(tensors, str(weights))
    with pytest.raises(AVLibraryError, match=r"with_experts.*experts\.0\.gate_proj.*MoE expert"):
        load_library(str(bad.parent), AVConfig(path=str(bad.parent)), str(model))
