"""Request mix parsing: accepted forms, canonical form, and every rejection with its message."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_av.serving.settings.config import AVConfig, AVConfigError
from vllm_av.serving.front.mix import MixError, mix_to_str, parse_mix

NAMES = {"medical_expert", "legal_generic", "fin.v2", "a-b"}
CONFIG = AVConfig(path="/lib", max_per_request=3, max_abs_scale=2.0, max_name_length=16)


@pytest.mark.parametrize(
    "spec",
    [
        "medical_expert:0.8,legal_generic:-0.3",
        " legal_generic : -0.3 , medical_expert:+.8 ",
        {"medical_expert": 0.8, "legal_generic": -0.3},
        [["legal_generic", -0.3], ["medical_expert", 0.8]],
        "medical_expert:8e-1,legal_generic:-3E-1,fin.v2:0",
    ],
)
def test_equal_mixes_have_one_canonical_form(spec):
    assert parse_mix(spec, NAMES, CONFIG) == (("legal_generic", -0.3), ("medical_expert", 0.8))


def test_zero_scales_drop_out_and_all_zero_is_the_base_model():
    assert parse_mix("a-b:0,fin.v2:-0.0", NAMES, CONFIG) == ()
    assert parse_mix({"a-b": 2}, NAMES, CONFIG) == (("a-b", 2.0),)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope:1", "unknown av 'nope'"),
        ("medical_expert", "must look like name:scale"),
        ("medical_expert=1", "must look like name:scale"),
        ("medical_expert:", "not a number"),
        ("medical_expert:nan", "not a number"),
        ("medical_expert:NaN", "not a number"),
        ("medical_expert:inf", "not a number"),
        ("medical_expert:-Infinity", "not a number"),
        ("medical_expert:1_0", "not a number"),
        ("medical_expert:0x1", "not a number"),
        ("medical_expert:1e400", "must be finite"),
        ({"medical_expert": float("nan")}, "must be finite"),
        ({"medical_expert": float("-inf")}, "must be finite"),
        ({"medical_expert": 10**400}, "must be finite"),
        ({"medical_expert": True}, "must be a number"),
        ({"medical_expert": None}, "must be a number"),
        ({"medical_expert": [1]}, "must be a number"),
        ("medical_expert:2.5", "exceeds this server's limit |scale| <= 2.0"),
        ("medical_expert:-2.01", "exceeds"),
        ("medical_expert:1,medical_expert:1", "appears more than once"),
        ("a-b:1,fin.v2:1,legal_generic:1,medical_expert:1", "at most 3"),
        ("", "empty"),
        ("   ", "empty"),
        (":1", "non-empty"),
        ("médical:1", "characters outside"),
        ("../x:1", "characters outside"),
        ("x" * 17 + ":1", "longer than 16"),
        ("a:1," * 10000, "too long"),
        ({1: 0.5}, "non-empty string"),
        ([["a-b", 1, 2]], "[name, scale] pairs"),
        (3, "must be a string like"),
        (None, "must be a string like"),
    ],
)
def test_bad_mix_is_rejected_with_a_message_naming_the_problem(spec, message):
    with pytest.raises(MixError, match=None) as excinfo:
        parse_mix(spec, NAMES, CONFIG)
    assert message in str(excinfo.value)


scales = st.floats(min_value=-2.0, max_value=2.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(NAMES)), scales, max_size=3))
def test_canonical_text_parses_back_to_the_same_mix(mix):
    canonical = parse_mix(mix, NAMES, CONFIG)
    assert parse_mix(mix_to_str(canonical) or "a-b:0", NAMES, CONFIG) == canonical
    assert all(math.isfinite(s) and s != 0 for _, s in canonical)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.dictionaries(st.text(max_size=8), st.floats() | st.text(max_size=5), max_size=5)))
def test_arbitrary_input_parses_or_raises_mix_error(spec):
    try:
        parse_mix(spec, NAMES, CONFIG)
    except MixError:
        pass


@pytest.mark.parametrize(
    "raw, message",
    [
        ({}, "path"),
        ({"path": "/x", "max_per_request": 0}, "max_per_request"),
        ({"path": "/x", "max_abs_scale": float("inf")}, "max_abs_scale"),
        ({"path": "/x", "max_rank": "8"}, "max_rank"),
        ({"path": "/x", "colour": 1}, "unknown av setting"),
        ("path=/x", "must be an object"),
    ],
)
def test_bad_server_settings(raw, message):
    with pytest.raises(AVConfigError, match=message):
        AVConfig.from_dict(raw)
