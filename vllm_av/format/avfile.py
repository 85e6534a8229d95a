"""The on-disk AV format: a PEFT LoRA adapter directory plus ``av.json``.

    adapter_config.json         PEFT LoraConfig (r = max rank, rank_pattern/alpha_pattern: scaling 1)
    adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r, in], ...lora_B.weight [out, r]
    av.json                     name, description, fingerprints, per-module stats (this module's AVMeta)

``read_av`` and ``check_compatibility`` import no torch and read only JSON and safetensors
headers plus a few KiB per tensor, so a server can call them at startup.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from vllm_av.format.checkpoint import Checkpoint, Fingerprint
from vllm_av.errors import AVError

AV_FORMAT = "vllm-av/1"
AV_JSON = "av.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


@dataclass
class ModuleStats:
    """Compression result of one linear module (rank 0: its delta is exactly zero, not in the adapter)."""

    shape: tuple[int, int]  # [out, in] of the weight
    rank: int
    retained_energy: float  # fraction of ||ΔW||_F² kept by B·A
    rel_error: float  # ||ΔW - B·A||_F / ||ΔW||_F
    delta_norm: float  # ||ΔW||_F
    method: str  # "exact", "randomized" or "zero"


@dataclass
class Totals:
    """Whole-model view, as shares of the total delta energy Σ||ΔT||_F² over all tensors."""

    delta_energy: float  # Σ||ΔT||_F² over every tensor
    lora_share: float  # share in LoRA target modules
    dropped_share: float  # share in deltas LoRA cannot serve (norms, biases, embeddings, lm_head)
    retained_share: float  # share the adapter reproduces
    rel_error: float  # relative Frobenius error over all LoRA target modules together


@dataclass
class AVMeta:
    """Contents of ``av.json``."""

    name: str
    description: str
    tool_version: str
    base_path: str
    aligned_path: str
    base: Fingerprint
    aligned: Fingerprint
    settings: dict  # rank or energy, dtype, device, SVD parameters
    modules: dict[str, ModuleStats]  # every LoRA target module, by dotted name
    dropped: dict[str, float]  # non-LoRA tensors with a nonzero delta: share of delta energy
    totals: Totals

    @property
    def served_modules(self) -> dict[str, ModuleStats]:
        """Modules present in the adapter (rank > 0)."""
        return {m: s for m, s in self.modules.items() if s.rank > 0}

    @property
    def max_rank(self) -> int:
        return max((s.rank for s in self.modules.values()), default=0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = {m: {**asdict(s), "shape": list(s.shape)} for m, s in self.modules.items()}
        return {"format": AV_FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict) -> AVMeta:
        if d.get("format") != AV_FORMAT:
            raise ValueError(f"format {d.get('format')!r} is not {AV_FORMAT!r}")
        modules = {m: ModuleStats(**{**s, "shape": tuple(s["shape"])}) for m, s in d["modules"].items()}
        return cls(
            name=d["name"],
            description=d["description"],
            tool_version=d["tool_version"],
            base_path=d["base_path"],
            aligned_path=d["aligned_path"],
            base=Fingerprint.from_dict(d["base"]),
            aligned=Fingerprint.from_dict(d["aligned"]),
            settings=d["settings"],
            modules=modules,
            dropped=d["dropped"],
            totals=Totals(**d["totals"]),
        )


def peft_config(meta: AVMeta) -> dict:
    """``adapter_config.json`` for ``meta``: r = lora_alpha = max rank; per-module rank and alpha equal, so alpha/r == 1."""
    r = meta.max_rank
    pattern = {m: s.rank for m, s in sorted(meta.served_modules.items()) if s.rank != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": meta.base_path,
        "bias": "none",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(meta.served_modules),
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_av(directory: str | Path, meta: AVMeta, factors: dict) -> None:
    """Write the adapter files and ``av.json`` into an existing empty ``directory``.

    ``factors`` maps each served module to its ``(A [r, in], B [out, r])`` tensors, saved as they are.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {}
    for module, (A, B) in sorted(factors.items()):
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = B.contiguous()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(peft_config(meta), indent=2) + "\n")
    (directory / AV_JSON).write_text(json.dumps(meta.to_dict(), indent=2) + "\n")


def read_av(directory: str | Path) -> AVMeta:
    """Read ``av.json`` of an AV directory; AVError if it is missing or not in this format."""
    file = Path(directory) / AV_JSON
    if not file.is_file():
        raise AVError(f"{file} not found: not an AV directory (made by `vllm-av extract`)")
    try:
        return AVMeta.from_dict(json.loads(file.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise AVError(f"{file} is not a valid AV description ({e})") from None


def read_factors(directory: str | Path) -> dict:
    """``{module: (A, B)}`` CPU tensors from an AV's ``adapter_model.safetensors``."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    modules = {k[len(KEY_PREFIX) : -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight")}
    return {m: (tensors[f"{KEY_PREFIX}{m}.lora_A.weight"], tensors[f"{KEY_PREFIX}{m}.lora_B.weight"]) for m in modules}


class Compatibility(NamedTuple):
    """Verdict of ``check_compatibility`` (unpacks as ``verdict, reason``)."""

    verdict: str  # "same_base" | "same_architecture" | "incompatible"
    reason: str


def check_compatibility(meta: AVMeta | dict, model_dir: str | Path) -> Compatibility:
    """Can the AV described by ``meta`` (an AVMeta or the parsed ``av.json``) be applied to ``model_dir``?

    ``same_base``: the model is the checkpoint the AV was extracted from (architecture, tensor list
    and content sample all match). ``same_architecture``: same architecture fields and every module
    of the AV exists with the same shape, but the weights differ (e.g. another fine-tuning stage).
    ``incompatible``: anything else, or ``model_dir`` is not a readable safetensors checkpoint.
    """
    if isinstance(meta, dict):
        meta = AVMeta.from_dict(meta)
    try:
        model = Checkpoint.open(model_dir)
        fp = model.fingerprint()
    except AVError as e:
        return Compatibility("incompatible", f"cannot fingerprint the model: {e}")
    if fp.arch_hash != meta.base.arch_hash:
        diffs = [
            f"{k}={fp.arch.get(k)!r} (AV base: {meta.base.arch.get(k)!r})"
            for k in sorted(set(fp.arch) | set(meta.base.arch))
            if fp.arch.get(k) != meta.base.arch.get(k)
        ]
        return Compatibility("incompatible", "different architecture: " + ", ".join(diffs))
    for module, stats in sorted(meta.served_modules.items()):
        info = model.tensors.get(f"{module}.weight")
        if info is None:
            return Compatibility("incompatible", f"the model has no tensor {module}.weight")
        if tuple(info.shape) != tuple(stats.shape):
            return Compatibility("incompatible", f"{module}.weight is {list(info.shape)}, the AV expects {list(stats.shape)}")
    if fp.tensors_hash == meta.base.tensors_hash and fp.content_hash == meta.base.content_hash:
        return Compatibility("same_base", "tensor list and content sample match the base the AV was extracted from")
    reason = "architecture and module shapes match; weights differ from the base the AV was extracted from"
    if fp.content_hash == meta.aligned.content_hash:
        reason += "; this is the aligned checkpoint itself, so applying the AV would add the alignment twice"
    return Compatibility("same_architecture", reason)
