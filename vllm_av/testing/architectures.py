"""Random tiny checkpoints of the decoder families users serve, for the architecture matrix.

Each entry of :data:`ARCHITECTURES` is a transformers config class with the settings that give the
family its quirks (Qwen2's q/k/v biases, Qwen3's q/k norms, Gemma's soft-capping, scaled
embeddings and tied lm_head, Phi-3's fused ``qkv_proj``/``gate_up_proj``, a Qwen2-MoE's experts
and shared expert). :func:`build_arch_demo` saves one such model (float32, seeded, the embedded
byte-level tokenizer), perturbs it twice into "aligned" copies and extracts an AV from each:
``(model dir, library dir)`` ready for the oracle.
"""

from __future__ import annotations

from pathlib import Path

SIZES = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024)
# family -> (transformers config class, settings beside SIZES)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),  # q/k/v projections carry biases
    "qwen3": ("Qwen3Config", {"head_dim": 32}),  # RMS norms on q and k
    "gemma2": ("Gemma2Config", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16,
                                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16}),
    "phi3": ("Phi3Config", {}),  # fused qkv_proj and gate_up_proj in the checkpoint
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "shared_expert_intermediate_size": 128}),
}
AV_SEEDS = {"a": 1, "b": 2}
# SIZES with widths that are not powers of two (vllm_av.testing.models.UNEVEN_SIZES in config names)
UNEVEN_SIZES = dict(hidden_size=192, intermediate_size=320, num_attention_heads=6, num_key_value_heads=2)


def build_arch_model(family: str, out_dir: str | Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """Save a random tiny model of ``family`` (biases random too, so that they matter) to ``out_dir``;
    ``sizes`` overrides :data:`SIZES`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from vllm_av.testing.models import build_tokenizer

    class_name, settings = ARCHITECTURES[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer), **{**SIZES, **(sizes or {})}, **settings, initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def build_arch_demo(family: str, root: str | Path, rank: int = 4, sizes: dict | None = None) -> tuple[Path, Path]:
    """A tiny ``family`` model under ``root/model`` and two extracted AVs (``a``, ``b``) under ``root/avs``;
    ``sizes`` overrides :data:`SIZES`."""
    from vllm_av.offline.extract import extract
    from vllm_av.testing.models import make_aligned_variant

    root = Path(root)
    base, library = root / "model", root / "avs"
    if not (base / "config.json").is_file():
        build_arch_model(family, base, sizes=sizes)
    for name, seed in AV_SEEDS.items():
        if not (library / name / "av.json").is_file():
            aligned = make_aligned_variant(base, root / "aligned" / name, seed=seed, rank=rank)
            extract(base, aligned, library / name, rank=rank, force=True, progress=False,
                    description=f"seeded rank-{rank} perturbation #{seed} of a tiny {family}")
    return base, library
