"""Scan and validate the RE-Control value-function library (one ``vllm-av recontrol train`` directory each).

Like the AV library (:mod:`vllm_av.serving.library.avs`): read in the API-server process before the
engine starts, so a bad file fails the start with one line naming the file and tensor; safetensors
only, no link out of the library, names ``[A-Za-z0-9_.-]+``; the hidden size must be the served
model's and the base fingerprint must not name another architecture. With ``lenient`` a broken
value function is refused with a warning and the rest are served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_av.recontrol.valuefile import (
    VALUE_JSON, ValueFileError, check_value_compatibility, check_value_file, read_value_meta,
)
from vllm_av.format.names import name_problem
from vllm_av.format.validate import inside
from vllm_av.serving.library.scan import AVLibraryError, scan_entries
from vllm_av.serving.settings.config import AVConfig, library_key

LIBRARY = "value-function library"
_libraries: dict[tuple, list] = {}


@dataclass(frozen=True)
class ValueEntry:
    """One validated value function."""

    name: str
    path: str
    hidden_size: int
    width: int
    layers: int
    reward: str = ""
    description: str = ""
    compatibility: str = "unknown"

    def summary(self) -> dict:
        """What ``GET /v1/av`` shows for this value function."""
        return {"name": self.name, "layers": self.layers, "width": self.width, "hidden_size": self.hidden_size,
                "reward": self.reward, "description": self.description, "compatibility": self.compatibility,
                "path": self.path}


def _load_entry(directory: Path, config: AVConfig, model_dir: str | None, hidden_size: int | None,
                real_root: Path) -> ValueEntry:
    for file in directory.iterdir():
        inside(file, real_root, LIBRARY)
    try:
        meta = read_value_meta(directory)
        check_value_file(directory, meta)
    except ValueFileError as exc:
        raise AVLibraryError(str(exc)) from None
    name = meta.get("name") or directory.name
    problem = name_problem(name, config.max_name_length, noun="value-function")
    if problem:
        raise AVLibraryError(f"{directory / VALUE_JSON}: {problem}")
    if hidden_size is not None and meta["hidden_size"] != hidden_size:
        raise AVLibraryError(f"{directory / VALUE_JSON}: hidden_size {meta['hidden_size']} != the served model's "
                             f"hidden size {hidden_size}")
    compatibility = "unknown"
    if model_dir is not None:
        compatibility, reason = check_value_compatibility(meta, model_dir)
        if compatibility == "incompatible":
            raise AVLibraryError(f"{directory / VALUE_JSON}: value function {name!r} is incompatible with the "
                                 f"served model: {reason}")
    return ValueEntry(name, str(directory), meta["hidden_size"], meta["width"], meta["layers"],
                      reward=str(meta.get("reward", "")), description=str(meta.get("description", "")),
                      compatibility=compatibility)


def _model_hidden_size(model_dir: str | None) -> int | None:
    if model_dir is None:
        return None
    from vllm_av.format.checkpoint import Checkpoint

    config = Checkpoint.open(model_dir).config
    return config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size")


def load_value_library(config: AVConfig, model_dir: str | None = None) -> list[ValueEntry]:
    """Validate every value function under ``config.recontrol_path``; sorted by name (their index)."""
    root = Path(config.recontrol_path)
    if not root.is_dir():
        raise AVLibraryError(f"{root}: value-function library directory not found")
    hidden_size = _model_hidden_size(model_dir)
    real_root = root.resolve()

    def load_one(directory: Path) -> ValueEntry | None:
        inside(directory, real_root, LIBRARY)
        return _load_entry(directory, config, model_dir, hidden_size, real_root) if directory.is_dir() else None

    return scan_entries(root, config, load_one, noun="value function", plural="value functions")


def value_library_for(config: AVConfig, model_dir: str | None) -> list[ValueEntry]:
    """:func:`load_value_library` once per process for the same settings and model; [] when RE-Control is off."""
    if not config.recontrol_path:
        return []
    key = library_key(config, "values", model_dir)
    if key not in _libraries:
        _libraries[key] = load_value_library(config, model_dir)
    return _libraries[key]
