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
    config = args.create_engine_config()
    config.use_v2_model_runner  # the runner choice is made (and checked) on first read
    return config


def test_av_engine_config_enables_lora_and_the_classic_runner(demo_paths):
    config = engine_config(demo_paths)
    assert config.lora_config is not None
    assert config.use_v2_model_runner is False


@pytest.mark.parametrize("env, kwargs, message", [
    ({"VLLM_LORA_ENABLE_DUAL_STREAM": "1"}, {}, "VLLM_LORA_ENABLE_DUAL_STREAM is not supported with AV"),
    ({"VLLM_USE_V2_MODEL_RUNNER": "1"}, {}, "unset VLLM_USE_V2_MODEL_RUNNER"),
    ({}, {"enable_lora": True, "fully_sharded_loras": True}, "--fully-sharded-loras is not supported with AV"),
])
def test_unsupported_settings_are_refused(demo_paths, monkeypatch, env, kwargs, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        engine_config(demo_paths, **kwargs)
