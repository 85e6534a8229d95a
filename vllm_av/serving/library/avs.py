"""Scan and validate an AV library directory (one PEFT LoRA adapter directory per AV).

Runs in the API-server process before the engine starts, so a bad library fails fast with
one line naming the file (and tensor); workers load the same validated entries with vLLM's
own LoRA loader. Weights are read from safetensors only: pickle files are never opened, and
no file is read through a link out of the library. With ``lenient`` loading a broken AV is
refused with a one-line warning instead, and the rest of the library is served.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_av.format.checkpoint import is_moe_expert
from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.front.mix import NAME_RE

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
AV_JSON = "av.json"
_FLOAT32_MAX = 3.4028234663852886e38
_KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")


logger = logging.getLogger("vllm.av")

_libraries: dict[tuple, list] = {}  # this process's validated libraries (see library_for)


class AVLibraryError(ValueError):
    """The AV library (or one AV in it) cannot be served."""


@dataclass(frozen=True)
class AVEntry:
    """One validated AV: its name, directory, rank, modules and metadata."""

    name: str
    path: str
    rank: int
    modules: tuple[str, ...]
    description: str = ""
    compatibility: str = "unknown"
    metadata: dict = field(default_factory=dict, compare=False, hash=False)
    digest: str = ""  # of the AV's files (:func:`files_digest`): which weights a request's KV was computed with

    def summary(self) -> dict:
        """What the listing endpoint shows for this AV."""
        return {
            "name": self.name,
            "rank": self.rank,
            "modules": len(self.modules),
            "description": self.description,
            "compatibility": self.compatibility,
            "path": self.path,
            "digest": self.digest,
        }


def _fail(path: Path, message: str) -> AVLibraryError:
    return AVLibraryError(f"{path}: {message}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(path, "expected a JSON object")
    return data


def _check_tensors(
    weights: Path, config: AVConfig, model_shapes: dict[str, tuple[int, int]] | None, max_scaling: float
) -> tuple[int, tuple[str, ...]]:
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
                    raise _fail(weights, f"tensor {key}: not a LoRA weight (base_model.model.<module>.lora_A/B.weight)")
                tensor = f.get_tensor(key)
                if tensor.ndim != 2 or not tensor.is_floating_point() or tensor.numel() == 0:
                    raise _fail(weights, f"tensor {key}: expected a 2-D float tensor, got {tensor.dtype} {list(tensor.shape)}")
                if not bool(torch.isfinite(tensor).all()):
                    raise _fail(weights, f"tensor {key}: contains NaN or Inf")
                served = tensor.double().abs().max().item() * (max_scaling if match["ab"] == "B" else 1.0)
                if served > _FLOAT32_MAX:
                    raise _fail(weights, f"tensor {key}: values up to {served:.3g} (after alpha/r) overflow float32")
                shapes[(match["module"], match["ab"])] = tuple(tensor.shape)
    except SafetensorError as exc:
        raise _fail(weights, f"not a readable safetensors file ({exc})") from None
    if not shapes:
        raise _fail(weights, "holds no LoRA tensors")
    modules = sorted({m for m, _ in shapes})
    max_rank = 0
    for module in modules:
        key = f"base_model.model.{module}.lora_"
        a, b = shapes.get((module, "A")), shapes.get((module, "B"))
        if a is None or b is None:
            raise _fail(weights, f"tensor {key}{'B' if a else 'A'}.weight is missing (lora_A and lora_B come in pairs)")
        if is_moe_expert(module):
            raise _fail(weights, f"tensor {key}A.weight: {module} is an MoE expert; vLLM serves the experts as one "
                                 f"fused MoE layer, which cannot carry AVs (vllm-av extract leaves expert deltas out)")
        rank = a[0]
        if b[1] != rank:
            raise _fail(weights, f"tensor {key}B.weight has rank {b[1]} but lora_A has rank {rank}")
        if rank > config.max_rank:
            raise _fail(weights, f"tensor {key}A.weight has rank {rank} > the server's max AV rank {config.max_rank}")
        if model_shapes is not None:
            expected = model_shapes.get(module)
            if expected is None:
                raise _fail(weights, f"tensor {key}A.weight: the model has no linear weight {module}.weight")
            if (b[0], a[1]) != expected:
                raise _fail(
                    weights,
                    f"tensor {key}A.weight/B.weight: delta shape [{b[0]}, {a[1]}] != model weight {module}.weight {list(expected)}",
                )
        max_rank = max(max_rank, rank)
    return max_rank, tuple(modules)


def _check_scaling(adapter_config: Path, peft: dict) -> float:
    """Check the ranks and alphas vLLM reads from ``adapter_config.json``; return the largest
    factor (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA) vLLM may fold into a lora_B."""
    ranks = [("r", peft.get("r"))] + [(f"rank_pattern[{k!r}]", v) for k, v in _pattern(adapter_config, peft, "rank_pattern")]
    for label, rank in ranks:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise _fail(adapter_config, f"{label} must be a positive integer, got {rank!r}")
    alphas = [("lora_alpha", peft.get("lora_alpha"))] + [
        (f"alpha_pattern[{k!r}]", v) for k, v in _pattern(adapter_config, peft, "alpha_pattern")
    ]
    for label, alpha in alphas:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise _fail(adapter_config, f"{label} must be a finite number, got {alpha!r}")
    smallest = min(rank for _, rank in ranks)
    return max(abs(float(alpha)) for _, alpha in alphas) / (math.sqrt(smallest) if peft.get("use_rslora") else smallest)


def _pattern(adapter_config: Path, peft: dict, key: str) -> list[tuple[str, object]]:
    value = peft.get(key) or {}
    if not isinstance(value, dict):
        raise _fail(adapter_config, f"{key} must be an object, got {type(value).__name__}")
    return list(value.items())


def inside(path: Path, real_root: Path, library: str = "AV library") -> Path:
    """``path`` if it does not resolve out of the library at ``real_root``; a link out is refused."""
    if not path.resolve().is_relative_to(real_root):
        raise _fail(path, f"is a link out of the {library}; refused")
    return path


def name_problem(name: object, config: AVConfig, noun: str = "AV") -> str | None:
    """Why ``name`` cannot name an entry of a served library (None: it can)."""
    if isinstance(name, str) and NAME_RE.fullmatch(name) and len(name) <= config.max_name_length:
        return None
    return f"{noun} name {name!r} must be 1-{config.max_name_length} characters of [A-Za-z0-9_.-]"


def _load_entry(directory: Path, config: AVConfig, model_shapes, model_dir: str | None, real_root: Path,
                name: str | None = None) -> AVEntry:
    adapter_config = inside(directory / ADAPTER_CONFIG, real_root)
    weights = inside(directory / ADAPTER_WEIGHTS, real_root)
    if not weights.is_file():
        pickles = [p for p in PICKLE_WEIGHTS if (directory / p).exists()]
        if pickles:
            raise _fail(directory / pickles[0], "pickle weights are refused; convert the adapter to adapter_model.safetensors")
        raise _fail(weights, "missing")
    peft = _read_json(adapter_config)
    if peft.get("peft_type", "LORA") != "LORA":
        raise _fail(adapter_config, f"peft_type {peft.get('peft_type')!r} is not LORA")
    if peft.get("use_dora"):
        raise _fail(adapter_config, "DoRA adapters cannot be served as AVs")
    if peft.get("bias", "none") != "none":
        raise _fail(adapter_config, f"bias={peft.get('bias')!r} is not supported (must be 'none')")
    max_scaling = _check_scaling(adapter_config, peft)
    av_json = inside(directory / AV_JSON, real_root)
    meta = _read_json(av_json) if av_json.is_file() else {}
    name = name or meta.get("name") or directory.name
    problem = name_problem(name, config)
    if problem:
        raise _fail(directory / (AV_JSON if meta else ""), problem)
    rank, modules = _check_tensors(weights, config, model_shapes, max_scaling)
    compatibility = "unknown"
    if meta and model_dir is not None:
        from vllm_av.format.avfile import check_compatibility

        try:
            compatibility, reason = check_compatibility(meta, model_dir)
        except (KeyError, TypeError, ValueError) as exc:
            raise _fail(directory / AV_JSON, f"malformed av.json ({type(exc).__name__}: {exc})") from None
        if compatibility == "incompatible":
            raise _fail(directory / AV_JSON, f"AV {name!r} is incompatible with the served model: {reason}")
    return AVEntry(
        name=name,
        path=str(directory),
        rank=rank,
        modules=modules,
        description=str(meta.get("description", "")),
        compatibility=compatibility,
        metadata=meta,
        digest=files_digest(directory),
    )


def _model_weight_shapes(model_dir: str) -> dict[str, tuple[int, int]]:
    """``{module: (out, in)}`` for every 2-D ``<module>.weight`` of a local checkpoint (headers only)."""
    from vllm_av.format.checkpoint import Checkpoint

    tensors = Checkpoint.open(model_dir).tensors
    return {
        name.removesuffix(".weight"): info.shape
        for name, info in tensors.items()
        if name.endswith(".weight") and len(info.shape) == 2
    }


def load_library(path: str, config: AVConfig, model_dir: str | None = None) -> list[AVEntry]:
    """Validate every AV under ``path``; return them sorted by name (their library index).

    ``model_dir``: the served model's local directory, if any; then each AV's shapes are
    checked against the model's weights and its ``av.json`` fingerprint against the model.
    """
    root = Path(path)
    if not root.is_dir():
        raise AVLibraryError(f"{root}: AV library directory not found")
    model_shapes = _model_weight_shapes(model_dir) if model_dir and Path(model_dir).is_dir() else None
    real_root = root.resolve()
    return scan_entries(root, config, lambda d: _scan(d, config, model_shapes,
                                                      model_dir if model_shapes is not None else None, real_root),
                        noun="AV", plural="adapters", allow_empty=config.allow_runtime_updates)


def scan_entries(root: Path, config: AVConfig, load_one, noun: str, plural: str, allow_empty: bool = False) -> list:
    """``load_one(directory)`` for every entry of the library ``root`` (None: not an entry), sorted by name.

    Names must be unique; with ``config.lenient`` an entry that raises :class:`AVLibraryError` is
    refused with a warning and the rest are kept; an empty result is an error unless ``allow_empty``. ``noun``/``plural``
    name what the library holds in messages ("AV"/"adapters")."""
    label = noun.replace(" ", "-")
    entries: dict = {}
    refused = 0
    for directory in sorted(p for p in root.iterdir() if not p.name.startswith(".")):
        try:
            entry = load_one(directory)
            if entry is not None and entry.name in entries:
                raise _fail(directory, f"{label} name {entry.name!r} is also used by {entries[entry.name].path}")
        except AVLibraryError as exc:
            if not config.lenient:
                raise
            logger.warning("vllm-av: %s refused (lenient loading): %s", noun, exc)
            refused += 1
            continue
        if entry is not None:
            entries[entry.name] = entry
    if not entries and not allow_empty:
        reason = f" ({refused} refused)" if refused else ""
        raise AVLibraryError(f"{root}: the {label} library holds no {plural}{reason}")
    return [entries[name] for name in sorted(entries)]


def _scan(directory: Path, config: AVConfig, model_shapes, model_dir: str | None, real_root: Path) -> AVEntry | None:
    """The AV in one library entry, or None for a plain file (not an AV)."""
    inside(directory, real_root)
    if not directory.is_dir():
        return None
    if not (directory / ADAPTER_CONFIG).is_file():
        raise _fail(directory / ADAPTER_CONFIG, "missing (every library sub-directory must be a PEFT LoRA adapter)")
    return _load_entry(directory, config, model_shapes, model_dir, real_root)


def local_model_dir(model: str) -> str | None:
    """The served model's directory if it is a local path, else None (a hub name)."""
    return model if model and Path(model).is_dir() else None


