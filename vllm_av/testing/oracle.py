"""The correctness oracle for everything served: the base model with merged AV weights, in transformers."""

from __future__ import annotations

import json
from pathlib import Path


def merged_model(base_dir: str | Path, library_dir: str | Path, mix: dict[str, float]):
    """The correctness oracle: transformers model with weights ``W + sum_k s_k * scaling_k * B_k A_k``.

    ``mix`` maps AV directory names under ``library_dir`` to scales; merging is in float64.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from vllm_av.offline.materialize import peft_scaling

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for name, scale in mix.items():
            adapter = Path(library_dir) / name
            adapter_config = json.loads((adapter / "adapter_config.json").read_text())
            tensors = load_file(str(adapter / "adapter_model.safetensors"))
            for key, lora_a in tensors.items():
                if not key.endswith(".lora_A.weight"):
                    continue
                module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                lora_b = tensors[key.replace(".lora_A.", ".lora_B.")]
                delta = lora_b.double() @ lora_a.double()
                weight = weights[module + ".weight"]
                factor = scale * peft_scaling(adapter_config, module)
                weight.copy_((weight.double() + factor * delta).to(weight.dtype))
    return model.eval()


def oracle_tokens(base_dir: str | Path, library_dir: str | Path, mix, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy ids after ``prompt_ids`` from :func:`merged_model` (float32; the stop token included, as
    vLLM returns it). ``mix``: None or any form a request may send (``"a:1,b:-0.5"``, a dict)."""
    import torch

    from vllm_av.serving.settings.config import AVConfig
    from vllm_av.serving.front.mix import parse_mix

    names = [p.name for p in Path(library_dir).iterdir() if p.is_dir()]
    scales = dict(parse_mix(mix, names, AVConfig(path=str(library_dir)))) if mix is not None else {}
    model = merged_model(base_dir, library_dir, scales)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def oracle_greedy(base_dir: str | Path, library_dir: str | Path, mix: dict[str, float], prompts: list[str],
                  max_tokens: int, ignore_eos: bool = False) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs for each prompt from :func:`merged_model` (the served-output oracle).

    ``ignore_eos``: generate ``max_tokens`` tokens whatever they are (vLLM's ``ignore_eos``).
    """
    import torch
    from transformers import AutoTokenizer

    model = merged_model(base_dir, library_dir, mix)
    if ignore_eos:
        model.generation_config.eos_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    results = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        logprobs = [torch.log_softmax(s[0].double(), -1)[t].item() for s, t in zip(out.scores, tokens)]
        results.append((tokens, logprobs))
    return results


def oracle_recontrol_tokens(base_dir: str | Path, library_dir: str | Path, mix, value_dir: str | Path, alpha: float,
                            steps: int, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy ids after ``prompt_ids`` from :func:`merged_model` steered by the reference RE-Control decoder
    (:mod:`vllm_av.recontrol.reference`: autograd SGD on the hidden state), ``max_tokens`` of them (vLLM's
    ``ignore_eos``). ``mix``: None or any form a request may send."""
    from vllm_av.recontrol.reference import recontrol_generate
    from vllm_av.recontrol.valuefile import load_value_function
    from vllm_av.serving.settings.config import AVConfig
    from vllm_av.serving.front.mix import parse_mix

    names = [p.name for p in Path(library_dir).iterdir() if p.is_dir()]
    scales = dict(parse_mix(mix, names, AVConfig(path=str(library_dir)))) if mix is not None else {}
    model = merged_model(base_dir, library_dir, scales)
    value = load_value_function(value_dir)
    return recontrol_generate(model, value, [list(prompt_ids)], alpha, steps, max_tokens)[0]
