"""Tokenizer, tiny Llama trained from scratch, and a compact DPO (full fine-tuning).

Everything is float32 and deterministic for a given seed and thread count. Only the response
tokens are trained on. DPO updates every linear layer of the transformer (the weights an AV can
carry) and keeps the embedding, the norms and the lm_head frozen, so ``extract`` drops nothing
and the full-rank AV *is* the aligned model's delta.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D

SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]


@dataclass
class ModelConfig:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 2  # head_dim 32: vLLM-CPU attention has no kernel for head_dim 16
    kv_heads: int = 1
    vocab: int = 512


def build_tokenizer(out_dir: Path, vocab: int = 512):
    """Byte-level BPE trained on the synthetic corpus, saved with ``save_pretrained`` (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vllm_av.testing.models import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(D.corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0], eos_token=SPECIAL[0],
                                   unk_token=SPECIAL[0], pad_token=SPECIAL[0])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def new_model(tokenizer, cfg: ModelConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=256, initializer_range=0.05, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(torch.float32)


def save(model, tokenizer, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@dataclass
class Batch:
    ids: torch.Tensor  # [B, L] right-padded
    mask: torch.Tensor  # [B, L] attention mask
    target: torch.Tensor  # [B, L] 1 where the token at this position is a response token


def encode(tokenizer, pairs: list[tuple[str, str]]) -> Batch:
    """Right-padded ``prompt + response + eos`` for each (prompt, response)."""
    seqs, targets = [], []
    for prompt, response in pairs:
        p = tokenizer(prompt).input_ids
        r = tokenizer(response).input_ids + [tokenizer.eos_token_id]
        seqs.append(p + r)
        targets.append([0] * len(p) + [1] * len(r))
    length = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (length - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
    target = torch.tensor([t + [0] * (length - len(t)) for t in targets])
    return Batch(ids, mask, target)


def sequence_logprobs(model, batch: Batch, rows=None) -> torch.Tensor:
    """Sum of log p(response tokens | prefix) per row."""
    ids, mask, target = (batch.ids, batch.mask, batch.target) if rows is None else (
        batch.ids[rows], batch.mask[rows], batch.target[rows])
    length = int(mask.sum(-1).max())  # trim the padding every row of this batch has
    ids, mask, target = ids[:, :length], mask[:, :length], target[:, :length]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * target[:, 1:]).sum(-1)


def pretrain_pairs(train: dict[str, list[D.Query]], instruction_weight: float = 0.5):
    """(prompt, response, weight): every level of every query, weighted by its persona's propensity,
    plus the level-instructed prompts (the prompt-engineering baseline's format)."""
    rows = []
    for d in D.DOMAINS:
        for q in train[d]:
            for level, name in enumerate(D.LEVELS):
                rows.append((q.prompt(), q.responses[level], D.PROPENSITY[q.persona][level]))
                rows.append((q.prompt(D.LEVEL_INSTRUCTIONS[name]), q.responses[level], instruction_weight))
    return rows


def pretrain(tokenizer, train, cfg: ModelConfig, *, steps: int, batch_size: int = 64, lr: float = 3e-3,
             seed: int = 0, log=print):
    """Train a tiny Llama from scratch on all levels (propensity-weighted response NLL)."""
    rows = pretrain_pairs(train)
    batch = encode(tokenizer, [(p, r) for p, r, _ in rows])
    weight = torch.tensor([w for _, _, w in rows])
    model = new_model(tokenizer, cfg, seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:  # warmup + cosine
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows_i = torch.randint(len(rows), (batch_size,), generator=gen)
        ntok = batch.target[rows_i, 1:].sum(-1).clamp(min=1)
        nll = -sequence_logprobs(model, batch, rows_i) / ntok
        loss = (nll * weight[rows_i]).sum() / weight[rows_i].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"  pretrain step {step:4d}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f}s)")
    return model.eval()


def trainable(name: str) -> bool:
    """DPO trains the linear layers only (the deltas an AV carries)."""
    return name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dpo_pairs(queries: list[D.Query], level: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): the level's response preferred over each other level's."""
    return [(q.prompt(), q.responses[level], q.responses[other])
            for q in queries for other in range(len(D.LEVELS)) if other != level]


def token_logprobs(model, batch: Batch, rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax over the vocabulary at every response position, and the response mask."""
    ids, mask, target = batch.ids[rows], batch.mask[rows], batch.target[rows]
    length = int(mask.sum(-1).max())
    logits = model(input_ids=ids[:, :length], attention_mask=mask[:, :length]).logits[:, :-1].float()
    return torch.log_softmax(logits, -1), target[:, 1:length]


def dpo(base, tokenizer, pairs: list[tuple[str, str, str]], *, max_steps: int, batch_size: int = 32,
        lr: float = 3e-4, beta: float = 0.1, target_margin: float = 30.0, retain=None, retain_weight: float = 1.0,
        seed: int = 0):
    """Compact DPO (Rafailov et al. 2023): loss −log σ(β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]).

    Stops once the batch's mean implicit-reward margin (in nats, before β) reaches ``target_margin``
    — Adam keeps taking full-size steps on a saturated DPO loss, which over-optimises a tiny
    model into degenerate text. ``retain``: (prompt, response) pairs of the *other* domains on
    which a token-level KL(π_ref ‖ π) term keeps the policy at the reference (domain-specific AVs).
    Returns the fine-tuned copy of ``base`` and statistics.
    """
    import copy

    chosen = encode(tokenizer, [(p, c) for p, c, _ in pairs])
    rejected = encode(tokenizer, [(p, r) for p, _, r in pairs])
    with torch.no_grad():
        ref_c, ref_r = sequence_logprobs(base, chosen), sequence_logprobs(base, rejected)
    keep = encode(tokenizer, retain) if retain else None
    model = copy.deepcopy(base).train()
    for n, p in model.named_parameters():
        p.requires_grad_(trainable(n))
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if trainable(n)], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    stats = {}
    for step in range(max_steps):
        rows = torch.randint(len(pairs), (batch_size,), generator=gen)
        margin = (sequence_logprobs(model, chosen, rows) - ref_c[rows]) - (sequence_logprobs(model, rejected, rows) - ref_r[rows])
        loss = -F.logsigmoid(beta * margin).mean()
        kl = torch.zeros(())
        if keep is not None:
            krows = torch.randint(len(retain), (batch_size // 2,), generator=gen)
            with torch.no_grad():
                ref_lp, _ = token_logprobs(base, keep, krows)
            lp, tmask = token_logprobs(model, keep, krows)
            kl = ((ref_lp.exp() * (ref_lp - lp)).sum(-1) * tmask).sum() / tmask.sum()
            loss = loss + retain_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = {"steps": step + 1, "loss": loss.item(), "margin": margin.mean().item(),
                 "acc": (margin > 0).float().mean().item(), "retain_kl": kl.item()}
        if margin.mean().item() >= target_margin:
            break
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval(), stats


def retain_pairs(queries: list[D.Query], count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (prompt, response) pairs from ``queries`` at random levels (seeded)."""
    import random

    rng = random.Random(seed)
    chosen = rng.sample(queries, min(count, len(queries)))
    return [(q.prompt(), q.responses[rng.randrange(3)]) for q in chosen]


@torch.no_grad()
def level_probs(model, tokenizer, queries: list[D.Query], instruction: str | None = None) -> torch.Tensor:
    """Next-token probability of each level's first response token after the prompt, [N, 3]
    (every template of one (domain, level) starts with the same token)."""
    prompts = [tokenizer(q.prompt(instruction)).input_ids for q in queries]
    first = torch.tensor([[tokenizer(r).input_ids[0] for r in q.responses] for q in queries])
    length = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    return torch.softmax(logits, -1).gather(-1, first)


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, batch_size: int = 64) -> list[str]:
    """Greedy completions with transformers (left-padded batches), decoded."""
    out = []
    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
        seq = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(seq[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return out
