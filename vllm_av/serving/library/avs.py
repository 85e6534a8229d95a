"""The AV library: one PEFT LoRA adapter directory per AV, validated at start (and one by one at runtime).

Runs in the API-server process before the engine starts, so a bad library fails fast with one
line naming the file (and tensor): every AV is checked by :func:`vllm_av.format.validate.validate_av_dir`
(safetensors only, no link out of the library, shapes against the model, rank limit, NaN/Inf,
name, compatibility); workers load the same validated entries with vLLM's own LoRA loader. With
``lenient`` loading a broken AV is refused with a one-line warning instead, and the rest of the
library is served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_av.format.avfile import ADAPTER_CONFIG
from vllm_av.format.names import name_problem
from vllm_av.format.validate import AVFileError, inside, model_weight_shapes, validate_av_dir
from vllm_av.serving.library.scan import AVLibraryError, scan_entries
from vllm_av.serving.settings.config import AVConfig, library_key

_libraries: dict[tuple, list] = {}  # this process's validated libraries (see library_for)


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


def _load_entry(directory: Path, config: AVConfig, model_shapes, model_dir: str | None, real_root: Path,
                name: str | None = None) -> AVEntry:
    valid = validate_av_dir(directory, max_rank=config.max_rank, max_name_length=config.max_name_length,
                            model_dir=model_dir, model_shapes=model_shapes, root=real_root, name=name)
    return AVEntry(name=valid.name, path=str(directory), rank=valid.rank, modules=valid.modules,
                   description=valid.description, compatibility=valid.compatibility, metadata=valid.meta,
                   digest=files_digest(directory))


def load_library(path: str, config: AVConfig, model_dir: str | None = None) -> list[AVEntry]:
    """Validate every AV under ``path``; return them sorted by name (their library index).

    ``model_dir``: the served model's local directory, if any; then each AV's shapes are
    checked against the model's weights and its ``av.json`` fingerprint against the model.
    """
    root = Path(path)
    if not root.is_dir():
        raise AVLibraryError(f"{root}: AV library directory not found")
    model_shapes = model_weight_shapes(model_dir) if model_dir and Path(model_dir).is_dir() else None
    real_root = root.resolve()
    return scan_entries(root, config, lambda d: _scan(d, config, model_shapes,
                                                      model_dir if model_shapes is not None else None, real_root),
                        noun="AV", plural="adapters", allow_empty=config.allow_runtime_updates)


def _scan(directory: Path, config: AVConfig, model_shapes, model_dir: str | None, real_root: Path) -> AVEntry | None:
    """The AV in one library entry, or None for a plain file (not an AV)."""
    inside(directory, real_root)
    if not directory.is_dir():
        return None
    if not (directory / ADAPTER_CONFIG).is_file():
        raise AVLibraryError(f"{directory / ADAPTER_CONFIG}: missing (every library sub-directory must be a PEFT "
                             f"LoRA adapter)")
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
        raise AVLibraryError(f"{directory / ADAPTER_CONFIG}: missing (an AV is a PEFT LoRA adapter directory)")
    problem = name_problem(name, config.max_name_length)
    if problem:
        raise AVLibraryError(problem)
    model_shapes = model_weight_shapes(model_dir) if model_dir and Path(model_dir).is_dir() else None
    try:
        return _load_entry(directory, config, model_shapes, model_dir if model_shapes is not None else None,
                           directory.resolve(), name=name)
    except AVFileError as exc:
        raise AVLibraryError(str(exc)) from None


def library_for(config: AVConfig, model_dir: str | None) -> list[AVEntry]:
    """:func:`load_library` once per process for the same settings and model (cached)."""
    key = library_key(config, "avs", model_dir)  # everything load_library's checks depend on
    if key not in _libraries:
        _libraries[key] = load_library(config.path, config, model_dir=model_dir)
    return _libraries[key]