def files_digest(directory: Path) -> str:
    """A digest of an AV directory's files (every file's name and bytes, in order)."""
    digest = hashlib.blake2b(digest_size=8)
    for file in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def library_digest(entries: Sequence[AVEntry]) -> str:
    """A digest of the served library (every AV's name and :func:`files_digest`, in order).

    It goes into ``additional_config``, which vLLM hashes into its compile-cache key: a graph
    compiled for one library is never reused for another under the same path.
    """
    digest = hashlib.blake2b(digest_size=16)
    for entry in entries:
        digest.update(f"{entry.name}\0{entry.digest}\0".encode())
    return digest.hexdigest()


def load_av(path: str, name: str, config: AVConfig, model_dir: str | None = None) -> AVEntry:
    """Validate one AV directory loaded at runtime, under ``name``, as the library's AVs are at start.

    No file may be read through a link out of ``path`` itself.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise AVLibraryError(f"{directory}: AV directory not found")
    if not (directory / ADAPTER_CONFIG).is_file():
        raise _fail(directory / ADAPTER_CONFIG, "missing (an AV is a PEFT LoRA adapter directory)")
    problem = name_problem(name, config)
    if problem:
        raise AVLibraryError(problem)
    model_shapes = _model_weight_shapes(model_dir) if model_dir and Path(model_dir).is_dir() else None
    return _load_entry(directory, config, model_shapes, model_dir if model_shapes is not None else None,
                       directory.resolve(), name=name)


def library_for(config: AVConfig, model_dir: str | None) -> list[AVEntry]:
    """:func:`load_library` once per process for the same settings and model (cached)."""
    # Everything load_library's checks depend on (not max_per_request/max_abs_scale/stock_lora).
    key = (config.path, config.max_rank, config.max_name_length, config.lenient, config.allow_runtime_updates, model_dir)
    if key not in _libraries:
        _libraries[key] = load_library(config.path, config, model_dir=model_dir)
    return _libraries[key]
