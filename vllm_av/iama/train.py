"""Non-linear GRPO with TRL's ``GRPOTrainer``: the policy trained for the inference-time transform
it will be served with (IAMA), or standard GRPO with every transform ``identity``.

Criteria are TRL reward functions. Built in: ``length:L:SCALE``, the paper's length reward
``−(|len − L| / SCALE)²`` in completion tokens. Any other ``module:function`` is imported.
"""

from __future__ import annotations

import importlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vllm_av.iama.reward import IAMAReward
from vllm_av.iama.variation import Transform


def length_reward(target: int, scale: float) -> Callable:
    """``−(|len − target| / scale)²`` per completion, ``len`` in tokens up to the end-of-sequence token."""
    def reward(prompts, completions, completion_ids=None, **_):
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(c.split()) for c in completions]
        return [-((abs(n - target) / scale) ** 2) for n in lengths]

    reward.__name__ = f"length_{target}"
    return reward


def criterion(spec: str) -> Callable:
    """A criterion from its spec: ``length:L:SCALE`` or ``module:function`` (a TRL reward function)."""
    parts = spec.split(":")
    if parts[0] == "length":
        try:
            target, scale = int(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise ValueError(f"criterion {spec!r}: expected length:L:SCALE, e.g. length:12:8") from None
        return length_reward(target, scale)
    if len(parts) != 2:
        raise ValueError(f"criterion {spec!r}: expected length:L:SCALE or module:function")
    try:
        return getattr(importlib.import_module(parts[0]), parts[1])
    except (ImportError, AttributeError) as e:
        raise ValueError(f"criterion {spec!r}: cannot import it ({e})") from None


def freeze_all_but_linear(model) -> int:
    """Train only the decoder's linear layers (embeddings, norms and lm_head frozen), so the trained
    policy is exactly an AV (``vllm-av extract`` drops nothing); returns the trainable parameter count."""
    for name, p in model.named_parameters():
        p.requires_grad = name.endswith("_proj.weight")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(model_dir: str | Path, prompts: list[str], criteria: list[Callable], transforms: list[Transform],
          weights: list[float], out_dir: str | Path, *, g: str = "sum", steps: int = 100, lr: float = 1e-3,
          num_generations: int = 8, prompts_per_step: int = 4, max_completion_length: int = 40, beta: float = 0.0,
          seed: int = 0, threads: int = 1, progress: bool = True) -> dict:
    """GRPO on ``prompts`` with IAMA's reward; saves the policy to ``out_dir`` and returns the record."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trainable = freeze_all_but_linear(model)
    reward = IAMAReward(criteria, transforms, weights, group_size=num_generations, g=g)
    scratch = tempfile.TemporaryDirectory(prefix="vllm-av-grpo-")
    config = GRPOConfig(output_dir=scratch.name, max_steps=steps, learning_rate=lr, beta=beta,
                        num_generations=num_generations, per_device_train_batch_size=num_generations * prompts_per_step,
                        max_completion_length=max_completion_length, temperature=1.0, logging_steps=max(1, steps // 20),
                        report_to=[], save_strategy="no", use_cpu=True, seed=seed, disable_tqdm=not progress,
                        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    scratch.cleanup()
    out = Path(out_dir)
    trainer.model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    logs = [h for h in trainer.state.log_history if "reward" in h]
    record = {"trainer": "trl.GRPOTrainer", "trl_version": __import__("trl").__version__, "steps": steps, "lr": lr,
              "beta": beta, "num_generations": num_generations, "prompts_per_step": prompts_per_step,
              "transforms": [t.__dict__ for t in transforms], "weights": list(weights), "g": g,
              "trainable_parameters": trainable, "seconds": seconds,
              "reward_log": [{"step": h.get("step"), "reward": h.get("reward"),
                              "completion_length": h.get("completions/mean_length")} for h in logs]}
    (out / "iama_train.json").write_text(json.dumps(record, indent=1) + "\n")
    return record
