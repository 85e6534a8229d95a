"""The rules an AV directory must meet to be served: one :func:`validate_av_dir` for every caller.

``vllm-av extract`` checks what it wrote, a server's library scan checks every AV at start, and a
runtime load checks the one it gets -- with the same function. Weights are read from safetensors
only (pickle files are refused, never opened), no file is read through a link out of the
directory's root, every problem is one :class:`AVFileError` line naming the file and, where there
is one, the tensor.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from vllm_av.errors import AVError
from vllm_av.format.avfile import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AV_JSON, check_compatibility
from vllm_av.format.checkpoint import is_moe_expert
from vllm_av.format.names import MAX_NAME_LENGTH, name_problem

DEFAULT_MAX_RANK = 64  # a server's default --av-max-rank
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_FLOAT32_MAX = 3.4028234663852886e38
_KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


class AVFileError(AVError, ValueError):
    """An AV directory that cannot be served; the message names the file (and tensor)."""


@dataclass(frozen=True)
class ValidAV:
    """What :func:`validate_av_dir` found: the AV's name, largest rank, modules, and its ``av.json``."""

    name: str
    rank: int
    modules: tuple[str, ...]
    description: str = ""
    compatibility: str = "unknown"  # with the model it was checked against: same_base, same_architecture
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def fail(path: Path, message: str) -> AVFileError:
    return AVFileError(f"{path}: {message}")


def inside(path: Path, real_root: Path, library: str = "AV library") -> Path:
    """``path`` if it does not resolve out of ``real_root``; a link out is refused."""
    if not path.resolve().is_relative_to(real_root):
        raise fail(path, f"is a link out of the {library}; refused")
    return path


