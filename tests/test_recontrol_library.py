"""The value-function library and the request setting, without vLLM: every refusal names the file
(and tensor) or the field, and the closed-form steering matches the reference decoder."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from vllm_av.serving.settings.config import AVConfig
from vllm_av.serving.library.avs import AVLibraryError
from vllm_av.serving.front.recontrol import RecontrolError, parse_recontrol
from vllm_av.serving.library.values import load_value_library
from vllm_av.testing.values import build_value_library


@pytest.fixture
def values(demo, tmp_path):
    return build_value_library(demo[0], tmp_path / "values")


def load(values, model, **settings):
    return load_value_library(AVConfig(path="-", recontrol_path=str(values), **settings), str(model))


def test_library_lists_value_functions_by_name(demo, values):
    entries = load(values, demo[0])
    assert [(e.name, e.layers, e.width, e.compatibility) for e in entries] == [
        ("brief", 3, 32, "same_base"), ("helpful", 2, 64, "same_base")]
    assert entries[1].summary()["hidden_size"] == 128


def test_nan_weight_is_refused_naming_file_and_tensor(demo, values):
    from safetensors.torch import load_file, save_file

    weights = values / "helpful" / "value.safetensors"
    tensors = load_file(str(weights))
    tensors["linears.0.weight"][3, 4] = float("inf")
    save_file(tensors, str(weights))
    with pytest.raises(AVLibraryError, match=rf"^{weights}: tensor linears.0.weight: contains NaN or Inf$"):
        load(values, demo[0])


def test_other_hidden_size_is_refused(demo, tmp_path):
    from vllm_av.recontrol.value import ValueMLP
    from vllm_av.recontrol.valuefile import save_value_function

    save_value_function(tmp_path / "v" / "small", ValueMLP(64, 16), {"name": "small"})
    with pytest.raises(AVLibraryError, match="hidden_size 64 != the served model's hidden size 128"):
        load(tmp_path / "v", demo[0])


def test_pickle_weights_are_never_loaded(demo, values):
    (values / "helpful" / "value.safetensors").rename(values / "helpful" / "value.bin")
    with pytest.raises(AVLibraryError, match="value.bin is a pickle file, which is never loaded"):
        load(values, demo[0])


def test_link_out_of_the_library_is_refused(demo, values, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(values / "brief", outside)
    (values / "brief").symlink_to(outside)
    with pytest.raises(AVLibraryError, match="is a link out of the value-function library"):
        load(values, demo[0])


def test_other_architecture_is_incompatible(demo, values):
    meta_file = values / "brief" / "value.json"
    meta = json.loads(meta_file.read_text())
    meta["base"]["arch"]["num_hidden_layers"] = 7
    meta["base"]["arch_hash"] = "0" * len(meta["base"]["arch_hash"])
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(AVLibraryError, match=r"brief.*incompatible with the served model: different architecture"):
        load(values, demo[0])


def test_wrong_shape_and_format(demo, values):
    meta_file = values / "brief" / "value.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "width": 33}))
    with pytest.raises(AVLibraryError, match=r"tensor linears.0.(weight|bias): expected float \[33"):
        load(values, demo[0])
    meta_file.write_text(json.dumps({**meta, "format": "other/1"}))
    with pytest.raises(AVLibraryError, match="format 'other/1' is not 'vllm-av-value/1'"):
        load(values, demo[0])


def test_lenient_serves_the_rest(demo, values, caplog):
    (values / "brief" / "value.json").write_text("{")
    with caplog.at_level(logging.WARNING, logger="vllm.av"):
        entries = load(values, demo[0], lenient=True)
    assert [e.name for e in entries] == ["helpful"]
    assert "value function refused (lenient loading)" in caplog.text
    with pytest.raises(AVLibraryError, match="unreadable JSON"):
        load(values, demo[0])


CONFIG = AVConfig(path="-", recontrol_max_steps=20, recontrol_max_alpha=2.0)


@pytest.mark.parametrize("extra, setting", [
    ({}, None),
    ({"av": "a:1"}, None),
    ({"recontrol": "v", "recontrol_alpha": 0.5, "recontrol_steps": 3}, ("v", 0.5, 3)),
    ({"recontrol": "v", "recontrol_alpha": -2, "recontrol_steps": 3.0}, ("v", -2.0, 3)),
    ({"recontrol": {"value": "v", "alpha": 1, "steps": 20}}, ("v", 1.0, 20)),
    ({"recontrol": ["v", 1.5, 2]}, ("v", 1.5, 2)),
    ({"recontrol": "v", "recontrol_alpha": 0, "recontrol_steps": 3}, None),
    ({"recontrol": "v", "recontrol_alpha": 1, "recontrol_steps": 0}, None),
])
def test_settings(extra, setting):
    assert parse_recontrol(extra, {"v"}, CONFIG) == setting


@pytest.mark.parametrize("extra, message", [
    ({"recontrol": "w", "recontrol_alpha": 1, "recontrol_steps": 1}, r"unknown value function 'w' \(served: v\)"),
    ({"recontrol": 3, "recontrol_alpha": 1, "recontrol_steps": 1}, "must name a value function"),
    ({"recontrol": "v", "recontrol_alpha": True, "recontrol_steps": 1}, "must be a number"),
    ({"recontrol": "v", "recontrol_alpha": float("nan"), "recontrol_steps": 1}, "at most 2.0"),
    ({"recontrol": "v", "recontrol_alpha": 1, "recontrol_steps": "3"}, "whole number"),
    ({"recontrol": ["v", 1]}, r"\[value, alpha, steps\]"),
    ({"recontrol": {"value": "v", "alpha": 1, "steps": 1}, "recontrol_steps": 1}, "not both"),
])
def test_bad_settings(extra, message):
    with pytest.raises(RecontrolError, match=message):
        parse_recontrol(extra, {"v"}, CONFIG)


def test_served_steering_equals_the_reference_sgd(demo, values):
    """The worker's grouped closed-form steps (mixed α, n, two value functions, unsteered rows
    untouched) against the reference decoder's autograd SGD, row by row."""
    from vllm_av.recontrol.reference import steered_state
    from vllm_av.recontrol.valuefile import load_value_function
    from vllm_av.serving.worker.steering import Steering, steer_rows

    class Request:
        def __init__(self, setting):
            self.sampling_params = type("P", (), {"extra_args": {"recontrol": setting} if setting else None})()

    funcs = {name: load_value_function(values / name) for name in ("brief", "helpful")}
    settings = [None, ["helpful", 0.5, 3], ["brief", -1.0, 7], ["helpful", 2.0, 1], None, ["brief", 0.25, 7]]
    requests = {f"r{i}": Request(s) for i, s in enumerate(settings)}
    steering = Steering(funcs, torch.device("cpu"), max_live_requests=8)
    steering.prepare(list(requests), requests)
    hidden = torch.randn(len(settings), 128)
    steered = steer_rows(steering.take(len(settings)), hidden)
    assert steering.take(len(settings)) is None  # taken once
    for row, setting in enumerate(settings):
        if setting is None:
            assert torch.equal(steered[row], hidden[row])
        else:
            want = steered_state(funcs[setting[0]], hidden[row: row + 1], setting[1], setting[2])[0]
            torch.testing.assert_close(steered[row], want, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(steered[row], hidden[row])
