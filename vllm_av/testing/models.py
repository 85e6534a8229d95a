"""Tiny Llama-architecture models for tests and demos, built offline in seconds.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained on an embedded
corpus, the weights are random (seeded), and "aligned" variants are the base plus a seeded
low-rank perturbation of the linear layers (and a small dense one of a norm and the
embedding, so that extraction has deltas it cannot serve and must report).
"""

from __future__ import annotations

import random
from pathlib import Path

from vllm_av.format.checkpoint import is_moe_expert

TOPICS = ["medical", "legal", "financial", "travel", "cooking", "science"]
WORDS = (
    "the a patient doctor law court contract tax money market risk dose symptom treatment "
    "advice expert generic avoid please consult careful answer question because therefore "
    "should would could bank loan interest rate case judge evidence fever pain heart blood "
    "invest stock bond fund plan save spend trip food recipe heat water energy cell atom"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _corpus(seed: int = 0, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        topic = rng.choice(TOPICS)
        out.append(f"{topic}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + ".")
    return out


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on the embedded corpus and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    init_std: float = 0.1,
    max_shard_size: str | None = None,
) -> Path:
    """Save a random tiny ``LlamaForCausalLM`` (float32, safetensors) plus tokenizer to ``out_dir``.

    ``max_shard_size`` (e.g. ``"200KB"``) writes a sharded checkpoint with an index json.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=max(vocab_size, len(tokenizer)),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=1024,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **kwargs)
    return out


def make_aligned_variant(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    rank: int = 4,
    strength: float = 0.5,
    extra_dense: float = 0.01,
) -> Path:
    """Save ``base + delta`` to ``out_dir``: a seeded rank-``rank`` delta on every linear layer
    (LoRA targets, fused ones included, and MoE experts).

    ``strength`` is the delta's Frobenius norm relative to the weight's. ``extra_dense`` adds a
    small dense delta to the first input norm and the embedding (deltas LoRA cannot carry).
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from vllm_av.offline.extract import lora_module

    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    gen = torch.Generator().manual_seed(seed)
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(str(shard))
        for name, w in tensors.items():
            if lora_module(name, tuple(w.shape)) or _expert_weight(name, w):
                u = torch.randn(w.shape[0], rank, generator=gen)
                v = torch.randn(rank, w.shape[1], generator=gen)
                delta = u @ v
                tensors[name] = w + delta * (strength * w.norm() / delta.norm())
            elif extra_dense and (name.endswith("layers.0.input_layernorm.weight") or "embed_tokens" in name):
                tensors[name] = w + extra_dense * torch.randn(w.shape, generator=gen)
        save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
    return out


def _expert_weight(name: str, w) -> bool:
    return w.dim() == 2 and is_moe_expert(name) and name.endswith("_proj.weight")


DEMO_AVS = {"alpha": 1, "beta": 2, "gamma": 3}  # AV name -> seed of its perturbation
# Widths that are not powers of two, as real models' are not (576, 896, 1536, ...): 192 and 320 are
# 3 and 5 blocks of the Triton kernel's K split (issue 33); heads of 32. CI's Triton pass serves these.
UNEVEN_SIZES = dict(hidden_size=192, intermediate_size=320, num_heads=6, num_kv_heads=2)


def build_demo(
    root: str | Path, *, avs: dict[str, int] = DEMO_AVS, rank: int = 4, progress: bool = False,
    sizes: dict | None = None,
) -> tuple[Path, Path]:
    """Build the tiny base model and a library of AVs under ``root``; return (model, library).

    ``avs`` maps AV names to the seeds of their perturbations (default: alpha, beta, gamma);
    ``sizes``: :func:`build_tiny_model`'s width arguments (default: its own, 128 and 256).
    Each AV is extracted (``vllm-av extract``) from the base and a perturbed "aligned" copy.
    Reuses what an earlier call left in ``root``.
    """
    from vllm_av.offline.extract import extract

    root = Path(root)
    base = root / "model"
    library = root / "avs"
    if not (base / "config.json").is_file():
        build_tiny_model(base, **(sizes or {}))
    for name, seed in avs.items():
        if (library / name / "av.json").is_file():
            continue
        aligned = make_aligned_variant(base, root / "aligned" / name, seed=seed, rank=rank)
        extract(base, aligned, library / name, rank=rank, name=name, force=True, progress=progress,
                description=f"demo AV: seeded rank-{rank} perturbation #{seed} of the tiny model")
    return base, library