def model_weight_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` for every 2-D ``<module>.weight`` of a local checkpoint (headers only)."""
    from vllm_av.format.checkpoint import Checkpoint

    tensors = Checkpoint.open(model_dir).tensors
    return {name.removesuffix(".weight"): info.shape for name, info in tensors.items()
            if name.endswith(".weight") and len(info.shape) == 2}


def validate_av_dir(directory: str | Path, *, max_rank: int = DEFAULT_MAX_RANK,
                    max_name_length: int = MAX_NAME_LENGTH, model_dir: str | None = None,
                    model_shapes: dict[str, tuple[int, int]] | None = None, root: Path | None = None,
                    name: str | None = None) -> ValidAV:
    """Check the AV in ``directory`` (a PEFT LoRA adapter, ``av.json`` optional); raise :class:`AVFileError`.

    ``model_dir``: the served model's local directory; then every tensor's shape is checked against
    the model's weights (``model_shapes``, read from it unless given) and ``av.json``'s fingerprint
    against the model. ``root``: the resolved directory no file may link out of (default: the AV's
    own). ``name``: the name the AV is served under (default: ``av.json``'s, else the directory's).
    """
    directory = Path(directory)
    real_root = root if root is not None else directory.resolve()
    adapter_config = inside(directory / ADAPTER_CONFIG, real_root)
    weights = inside(directory / ADAPTER_WEIGHTS, real_root)
    if not weights.is_file():
        pickles = [p for p in PICKLE_WEIGHTS if (directory / p).exists()]
        if pickles:
            raise fail(directory / pickles[0], "pickle weights are refused; convert the adapter to adapter_model.safetensors")
        raise fail(weights, "missing")
    peft = _read_json(adapter_config)
    if peft.get("peft_type", "LORA") != "LORA":
        raise fail(adapter_config, f"peft_type {peft.get('peft_type')!r} is not LORA")
    if peft.get("use_dora"):
        raise fail(adapter_config, "DoRA adapters cannot be served as AVs")
    if peft.get("bias", "none") != "none":
        raise fail(adapter_config, f"bias={peft.get('bias')!r} is not supported (must be 'none')")
    max_scaling = _check_scaling(adapter_config, peft)
    av_json = inside(directory / AV_JSON, real_root)
    meta = _read_json(av_json) if av_json.is_file() else {}
    name = name or meta.get("name") or directory.name
    problem = name_problem(name, max_name_length)
    if problem:
        raise fail(directory / (AV_JSON if meta else ""), problem)
    if model_dir is not None and model_shapes is None:
        model_shapes = model_weight_shapes(model_dir)
    rank, modules = _check_tensors(weights, max_rank, model_shapes, max_scaling)
    compatibility = "unknown"
    if meta and model_dir is not None:
        try:
            compatibility, reason = check_compatibility(meta, model_dir)
        except (KeyError, TypeError, ValueError) as exc:
            raise fail(directory / AV_JSON, f"malformed av.json ({type(exc).__name__}: {exc})") from None
        if compatibility == "incompatible":
            raise fail(directory / AV_JSON, f"AV {name!r} is incompatible with the served model: {reason}")
    return ValidAV(name, rank, modules, str(meta.get("description", "")), compatibility, meta)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(path, f"unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise fail(path, "expected a JSON object")
    return data


def _check_tensors(weights: Path, max_rank: int, model_shapes: dict[str, tuple[int, int]] | None,
                   max_scaling: float) -> tuple[int, tuple[str, ...]]:
    """Validate every tensor of ``weights``; return (max rank, module names).

    ``max_scaling`` bounds the ``alpha/r`` factor vLLM folds into each B: every B times it must
    stay finite in float32, so no served weight is Inf or NaN.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    shapes: dict[tuple[str, str], tuple[int, ...]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                match = _KEY_RE.fullmatch(key)
                if not match:
                    raise fail(weights, f"tensor {key}: not a LoRA weight (base_model.model.<module>.lora_A/B.weight)")
                tensor = f.get_tensor(key)
                if tensor.ndim != 2 or not tensor.is_floating_point() or tensor.numel() == 0:
                    raise fail(weights, f"tensor {key}: expected a 2-D float tensor, got {tensor.dtype} {list(tensor.shape)}")
                if not bool(torch.isfinite(tensor).all()):
                    raise fail(weights, f"tensor {key}: contains NaN or Inf")
                served = tensor.double().abs().max().item() * (max_scaling if match["ab"] == "B" else 1.0)
                if served > _FLOAT32_MAX:
                    raise fail(weights, f"tensor {key}: values up to {served:.3g} (after alpha/r) overflow float32")
                shapes[(match["module"], match["ab"])] = tuple(tensor.shape)
    except SafetensorError as exc:
        raise fail(weights, f"not a readable safetensors file ({exc})") from None
    if not shapes:
        raise fail(weights, "holds no LoRA tensors")
    modules = sorted({m for m, _ in shapes})
    largest = 0
    for module in modules:
        key = f"base_model.model.{module}.lora_"
        a, b = shapes.get((module, "A")), shapes.get((module, "B"))
        if a is None or b is None:
            raise fail(weights, f"tensor {key}{'B' if a else 'A'}.weight is missing (lora_A and lora_B come in pairs)")
        if is_moe_expert(module):
            raise fail(weights, f"tensor {key}A.weight: {module} is an MoE expert; vLLM serves the experts as one "
                                f"fused MoE layer, which cannot carry AVs (vllm-av extract leaves expert deltas out)")
        rank = a[0]
        if b[1] != rank:
            raise fail(weights, f"tensor {key}B.weight has rank {b[1]} but lora_A has rank {rank}")
        if rank > max_rank:
            raise fail(weights, f"tensor {key}A.weight has rank {rank} > the server's max AV rank {max_rank}")
        if model_shapes is not None:
            expected = model_shapes.get(module)
            if expected is None:
                raise fail(weights, f"tensor {key}A.weight: the model has no linear weight {module}.weight")
            if (b[0], a[1]) != expected:
                raise fail(weights, f"tensor {key}A.weight/B.weight: delta shape [{b[0]}, {a[1]}] != model weight "
                                    f"{module}.weight {list(expected)}")
        largest = max(largest, rank)
    return largest, tuple(modules)


def _check_scaling(adapter_config: Path, peft: dict) -> float:
    """Check the ranks and alphas vLLM reads from ``adapter_config.json``; return the largest
    factor (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA) vLLM may fold into a lora_B."""
    ranks = [("r", peft.get("r"))] + [(f"rank_pattern[{k!r}]", v) for k, v in _pattern(adapter_config, peft, "rank_pattern")]
    for label, rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise fail(adapter_config, f"{label} must be a positive integer, got {rank!r}")
    alphas = [("lora_alpha", peft.get("lora_alpha"))] + [
        (f"alpha_pattern[{k!r}]", v) for k, v in _pattern(adapter_config, peft, "alpha_pattern")
    ]
    for label, alpha in alphas:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise fail(adapter_config, f"{label} must be a finite number, got {alpha!r}")
    smallest = min(rank for _, rank in ranks)
    return max(abs(float(alpha)) for _, alpha in alphas) / (math.sqrt(smallest) if peft.get("use_rslora") else smallest)


def _pattern(adapter_config: Path, peft: dict, key: str) -> list[tuple[str, object]]:
    value = peft.get(key) or {}
    if not isinstance(value, dict):
        raise fail(adapter_config, f"{key} must be an object, got {type(value).__name__}")
    return list(value.items())
