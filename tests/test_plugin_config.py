"""Engine configurations the plugin refuses with AV on, each with a message that names the fix."""

import pytest

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def demo_paths():
    from vllm_av.cli.demo import DEMO_DATA

    return DEMO_DATA / "model", DEMO_DATA / "avs"


def engine_config(demo_paths, av=None, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_av.serving.plugin

    vllm_av.serving.plugin.register()
    model, library = demo_paths
    args = EngineArgs(model=str(model), dtype="float32", max_model_len=256, enforce_eager=True,
                      additional_config={"av": {"path": str(library), **(av or {})}}, **kwargs)
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


def test_lora_wraps_only_the_library_modules_unless_the_user_enabled_lora(demo_paths):
    """With LoRA on only for the AVs, vLLM wraps the module kinds the library uses (not lm_head, the
    embeddings or MoE experts); with the user's own --enable-lora, vLLM's choice is left alone."""
    assert engine_config(demo_paths).lora_config.target_modules == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert engine_config(demo_paths, enable_lora=True, max_lora_rank=8).lora_config.target_modules is None
    # an AV loaded at runtime may touch any linear module: vLLM's choice (every LoRA-capable layer)
    assert engine_config(demo_paths, av={"allow_runtime_updates": True}).lora_config.target_modules is None


def test_the_compile_cache_key_covers_the_runtime_slot_layout(demo_paths):
    """Runtime updates change every layer's AV buffers (slots x max rank): a graph compiled for one
    layout must never be reused for another."""
    keys = [engine_config(demo_paths, av=av).compute_hash() for av in (
        {}, {"allow_runtime_updates": True}, {"allow_runtime_updates": True, "max_loaded": 12},
        {"allow_runtime_updates": True, "max_rank": 32})]
    assert len(set(keys)) == len(keys)


def test_an_av_module_no_lora_layer_carries_is_refused():
    from types import SimpleNamespace

    from vllm_av.serving.library import AVEntry
    from vllm_av.serving.worker.loading import refuse_unplaced

    entry = AVEntry("alpha", "/avs/alpha", 4, ("model.layers.0.self_attn.q_proj",))
    carried = SimpleNamespace(loras={"model.layers.0.self_attn.qkv_proj": object()})
    refuse_unplaced([entry], [carried], {"model.layers.0.self_attn.qkv_proj"})
    stray = SimpleNamespace(loras={"model.layers.0.self_attn.qkv_proj": object(), "model.layers.0.mlp.experts": object()})
    with pytest.raises(ValueError, match=r"AV 'alpha' \(/avs/alpha\): module model.layers.0.mlp.experts is not a linear layer"):
        refuse_unplaced([entry], [stray], {"model.layers.0.self_attn.qkv_proj"})


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
    ({}, {"data_parallel_size": 2, "av": {"allow_runtime_updates": True}},
     r"--av-allow-runtime-updates is not supported with data parallel \(--data-parallel-size 2\)"),
    ({}, {"av": {"allow_runtime_updates": True, "max_loaded": 2}},
     "--av-max-loaded 2 is below the library's 9 AVs"),
])
def test_unsupported_settings_are_refused(demo_paths, monkeypatch, env, kwargs, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        engine_config(demo_paths, **kwargs)


def test_runtime_updates_with_several_api_servers_are_refused_at_the_command_line(demo_paths):
    """Each API server would keep its own view of the library."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    import vllm_av.serving.plugin

    vllm_av.serving.plugin.register()
    model, library = demo_paths
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(model), "--enable-av", "--av-path", str(library), "--av-allow-runtime-updates"])
    args.api_server_count = 2
    with pytest.raises(SystemExit, match="--av-allow-runtime-updates needs one API server \\(got --api-server-count 2\\)"):
        AsyncEngineArgs.from_cli_args(args)
