"""``vllm-av inspect``: an AV's ``av.json`` as a readable table, or as JSON."""

from __future__ import annotations

from vllm_av.format.avfile import AVMeta, Compatibility
from vllm_av.format.checkpoint import is_moe_expert
from vllm_av.format.validate import DEFAULT_MAX_RANK

EMBEDDING_PARTS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out", "word_embeddings")


def dropped_groups(meta: AVMeta) -> dict[str, float]:
    """Shares of the delta energy dropped, by kind: ``embeddings``, ``experts`` (MoE), ``norms``,
    ``biases``, ``other`` (non-zero only)."""
    groups: dict[str, float] = {}
    for name, share in meta.dropped.items():
        parts = set(name.split("."))
        kind = ("embeddings" if parts & set(EMBEDDING_PARTS) else "experts" if is_moe_expert(name)
                else "norms" if "norm" in name else "biases" if name.endswith(".bias") else "other")
        groups[kind] = groups.get(kind, 0.0) + share
    return {k: v for k, v in sorted(groups.items(), key=lambda kv: -kv[1]) if v > 0}


def dropped_summary(meta: AVMeta) -> str:
    """One line: how much was dropped and what it was (says so when embeddings are tied to lm_head)."""
    t = meta.totals
    line = f"{t.dropped_share:.2%} dropped (cannot be served as LoRA)"
    groups = dropped_groups(meta)
    if groups:
        line += ": " + ", ".join(f"{kind} {share:.2%}" for kind, share in groups.items())
        if meta.settings.get("tied_embeddings") and "embeddings" in groups:
            line += " (the embeddings are tied: that one delta is the input embedding's and lm_head's)"
    return line


def served_rank_note(meta: AVMeta, max_rank: int = DEFAULT_MAX_RANK) -> str:
    """What a server with ``--av-max-rank max_rank`` does with this AV (it refuses ranks above the limit)."""
    over = [st.rank for st in meta.served_modules.values() if st.rank > max_rank]
    if not over:
        return f"fits --av-max-rank {max_rank} (max rank {meta.max_rank})"
    return (f"{len(over)} of {len(meta.served_modules)} modules have rank > {max_rank} (up to {max(over)}): a server "
            f"with --av-max-rank {max_rank} refuses this AV at start; serve with --av-max-rank {max(over)} "
            f"or extract with --rank {max_rank}")


def report_dict(meta: AVMeta, compat: Compatibility | None = None) -> dict:
    """The ``--json`` report: the full ``av.json`` plus, if checked, the compatibility verdict."""
    d = meta.to_dict()
    if compat is not None:
        d["compatibility"] = compat._asdict()
    return d


def format_report(meta: AVMeta, compat: Compatibility | None = None, model_dir: str | None = None,
                  max_rank: int = DEFAULT_MAX_RANK) -> str:
    """Human-readable report: header, fingerprints, per-module table, totals and dropped deltas."""
    s = meta.settings
    mode = f"rank {s['rank']}" if s.get("rank") is not None else f"energy {s['energy']}"
    lines = [
        f"AV {meta.name!r}" + (f": {meta.description}" if meta.description else ""),
        f"  made by vllm-av {meta.tool_version}: {mode}, factors {s['dtype']}, SVD on {s['device']}",
        "",
        f"  {'':8} {'arch':12} {'tensors':12} {'content':12} {'#':>5}  path",
    ]
    for label, path, fp in (("base", meta.base_path, meta.base), ("aligned", meta.aligned_path, meta.aligned)):
        lines.append(
            f"  {label:8} {fp.arch_hash[:12]} {fp.tensors_hash[:12]} {fp.content_hash[:12]} {fp.num_tensors:>5}  {path}"
        )
    if compat is not None:
        lines.append(f"  model {model_dir}: {compat.verdict} ({compat.reason})")

    width = max(len("module"), *(len(m) for m in meta.modules))
    lines += ["", f"  {'module':<{width}} {'shape':>11} {'rank':>5} {'retained':>9} {'rel.err':>9}  svd"]
    for module, st in meta.modules.items():
        shape = "x".join(map(str, st.shape))
        lines.append(
            f"  {module:<{width}} {shape:>11} {st.rank:>5} {st.retained_energy:>9.4%} {st.rel_error:>9.2e}  {st.method}"
        )

    t = meta.totals
    zero = sum(1 for st in meta.modules.values() if st.rank == 0)
    params = sum(st.rank * (st.shape[0] + st.shape[1]) for st in meta.modules.values())
    lines += [
        "",
        f"  {len(meta.modules)} LoRA modules ({zero} with zero delta, left out of the adapter), "
        f"max rank {meta.max_rank}, {params:,} factor parameters",
        f"  delta energy {t.delta_energy:.4g}: {t.lora_share:.2%} in LoRA modules, {dropped_summary(meta)}",
        f"  the adapter keeps {t.retained_share:.2%} of the delta energy; "
        f"rel. Frobenius error over LoRA modules {t.rel_error:.2e}",
        f"  served: {served_rank_note(meta, max_rank)}",
    ]
    if meta.dropped:
        lines.append("  dropped deltas (share of delta energy):")
        for name, share in sorted(meta.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {name:<{width}} {share:.4%}")
    return "\n".join(lines)
