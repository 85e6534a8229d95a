"""The engine configuration with AV on: LoRA enabled to carry the AVs, unsupported settings refused."""

from __future__ import annotations

import dataclasses
import logging
import os

from vllm_av.serving import patch_points as points
from vllm_av.serving.config import CONFIG_KEY, av_config_from
from vllm_av.serving.library import library_for, local_model_dir

logger = logging.getLogger("vllm.av")

_runner_logged = False


def install() -> None:
    """When AV is on: enable LoRA (AVs ride on vLLM's LoRA layers), validate, force runner V1."""
    original_create = points.ENGINE_CREATE_CONFIG.get()

    def create_engine_config(self, *args, **kwargs):
        config = av_config_from(self.additional_config)
        if config is None:
            return original_create(self, *args, **kwargs)
        if self.fully_sharded_loras:
            raise ValueError("vllm-av: --fully-sharded-loras is not supported with AV")
        if os.environ.get("VLLM_LORA_ENABLE_DUAL_STREAM", "0").strip() not in ("", "0"):
            # its LoRA path (lora_linear_async) never reaches the layer hook: AVs would be skipped
            raise ValueError("vllm-av: VLLM_LORA_ENABLE_DUAL_STREAM is not supported with AV; unset it")
        if not self.enable_lora:
            # AVs ride on vLLM's LoRA layers but live in buffers of their own: keep vLLM's LoRA
            # slots minimal and skip its LoRA math (stock_lora=False).
            self.enable_lora = True
            self.max_loras = 1
            self.max_lora_rank = 8
            config = dataclasses.replace(config, stock_lora=False)
        self.additional_config = {**self.additional_config, CONFIG_KEY: config.to_dict()}
        vllm_config = original_create(self, *args, **kwargs)
        entries = library_for(config, local_model_dir(vllm_config.model_config.model))
        for entry in entries:
            logger.info("vllm-av: AV %-24s rank %-3d %3d modules  compatibility: %s",
                        entry.name, entry.rank, len(entry.modules), entry.compatibility)
        return vllm_config

    points.ENGINE_CREATE_CONFIG.replace(create_engine_config)

    original_v2 = points.USE_V2_MODEL_RUNNER.get()

    def use_v2_model_runner(self) -> bool:
        if av_config_from(self.additional_config) is None:
            return original_v2.fget(self)
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "").strip().lower() in ("1", "true"):
            raise ValueError("vllm-av: AV serving runs on the classic model runner; unset VLLM_USE_V2_MODEL_RUNNER")
        global _runner_logged
        if not _runner_logged:
            _runner_logged = True
            logger.info("vllm-av: AV enabled: using vLLM's classic (V1) model runner")
        return False

    points.USE_V2_MODEL_RUNNER.replace(property(use_v2_model_runner))
