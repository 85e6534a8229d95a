"""The on-disk value-function format: a directory with ``value.safetensors`` and ``value.json``.

    value.safetensors   linears.<i>.weight [out, in] and linears.<i>.bias [out], float32 (ValueMLP's state dict)
    value.json          format, name, description, architecture (layers, hidden_size, width), the base
                        model's fingerprint (as in av.json), the reward used and the training figures

:func:`read_value_meta` and :func:`check_value_file` read JSON and safetensors only (never a pickle),
and every problem is one :class:`ValueFileError` line naming the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from vllm_av.errors import AVError

VALUE_FORMAT = "vllm-av-value/1"
VALUE_JSON = "value.json"
VALUE_WEIGHTS = "value.safetensors"
_KEY_RE = re.compile(r"linears\.(?P<i>\d+)\.(?P<kind>weight|bias)")


class ValueFileError(AVError):
    """A value-function directory that cannot be read or served."""


def _fail(path: Path, message: str) -> ValueFileError:
    return ValueFileError(f"{path}: {message}")


def layer_shapes(hidden_size: int, width: int, layers: int) -> list[tuple[int, int]]:
    """``[out, in]`` of each linear layer of a ``layers``-layer value MLP."""
    sizes = [hidden_size] + [width] * (layers - 1) + [1]
    return [(b, a) for a, b in zip(sizes, sizes[1:])]


def save_value_function(directory: str | Path, value, meta: dict) -> Path:
    """Write ``value`` (a :class:`~vllm_av.recontrol.value.ValueMLP`) and ``value.json`` to ``directory``.

    ``meta`` holds at least ``name``; ``layers``, ``hidden_size`` and ``width`` are taken from ``value``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in value.state_dict().items()}
    save_file(state, str(directory / VALUE_WEIGHTS))
    first = value.linears[0]
    record = {
        "format": VALUE_FORMAT,
        "description": "",
        **meta,
        "layers": len(value.linears),
        "hidden_size": first.in_features,
        "width": first.out_features,
    }
    (directory / VALUE_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def read_value_meta(directory: str | Path) -> dict:
    """The checked contents of ``value.json`` (format, name, architecture fields)."""
    path = Path(directory) / VALUE_JSON
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise _fail(path, "missing (every value-function directory needs value.json and value.safetensors)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"unreadable JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise _fail(path, "expected a JSON object")
    if meta.get("format") != VALUE_FORMAT:
        raise _fail(path, f"format {meta.get('format')!r} is not {VALUE_FORMAT!r}")
    for key in ("layers", "hidden_size", "width"):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _fail(path, f"{key} must be a positive integer, got {value!r}")
    if meta["layers"] not in (2, 3):
        raise _fail(path, f"layers={meta['layers']}: a value function has 2 or 3 layers")
    if not isinstance(meta.get("name", ""), str):
        raise _fail(path, "name must be a string")
    return meta


def check_value_file(directory: str | Path, meta: dict):
    """Load ``value.safetensors``, checking every tensor against ``meta``; return the state dict (float32)."""
    import torch
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / VALUE_WEIGHTS
    if not path.is_file():
        pickles = [p.name for p in Path(directory).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        hint = f" ({pickles[0]} is a pickle file, which is never loaded)" if pickles else ""
        raise _fail(path, f"missing{hint}")
    expected = {}
    for i, (out, inp) in enumerate(layer_shapes(meta["hidden_size"], meta["width"], meta["layers"])):
        expected[f"linears.{i}.weight"] = (out, inp)
        expected[f"linears.{i}.bias"] = (out,)
    state = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key not in expected:
                    raise _fail(path, f"tensor {key}: not a weight of a {meta['layers']}-layer value MLP "
                                      f"(expected {', '.join(expected)})")
                tensor = f.get_tensor(key)
                if not tensor.is_floating_point() or tuple(tensor.shape) != expected[key]:
                    raise _fail(path, f"tensor {key}: expected float {list(expected[key])}, got {tensor.dtype} "
                                      f"{list(tensor.shape)}")
                if not bool(torch.isfinite(tensor).all()):
                    raise _fail(path, f"tensor {key}: contains NaN or Inf")
                state[key] = tensor.float()
    except SafetensorError as exc:
        raise _fail(path, f"not a readable safetensors file ({exc})") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        raise _fail(path, f"tensor {missing[0]} is missing")
    return state


def load_value_function(directory: str | Path):
    """The :class:`~vllm_av.recontrol.value.ValueMLP` in ``directory`` (float32, CPU, eval mode), checked."""
    from vllm_av.recontrol.value import ValueMLP

    meta = read_value_meta(directory)
    state = check_value_file(directory, meta)
    value = ValueMLP(meta["hidden_size"], meta["width"], meta["layers"])
    value.load_state_dict(state)
    return value.eval()


def check_value_compatibility(meta: dict, model_dir: str | Path) -> tuple[str, str]:
    """``(verdict, reason)`` for serving a value function on ``model_dir``.

    ``same_base``: the checkpoint its training states came from; ``same_architecture``: same
    architecture, other weights (it runs, but it scores another model's states); ``incompatible``:
    a different hidden size or architecture, or no fingerprint to compare (then ``unknown``)."""
    from vllm_av.format.checkpoint import Checkpoint, Fingerprint

    model = Checkpoint.open(model_dir)
    fp = model.fingerprint()
    hidden = model.config.get("hidden_size") or (model.config.get("text_config") or {}).get("hidden_size")
    if hidden is not None and hidden != meta["hidden_size"]:
        return "incompatible", f"hidden size {meta['hidden_size']} != the model's {hidden}"
    if "base" not in meta:
        return "unknown", "value.json records no base-model fingerprint"
    try:
        base = Fingerprint.from_dict(meta["base"])
    except (KeyError, TypeError) as exc:
        return "incompatible", f"malformed base fingerprint ({type(exc).__name__}: {exc})"
    if fp.arch_hash != base.arch_hash:
        diffs = [f"{k}={fp.arch.get(k)!r} (value base: {base.arch.get(k)!r})"
                 for k in sorted(set(fp.arch) | set(base.arch)) if fp.arch.get(k) != base.arch.get(k)]
        return "incompatible", "different architecture: " + ", ".join(diffs)
    if fp.tensors_hash == base.tensors_hash and fp.content_hash == base.content_hash:
        return "same_base", "trained on this model's hidden states"
    return "same_architecture", "same architecture; trained on another checkpoint's hidden states"
