"""Engine configurations the plugin refuses with AV on, each with a message that names the fix."""

import pytest

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def demo_paths():
    from vllm_av.cli.demo import DEMO_DATA

    return DEMO_DATA / "model", DEMO_DATA / "avs"


def engine_config(demo_paths, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_av.serving.plugin

    vllm_av.serving.plugin.register()
    model, library = demo_paths
    args = EngineArgs(model=str(model), dtype="float32", max_model_len=256, enforce_eager=True,
                      additional_config={"av": {"path": str(library)}}, **kwargs)
    return args.create_engine_config()


def test_av_engine_config_enables_lora_and_leaves_the_runner_to_vllm(demo_paths):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_av.serving import patch_points as points

    config = engine_config(demo_paths)
    assert config.lora_config is not None
    if points.USE_V2_MODEL_RUNNER_PROPERTY.applies_to(points.installed_series()):  # gone in 0.34 (MRV2 only)
        model, _ = demo_paths
        plain = EngineArgs(model=str(model), dtype="float32", max_model_len=256, enforce_eager=True)
        assert config.use_v2_model_runner == plain.create_engine_config().use_v2_model_runner


def test_the_compile_cache_key_covers_the_library_contents(demo_paths, tmp_path):
    """vLLM hashes additional_config into its compile-cache key; the plugin puts the library's digest there,
    so new weights under the same library path never reuse a graph compiled for the old ones."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vllm_av.serving import library
    from vllm_av.serving.config import av_config_from

    model, demo_library = demo_paths
    copy = shutil.copytree(demo_library, tmp_path / "avs")

    def digest():
        library._libraries.clear()  # as in a new start: the library is read again
        return av_config_from(engine_config((model, copy)).additional_config).library_digest

    first = digest()
    assert first and digest() == first
    weights = copy / "medical_expert" / "adapter_model.safetensors"
    save_file({k: 2 * v for k, v in load_file(weights).items()}, weights)
    assert digest() != first


@pytest.mark.parametrize("env, kwargs, message", [
    ({"VLLM_LORA_ENABLE_DUAL_STREAM": "1"}, {}, "VLLM_LORA_ENABLE_DUAL_STREAM is not supported with AV"),
    ({}, {"speculative_config": {"method": "eagle", "model": "x", "num_speculative_tokens": 2}},
     "speculative decoding with AV supports method 'ngram' only; got 'eagle'"),
    ({}, {"enable_lora": True, "fully_sharded_loras": True}, "--fully-sharded-loras is not supported with AV"),
])
def test_unsupported_settings_are_refused(demo_paths, monkeypatch, env, kwargs, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        engine_config(demo_paths, **kwargs)
