"""Lazy reader for Hugging Face safetensors checkpoints, and checkpoint fingerprints.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed
in ``model.safetensors.index.json``. Only the small JSON headers are read up front; tensors are
read one at a time. Pickle checkpoints (``.bin``/``.pt``/``.pth``) are refused and never opened.

This module imports no torch at import time (only ``Checkpoint.load`` needs it), so fingerprints
can be computed cheaply by the plugin at startup.
"""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_av.errors import AVError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# transformers' config.json names for a mixture-of-experts model's expert count.
MOE_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
# config.json fields that fix the tensor shapes and module structure of a model.
ARCH_FIELDS = (
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    *MOE_EXPERT_COUNT_FIELDS,
    "tie_word_embeddings",
)
SAMPLE_WINDOW = 1024  # bytes hashed at the start, middle and end of every tensor
_MAX_HEADER = 100 * 2**20


def is_moe_expert(name: str) -> bool:
    """True for a tensor or module name inside an MoE expert list (``...mlp.experts.<i>.<proj>``).

    vLLM serves the experts as one fused MoE layer, which cannot carry AVs."""
    return "experts" in name.split(".")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, safetensors dtype string (``"F32"``, ``"BF16"``...), shape, byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a checkpoint.

    ``arch_hash`` hashes the architecture fields of config.json (``arch``), ``tensors_hash`` every
    tensor's name, shape and dtype, ``content_hash`` a sample of every tensor's bytes.
    """

    arch_hash: str
    tensors_hash: str
    content_hash: str
    num_tensors: int
    arch: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Fingerprint:
        return cls(d["arch_hash"], d["tensors_hash"], d["content_hash"], d["num_tensors"], d["arch"])


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors file's JSON header into ``{name: TensorInfo}`` (absolute byte offsets)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise ValueError("header too large")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise AVError(f"{file} is not a readable safetensors file ({e})") from None
    base = 8 + n
    return {
        name: TensorInfo(file, h["dtype"], tuple(h["shape"]), base + h["data_offsets"][0], base + h["data_offsets"][1])
        for name, h in header.items()
        if name != "__metadata__"
    }


def arch_fields(config: dict) -> dict:
    """The architecture-defining subset of a config.json (also of a nested ``text_config``)."""
    out = {k: config[k] for k in ARCH_FIELDS if k in config}
    if isinstance(config.get("text_config"), dict):
        out.update({f"text_config.{k}": v for k, v in arch_fields(config["text_config"]).items()})
    return out


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class Checkpoint:
    """A safetensors checkpoint directory, opened lazily (headers only)."""

    def __init__(self, root: Path, config: dict, tensors: dict[str, TensorInfo]):
        self.root = root
        self.config = config
        self.tensors = tensors

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Read ``config.json`` and the safetensors headers of ``path``; refuse pickles and missing files."""
        root = Path(path)
        if not root.is_dir():
            raise AVError(f"{root} is not a directory")
        config_file = root / "config.json"
        if not config_file.is_file():
            raise AVError(f"{config_file} not found: expected a Hugging Face model directory")
        config = json.loads(config_file.read_text())
        tensors: dict[str, TensorInfo] = {}
        for file in _safetensors_files(root):
            for name, info in read_header(file).items():
                if name in tensors:
                    raise AVError(f"tensor {name} appears in both {tensors[name].file} and {file}")
                tensors[name] = info
        return cls(root, config, tensors)

    def load(self, name: str):
        """Read one tensor (native dtype, CPU) with ``safe_open``; the file is closed again right away."""
        from safetensors import safe_open

        with safe_open(self.tensors[name].file, framework="pt") as f:
            return f.get_tensor(name)

    def fingerprint(self) -> Fingerprint:
        """Hash the architecture fields, the tensor list and a byte sample of every tensor."""
        arch = arch_fields(self.config)
        names = sorted(self.tensors)
        tensor_list = [[n, list(self.tensors[n].shape), self.tensors[n].dtype] for n in names]
        content = hashlib.sha256()
        with ExitStack() as stack:
            handles = {}
            for n in names:
                info = self.tensors[n]
                if info.file not in handles:
                    handles[info.file] = stack.enter_context(open(info.file, "rb"))
                f = handles[info.file]
                content.update(n.encode())
                for offset in _sample_offsets(info.start, info.end):
                    f.seek(offset)
                    content.update(f.read(min(SAMPLE_WINDOW, info.end - offset)))
        return Fingerprint(_sha(arch), _sha(tensor_list), content.hexdigest(), len(names), arch)


def _sample_offsets(start: int, end: int) -> list[int]:
    size = end - start
    if size <= 3 * SAMPLE_WINDOW:
        return [start]
    return [start, start + (size - SAMPLE_WINDOW) // 2, end - SAMPLE_WINDOW]


def _safetensors_files(root: Path) -> list[Path]:
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise AVError(f"{index} is not a valid safetensors index ({e})") from None
        files = [root / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise AVError(f"shard {file} listed in {index} is missing")
        return files
    if (root / SINGLE_NAME).is_file():
        return [root / SINGLE_NAME]
    pickles = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise AVError(
            f"{pickles[0]} is a pickle checkpoint; vllm-av reads only safetensors and never unpickles "
            "(convert it to safetensors first)"
        )
    raise AVError(f"no {SINGLE_NAME} or {INDEX_NAME} in {root}")
