"""``vllm-av inspect``: an AV's ``av.json`` as a readable table, or as JSON."""

from __future__ import annotations

from vllm_av.format.avfile import AVMeta, Compatibility


def report_dict(meta: AVMeta, compat: Compatibility | None = None) -> dict:
    """The ``--json`` report: the full ``av.json`` plus, if checked, the compatibility verdict."""
    d = meta.to_dict()
    if compat is not None:
        d["compatibility"] = compat._asdict()
    return d


def format_report(meta: AVMeta, compat: Compatibility | None = None, model_dir: str | None = None) -> str:
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
        f"  delta energy {t.delta_energy:.4g}: {t.lora_share:.2%} in LoRA modules, "
        f"{t.dropped_share:.2%} dropped (cannot be served as LoRA)",
        f"  the adapter keeps {t.retained_share:.2%} of the delta energy; "
        f"rel. Frobenius error over LoRA modules {t.rel_error:.2e}",
    ]
    if meta.dropped:
        lines.append("  dropped deltas (share of delta energy):")
        for name, share in sorted(meta.dropped.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {name:<{width}} {share:.4%}")
    return "\n".join(lines)
