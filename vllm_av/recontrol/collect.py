"""``vllm-av recontrol collect``: the base policy's greedy rollouts, their hidden states and rewards.

For each prompt the base model answers greedily (transformers, float32, left-padded batches); the
post-norm last-layer hidden state that produced each generated token is recorded (the input of
``lm_head`` at that step, the state RE-Control edits), and the finished answer is scored by the reward.
Shards ``shard-XXXXX.safetensors`` hold ``states [N, H]`` (every position of the shard's
trajectories, in order), ``lengths [B]`` and ``rewards [B]``; ``collect.json`` describes the run.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

from vllm_av.errors import AVError

DATA_FORMAT = "vllm-av-recontrol-data/1"
DATA_JSON = "collect.json"


class CollectError(AVError):
    """A collect input (reward, prompts, model) that cannot be used."""


def load_reward(spec: str):
    """The reward ``fn(prompts=[...], completions=[...]) -> list[float]`` named by ``spec``:
    ``module:function`` (TRL's reward-function convention) or a local directory holding a transformers
    sequence-classification reward model with one label (score: its logit on prompt + completion)."""
    path = Path(spec)
    if path.is_dir():
        return _reward_model(path)
    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise CollectError(f"reward {spec!r}: expected module:function or a reward-model directory")
    if os.getcwd() not in sys.path:  # a reward module beside the user's data, as `python -m` would find it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CollectError(f"reward {spec!r}: cannot import {module_name} ({exc})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise CollectError(f"reward {spec!r}: {module_name} has no function {function!r}")
    return fn


def _reward_model(path: Path):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "num_labels", None) != 1:
        raise CollectError(f"reward model {path}: num_labels is {config.num_labels}; a reward model has one label")
    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str], **_) -> list[float]:
        batch = tokenizer([p + c for p, c in zip(prompts, completions)], return_tensors="pt", padding=True)
        return model(**batch).logits[:, 0].tolist()

    return score


def _rollouts(model, ids: list[list[int]], max_new_tokens: int, eos: int | None, pad: int):
    """Greedy tokens and, per generated token, the post-norm state that produced it, for one batch."""
    import torch

    from vllm_av.recontrol.reference import left_padded

    input_ids, mask, positions = left_padded(ids, pad)
    past, states, tokens = None, [], []
    done = torch.zeros(len(ids), dtype=torch.bool)
    lengths = torch.zeros(len(ids), dtype=torch.long)
    for _ in range(max_new_tokens):
        out = model.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                          use_cache=True)
        past = out.past_key_values
        s = out.last_hidden_state[:, -1].float()
        token = model.lm_head(s).argmax(-1)
        states.append(s)
        tokens.append(token)
        lengths += (~done).long()
        if eos is not None:
            done |= token == eos
            if bool(done.all()):
                break
        input_ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(input_ids)], dim=1)
        positions = positions[:, -1:] + 1
    return torch.stack(states, 1), torch.stack(tokens, 1), lengths  # [B, T, H], [B, T], [B]


def collect(model_dir, prompts: list[str], reward: str, out_dir, max_new_tokens: int = 128, batch_size: int = 16,
            chat_template: bool = False, progress: bool = True) -> dict:
    """Roll out the base model on ``prompts``, record the states, score with ``reward``; return the summary."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_av.format.checkpoint import Checkpoint

    if not prompts:
        raise CollectError("no prompts to collect from")
    score = load_reward(reward)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    if chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples, total_states, all_rewards = [], 0, []
    bar = tqdm(total=len(texts), desc="collect", unit="prompt", disable=not progress)
    with torch.no_grad():
        for shard, first in enumerate(range(0, len(texts), batch_size)):
            batch = texts[first:first + batch_size]
            ids = [tokenizer(t, add_special_tokens=not chat_template).input_ids for t in batch]
            states, tokens, lengths = _rollouts(model, ids, max_new_tokens, eos, pad)
            if shard == 0:  # every recorded state must reproduce its token: catches an off-by-one
                replayed = model.lm_head(states).argmax(-1)
                valid = torch.arange(tokens.shape[1])[None] < lengths[:, None]
                if not bool((replayed == tokens)[valid].all()):
                    raise CollectError(f"{model_dir}: recorded hidden states do not reproduce the greedy tokens")
            completions = [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(tokens.tolist(), lengths)]
            rewards = [float(r) for r in score(prompts=batch, completions=completions)]
            if len(rewards) != len(batch):
                raise CollectError(f"reward {reward!r} returned {len(rewards)} scores for {len(batch)} completions")
            flat = torch.cat([s[:n] for s, n in zip(states, lengths)])
            save_file({"states": flat.contiguous(), "lengths": lengths, "rewards": torch.tensor(rewards)},
                      str(out_dir / f"shard-{shard:05d}.safetensors"))
            total_states += flat.shape[0]
            all_rewards += rewards
            examples += [{"prompt": p, "completion": c, "reward": r} for p, c, r in zip(batch, completions, rewards)]
            bar.update(len(batch))
            bar.set_postfix(mean_reward=f"{sum(all_rewards) / len(all_rewards):.3f}")
    bar.close()
    summary = {
        "format": DATA_FORMAT, "base": Checkpoint.open(model_dir).fingerprint().to_dict(), "model": str(model_dir),
        "reward": reward, "hidden_size": int(model.config.hidden_size), "trajectories": len(texts),
        "states": total_states, "max_new_tokens": max_new_tokens, "chat_template": chat_template,
        "seconds": time.perf_counter() - start, "mean_reward": sum(all_rewards) / len(all_rewards),
        "texts": examples[:5],
    }
    (out_dir / DATA_JSON).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
