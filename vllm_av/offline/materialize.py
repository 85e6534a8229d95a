"""Materialise one fixed mix of AVs as a single ordinary PEFT LoRA adapter (rank concatenation).

``sum_k s_k B_k A_k = [s_1 B_1 | ... | s_K B_K] @ [A_1; ...; A_K]``, so a mix is exactly one LoRA
of rank ``sum_k r_k`` (PEFT's ``add_weighted_adapter(combination_type="cat")``). This is what
users do today without vllm-av — one adapter per distinct mix — and the serving benchmark's
``lora-per-mix`` baseline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_A_SUFFIX = ".lora_A.weight"


def peft_scaling(adapter_config: dict, module: str) -> float:
    """alpha/r for ``module`` under PEFT's rank_pattern/alpha_pattern suffix matching."""

    def pick(pattern: dict | None, default):
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?{key}$", module):
                return value
        return default

    rank = pick(adapter_config.get("rank_pattern"), adapter_config["r"])
    alpha = pick(adapter_config.get("alpha_pattern"), adapter_config["lora_alpha"])
    return alpha / rank


def materialize_mix(library: str | Path, mix: dict[str, float], out: str | Path) -> Path:
    """Write the AVs of ``library`` mixed by ``mix`` (directory name -> scale) as one LoRA at ``out``.

    Scales and each AV's alpha/r are folded into B, so the adapter's own scaling is exactly 1.
    Modules an AV lacks get a zero block. Exact up to float32 rounding.
    """
    import torch
    from safetensors.torch import load_file, save_file

    library, out = Path(library), Path(out)
    parts = []  # (scale, adapter_config, tensors) per AV
    for name, scale in mix.items():
        adapter = library / name
        parts.append((scale, json.loads((adapter / "adapter_config.json").read_text()),
                      load_file(str(adapter / "adapter_model.safetensors"))))
    modules = sorted({k.removeprefix("base_model.model.").removesuffix(_A_SUFFIX)
                      for _, _, tensors in parts for k in tensors if k.endswith(_A_SUFFIX)})
    tensors_out: dict[str, torch.Tensor] = {}
    for module in modules:
        key_a = f"base_model.model.{module}{_A_SUFFIX}"
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        shape_a = next(t[key_a].shape for _, _, t in parts if key_a in t)
        shape_b = next(t[key_b].shape for _, _, t in parts if key_b in t)
        blocks_a, blocks_b = [], []
        for scale, adapter_config, tensors in parts:
            if key_a in tensors:
                blocks_a.append(tensors[key_a].float())
                blocks_b.append(tensors[key_b].float() * (scale * peft_scaling(adapter_config, module)))
            else:
                blocks_a.append(torch.zeros(1, shape_a[1]))
                blocks_b.append(torch.zeros(shape_b[0], 1))
        tensors_out[key_a] = torch.cat(blocks_a, dim=0).contiguous()
        tensors_out[key_b] = torch.cat(blocks_b, dim=1).contiguous()
    ranks = {m: tensors_out[f"base_model.model.{m}{_A_SUFFIX}"].shape[0] for m in modules}
    rank = max(ranks.values())
    first_config = parts[0][1]
    config = {
        "peft_type": "LORA",
        "task_type": first_config.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": first_config.get("base_model_name_or_path"),
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: r for m, r in ranks.items() if r != rank},
        "target_modules": modules,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors_out, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
