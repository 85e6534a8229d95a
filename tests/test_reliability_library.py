"""Corrupt AV library corpus (issue 7): strict and lenient loading, and nothing is ever unpickled.

``tests/test_library.py`` refuses 18 kinds of broken AV in strict mode; this adds 12 more kinds
(pickles disguised or planted, empty and lying safetensors, links out of the library, weights
or ``lora_alpha`` that overflow float32 once served, rank 0, bad ranks) and checks every one of
the other 29 kinds in lenient mode: that AV refused in one warning line naming the file, the rest loaded.
"""

import json
import logging
import pickle
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_library import KINDS, broken

from vllm_av.serving.settings.config import AVConfig, AVConfigError
from vllm_av.serving.library.avs import AVLibraryError, load_library
from vllm_av.testing.models import build_demo

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


class CreatesFileWhenUnpickled:
    """Unpickling this calls ``open(path, "w")``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def library(demo, tmp_path):
    shutil.copytree(demo[1], tmp_path / "lib")
    return tmp_path / "lib"


def edit(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def edit_config(av, **changes):
    path = av / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def corrupt(kind, lib):
    """Break AV 'alpha' of ``lib`` in one more way; return (expected file, expected message)."""
    av = lib / "alpha"
    weights = av / "adapter_model.safetensors"
    bomb = pickle.dumps(CreatesFileWhenUnpickled(lib.parent / "unpickled"))
    if kind == "pickle_bomb":
        weights.unlink()
        (av / "adapter_model.pt").write_bytes(bomb)
        return av / "adapter_model.pt", "pickle weights are refused"
    if kind == "pickle_named_safetensors":
        weights.write_bytes(bomb)
        return weights, "not a readable safetensors file"
    if kind == "empty_file":
        weights.write_bytes(b"")
        return weights, "not a readable safetensors file"
    if kind == "header_lies":
        header = json.dumps({KEY.format("A"): {"dtype": "F32", "shape": [4, 128], "data_offsets": [0, 10**9]}}).encode()
        weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
        return weights, "not a readable safetensors file"
    if kind == "weights_link_out":
        outside = lib.parent / "outside.safetensors"
        weights.rename(outside)
        weights.symlink_to(outside)
        return weights, "is a link out of the AV library"
    if kind == "av_json_link_out":
        outside = lib.parent / "outside.json"
        (av / "av.json").rename(outside)
        (av / "av.json").symlink_to(outside)
        return av / "av.json", "is a link out of the AV library"
    if kind == "alpha_nan":
        return edit_config(av, lora_alpha=float("nan")), "lora_alpha must be a finite number, got nan"
    if kind == "alpha_overflows_float32":
        edit_config(av, lora_alpha=1e300)
        return weights, "(after alpha/r) overflow float32"
    if kind == "float64_overflows_float32":
        edit(weights, lambda t: t.__setitem__(KEY.format("A"), torch.full((4, 128), 1e300, dtype=torch.float64)))
        return weights, f"tensor {KEY.format('A')}: values up to 1e+300 (after alpha/r) overflow float32"
    if kind == "rank_zero":
        edit(weights, lambda t: t.update({KEY.format("A"): torch.zeros(0, 128), KEY.format("B"): torch.zeros(128, 0)}))
        return weights, "expected a 2-D float tensor, got torch.float32 [0, 128]"
    if kind == "missing_r":
        config = json.loads((av / "adapter_config.json").read_text())
        del config["r"]
        (av / "adapter_config.json").write_text(json.dumps(config))
        return av / "adapter_config.json", "r must be a positive integer, got None"
    if kind == "bad_rank_pattern":
        return edit_config(av, rank_pattern={"q_proj": "4"}), "rank_pattern['q_proj'] must be a positive integer"
    raise AssertionError(kind)


MORE_KINDS = [
    "pickle_bomb", "pickle_named_safetensors", "empty_file", "header_lies", "weights_link_out", "av_json_link_out",
    "alpha_nan", "alpha_overflows_float32", "float64_overflows_float32", "rank_zero", "missing_r", "bad_rank_pattern",
]


def config(**overrides):
    return AVConfig(path="unused", **overrides)


@pytest.mark.parametrize("kind", MORE_KINDS)
def test_more_broken_avs_are_refused_in_one_line_naming_the_file(demo, library, kind):
    path, message = corrupt(kind, library)
    with pytest.raises(AVLibraryError) as excinfo:
        load_library(str(library), config(), model_dir=str(demo[0]))
    text = str(excinfo.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and message in text, text
    assert not (library.parent / "unpickled").exists()


# ("rank_over_limit" lowers the server's limit below every AV's rank: nothing would be left.)
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "rank_over_limit"] + MORE_KINDS)
def test_lenient_loading_refuses_only_the_broken_av(demo, library, kind, caplog):
    path, message = (corrupt if kind in MORE_KINDS else broken)(kind, library)
    with caplog.at_level(logging.WARNING, logger="vllm.av"):
        entries = load_library(str(library), config(lenient=True), model_dir=str(demo[0]))
    # ("duplicate_name" renames alpha to beta: the directory named beta is then the one refused.)
    assert [e.name for e in entries] == ["beta", "gamma"]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "\n" not in warning
    assert warning.startswith(f"vllm-av: AV refused (lenient loading): {path}: ") and message in warning
    assert not (library.parent / "unpickled").exists()


def test_lenient_library_with_nothing_servable_still_stops_the_start(library):
    for av in ("alpha", "beta", "gamma"):
        (library / av / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AVLibraryError, match=r"holds no adapters \(3 refused\)"):
        load_library(str(library), AVConfig(path="unused", lenient=True))


def test_plain_files_and_hidden_entries_are_ignored(demo, library):
    (library / "README.md").write_text("notes")
    (library / ".cache").mkdir()
    assert [e.name for e in load_library(str(library), AVConfig(path="unused"))] == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_lenient_setting_must_be_a_bool(value):
    with pytest.raises(AVConfigError, match="av.lenient must be true or false"):
        AVConfig.from_dict({"path": "/x", "lenient": value})
