"""Engine configurations the plugin refuses with AV on, each with a message that names the fix."""

from types import SimpleNamespace

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

    from vllm_av.serving.compat import patch_points as points
    from vllm_av.serving.compat.version import installed_series

    config = engine_config(demo_paths)
    assert config.lora_config is not None
    if points.USE_V2_MODEL_RUNNER_PROPERTY.applies_to(installed_series()):  # gone in 0.34 (MRV2 only)
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

    from vllm_av.serving.library.avs import AVEntry
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

    from vllm_av.serving.library import avs as library
    from vllm_av.serving.settings.config import av_config_from

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
     "speculative decoding with AV supports method 'ngram' or 'ngram_gpu' only; got 'eagle'"),
    ({}, {"enable_lora": True, "fully_sharded_loras": True}, "--fully-sharded-loras is not supported with AV"),
    ({}, {"data_parallel_size": 2, "av": {"allow_runtime_updates": True}},
     r"--av-allow-runtime-updates is not supported with data parallel \(--data-parallel-size 2\)"),
    ({}, {"av": {"allow_runtime_updates": True, "max_loaded": 2}},
     "--av-max-loaded 2 is below the library's 9 AVs"),
    # vLLM refuses these with LoRA on, telling the user to run "without enable_lora" (issue 33)
    ({}, {"prefill_context_parallel_size": 2}, r"prefill context parallel \(--prefill-context-parallel-size 2\) "
     "is not supported with AV"),
    ({}, {"enable_dbo": True}, r"dual-batch overlap \(--enable-dbo\) is not supported with AV"),
    ({}, {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1,
                                 "prompt_lookup_max": 2, "enable_adaptive_verification": True}},
     "adaptive verification is not supported with AV"),
    ({}, {"moe_backend": "deep_gemm_mega_moe"}, "--moe-backend deep_gemm_mega_moe is not supported with AV"),
    ({}, {"moe_backend": "batched_triton"}, "--moe-backend batched_triton is not supported with AV"),
    ({}, {"enable_expert_parallel": True, "all2all_backend": "deepep_low_latency"},
     "--all2all-backend deepep_low_latency with expert parallel is not supported with AV"),
])
def test_unsupported_settings_are_refused(demo_paths, monkeypatch, env, kwargs, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        engine_config(demo_paths, **kwargs)


def test_ngram_gpu_speculation_is_accepted(demo_paths):
    """vLLM 0.34 runs ``ngram_gpu`` with the same draft-model-free speculator as ``ngram`` (issue 33)."""
    from vllm_av.serving.engine.config import _refuse_unsupported
    from vllm_av.serving.settings.config import AVConfig

    args = SimpleNamespace(pipeline_parallel_size=1, fully_sharded_loras=False, data_parallel_size=1,
                           speculative_config={"method": "ngram_gpu", "num_speculative_tokens": 2})
    _refuse_unsupported(args, AVConfig(path=str(demo_paths[1])))


def test_a_model_without_lora_support_is_refused_in_av_words(tmp_path):
    """vLLM has no LoRA for StableLM (0.32); the start fails naming AV, not "run without enable_lora"."""
    from transformers import AutoModelForCausalLM, StableLmConfig

    from vllm_av.offline.extract import extract
    from vllm_av.testing.models import build_tokenizer, make_aligned_variant

    base = tmp_path / "stablelm"
    tokenizer = build_tokenizer(base)
    config = StableLmConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(base), safe_serialization=True)
    extract(base, make_aligned_variant(base, tmp_path / "aligned", seed=1), tmp_path / "avs" / "a", rank=2,
            progress=False)
    from vllm.model_executor.models.registry import ModelRegistry
    from vllm.model_executor.models import supports_lora

    if supports_lora(ModelRegistry._try_load_model_cls("StableLmForCausalLM")):
        pytest.skip("this vLLM has LoRA for StableLM")
    with pytest.raises(ValueError, match=r"vllm-av: StableLmForCausalLM \(.*\) cannot serve AVs: AVs ride on vLLM's "
                                         r"LoRA layers, which this model does not have in vLLM"):
        engine_config((base, tmp_path / "avs"))


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


def test_runtime_update_targets_are_the_linear_layers_and_never_moe_experts():
    """With runtime updates the worker sets vLLM's LoRA targets to the model's linear layers before
    vLLM wraps it (``linear_lora_targets``); MoE experts are not linear layers in vLLM, so they stay
    vLLM's own, with their full kernel choice."""
    import torch.nn as nn
    from vllm.model_executor.layers.fused_moe import MoERunner  # what vLLM wraps for expert LoRA
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_av.serving.worker.runner_hooks import linear_lora_targets

    assert not issubclass(MoERunner, LinearBase)

    class Linear(LinearBase):
        def __init__(self):
            nn.Module.__init__(self)

    mlp = nn.Module()
    mlp.gate, mlp.experts, mlp.shared_expert = Linear(), nn.Module(), nn.Module()
    mlp.shared_expert.gate_up_proj = Linear()
    layer = nn.Module()
    layer.self_attn, layer.mlp = nn.Module(), mlp
    layer.self_attn.qkv_proj = Linear()
    model = nn.Sequential(layer, nn.Embedding(4, 4))
    assert linear_lora_targets(model) == ["gate", "gate_up_proj", "qkv_proj"]
