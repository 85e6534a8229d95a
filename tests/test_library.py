"""AV library validation at startup: a good library loads; each kind of bad AV is refused in one line naming the file."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.library.avs import AVLibraryError, load_av, load_library
from vllm_av.testing.models import build_demo, build_tiny_model

KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture
def library(demo, tmp_path):
    """A fresh copy of the demo library, with the paths of its AV 'alpha' files."""
    _, source = demo
    lib = tmp_path / "lib"
    shutil.copytree(source, lib)
    return lib


def config(**overrides):
    return AVConfig(path="unused", **overrides)


def edit_tensors(path, change):
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def test_good_library_loads_sorted_with_compatibility(demo, library):
    model, _ = demo
    entries = load_library(str(library), config(), model_dir=str(model))
    assert [e.name for e in entries] == ["alpha", "beta", "gamma"]
    assert all(e.rank == 4 and len(e.modules) == 14 and e.compatibility == "same_base" for e in entries)


def test_other_weights_same_architecture_is_accepted_and_reported(demo, library, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=7)
    entries = load_library(str(library), config(), model_dir=str(other))
    assert {e.compatibility for e in entries} == {"same_architecture"}


def test_incompatible_model_is_refused(library, tmp_path):
    wider = build_tiny_model(tmp_path / "wider", hidden_size=256, num_heads=8, num_kv_heads=4)
    with pytest.raises(AVLibraryError, match=r"alpha/adapter_model.safetensors: tensor .* delta shape"):
        load_library(str(library), config(), model_dir=str(wider))


def broken(kind, lib):
    """Break AV 'alpha' of ``lib`` in one way; return (expected file, expected message)."""
    av = lib / "alpha"
    weights = av / "adapter_model.safetensors"
    if kind == "wrong_shape":
        edit_tensors(weights, lambda t: t.__setitem__(KEY.format("A"), torch.zeros(4, 96)))
        return weights, f"tensor {KEY.format('A')}/B.weight: delta shape [128, 96] != model weight"
    if kind == "rank_over_limit":
        return weights, "has rank 4 > the server's max AV rank 2"
    if kind == "nan":
        edit_tensors(weights, lambda t: t[KEY.format("B")].__setitem__((0, 0), float("nan")))
        return weights, f"tensor {KEY.format('B')}: contains NaN or Inf"
    if kind == "inf":
        edit_tensors(weights, lambda t: t[KEY.format("A")].__setitem__((1, 2), float("-inf")))
        return weights, f"tensor {KEY.format('A')}: contains NaN or Inf"
    if kind == "missing_b":
        edit_tensors(weights, lambda t: t.pop(KEY.format("B")))
        return weights, f"tensor {KEY.format('B')} is missing"
    if kind == "int_dtype":
        edit_tensors(weights, lambda t: t.__setitem__(KEY.format("A"), torch.ones(4, 128, dtype=torch.int32)))
        return weights, "expected a 2-D float tensor"
    if kind == "not_lora_key":
        edit_tensors(weights, lambda t: t.__setitem__("model.embed_tokens.weight", torch.ones(2, 2)))
        return weights, "tensor model.embed_tokens.weight: not a LoRA weight"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        return weights, "not a readable safetensors file"
    if kind == "pickle_only":
        weights.unlink()
        (av / "adapter_model.bin").write_bytes(b"\x80\x04 would be unpickled")
        return av / "adapter_model.bin", "pickle weights are refused"
    if kind == "no_weights":
        weights.unlink()
        return weights, "missing"
    if kind == "no_adapter_config":
        (av / "adapter_config.json").unlink()
        return av / "adapter_config.json", "missing (every library sub-directory must be a PEFT LoRA adapter)"
    if kind == "bad_json":
        (av / "adapter_config.json").write_text("{not json")
        return av / "adapter_config.json", "unreadable JSON"
    if kind == "dora":
        cfg = json.loads((av / "adapter_config.json").read_text())
        (av / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
        return av / "adapter_config.json", "DoRA adapters cannot be served"
    if kind == "bad_name":
        meta = json.loads((av / "av.json").read_text())
        (av / "av.json").write_text(json.dumps({**meta, "name": "../x"}))
        return av / "av.json", "AV name '../x' must be"
    if kind == "duplicate_name":
        meta = json.loads((av / "av.json").read_text())
        (av / "av.json").write_text(json.dumps({**meta, "name": "beta"}))
        return lib / "beta", "AV name 'beta' is also used by"
    if kind == "malformed_av_json":
        (av / "av.json").write_text(json.dumps({"name": "alpha"}))
        return av / "av.json", "malformed av.json"
    if kind == "other_base":
        meta = json.loads((av / "av.json").read_text())
        meta["base"]["arch"]["hidden_size"] = 4096
        meta["base"]["arch_hash"] = "0" * 64
        (av / "av.json").write_text(json.dumps(meta))
        return av / "av.json", "AV 'alpha' is incompatible with the served model: different architecture"
    if kind == "symlink_out":
        outside = lib.parent / "outside"
        shutil.move(str(av), str(outside))
        (lib / "alpha").symlink_to(outside)
        return lib / "alpha", "is a link out of the AV library"
    raise AssertionError(kind)


KINDS = [
    "wrong_shape", "rank_over_limit", "nan", "inf", "missing_b", "int_dtype", "not_lora_key", "truncated",
    "pickle_only", "no_weights", "no_adapter_config", "bad_json", "dora", "bad_name", "duplicate_name",
    "malformed_av_json", "other_base", "symlink_out",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_av_is_refused_in_one_line_naming_the_file(demo, library, kind):
    model, _ = demo
    path, message = broken(kind, library)
    limits = config(max_rank=2) if kind == "rank_over_limit" else config()
    with pytest.raises(AVLibraryError) as excinfo:
        load_library(str(library), limits, model_dir=str(model))
    text = str(excinfo.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: ")
    assert message in text


def test_empty_or_missing_library(tmp_path):
    with pytest.raises(AVLibraryError, match="holds no adapters"):
        load_library(str(tmp_path), config())
    with pytest.raises(AVLibraryError, match="directory not found"):
        load_library(str(tmp_path / "nope"), config())


@pytest.mark.parametrize("kind", [k for k in KINDS if k not in ("bad_name", "duplicate_name", "symlink_out")])
def test_an_av_loaded_at_runtime_is_validated_as_at_start(demo, library, kind):
    """``load_av`` (POST /v1/av/load) refuses each bad AV with the message the startup scan gives."""
    model, _ = demo
    path, message = broken(kind, library)
    limits = config(max_rank=2) if kind == "rank_over_limit" else config()
    with pytest.raises(AVLibraryError) as excinfo:
        load_av(str(library / "alpha"), "alpha", limits, model_dir=str(model))
    if kind == "no_adapter_config":  # the runtime message says what an AV is, not what a library holds
        message = "missing (an AV is a PEFT LoRA adapter directory)"
    text = str(excinfo.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and message in text


def test_an_av_loaded_at_runtime_takes_its_name_from_the_request(demo, library, tmp_path):
    model, _ = demo
    loaded = load_av(str(library / "alpha"), "alpha_v2", config(), model_dir=str(model))
    assert (loaded.name, loaded.rank, len(loaded.modules), loaded.compatibility) == ("alpha_v2", 4, 14, "same_base")
    with pytest.raises(AVLibraryError, match=r"AV name '\.\./x' must be 1-64 characters"):
        load_av(str(library / "alpha"), "../x", config(), model_dir=str(model))
    outside = tmp_path / "outside.safetensors"
    shutil.move(str(library / "alpha" / "adapter_model.safetensors"), str(outside))
    (library / "alpha" / "adapter_model.safetensors").symlink_to(outside)
    with pytest.raises(AVLibraryError, match="adapter_model.safetensors: is a link out of the AV library"):
        load_av(str(library / "alpha"), "alpha", config(), model_dir=str(model))
