"""``vllm-av extract``: θ_aligned − θ_base → a low-rank AV adapter directory.

Both checkpoints are read tensor by tensor, so peak memory stays near two float32 tensors of the
largest shape plus the SVD workspace and the (small) factors collected so far. Every check that
needs only headers runs before any tensor is read, and the output is written to a temporary
directory next to ``--out`` and renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vllm_av import __version__
from vllm_av.format.avfile import AV_JSON, AVMeta, ModuleStats, Totals, write_av
from vllm_av.format.checkpoint import Checkpoint, arch_fields, is_moe_expert
from vllm_av.format.names import name_problem
from vllm_av.format.validate import validate_av_dir
from vllm_av.errors import AVError
from vllm_av.offline import svd

# Linear modules vLLM can put LoRA on in Llama-like models. Checkpoints that store fused
# projections (e.g. Phi-3) keep them as one LoRA module each, which is what vLLM expects there.
TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")


def lora_module(name: str, shape: tuple[int, ...]) -> str | None:
    """The module name if tensor ``name`` is the 2-D weight of a LoRA target module, else None.

    MoE expert projections (``...experts.<i>.<proj>``) are not targets: vLLM serves the experts as
    one fused MoE layer, which cannot carry AVs, so their deltas are reported as dropped."""
    if is_moe_expert(name):
        return None
    parts = name.split(".")
    if len(shape) == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in TARGET_SUFFIXES:
        return name[: -len(".weight")]
    return None


def extract(
    base: str | Path,
    aligned: str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    name: str | None = None,
    description: str = "",
    device: str = "cpu",
    dtype: str = "float32",
    force: bool = False,
    progress: bool = True,
) -> AVMeta:
    """Compress ``aligned − base`` into an AV at ``out`` (``rank`` or ``energy``); return its metadata.

    Raises AVError (one line, naming the file or tensor) for unusable inputs or options.
    """
    from tqdm import tqdm

    out = Path(out)
    name = out.name if name is None else name
    _check_options(rank, energy, name, device, dtype)
    _check_out(out, force)
    base_ck, aligned_ck = Checkpoint.open(base), Checkpoint.open(aligned)
    _check_pair(base_ck, aligned_ck)
    modules = {n: m for n, info in base_ck.tensors.items() if (m := lora_module(n, info.shape))}
    if not modules:
        raise AVError(f"no LoRA target modules ({', '.join(TARGET_SUFFIXES)}) among the tensors of {base_ck.root}")
    if rank is not None:
        for n in sorted(modules):
            shape = base_ck.tensors[n].shape
            if rank > min(shape):
                raise AVError(f"--rank {rank} is larger than tensor {n} {list(shape)} allows (min(out, in) = {min(shape)})")

    stats: dict[str, ModuleStats] = {}
    factors: dict = {}
    energies: dict[str, float] = {}
    order = sorted(base_ck.tensors, key=lambda n: (base_ck.tensors[n].file, base_ck.tensors[n].start))
    for n in tqdm(order, desc="vllm-av extract", unit="tensor", disable=not progress):
        delta = _delta(base_ck, aligned_ck, n, device)
        if n in modules:
            module = modules[n]
            stats[module], factors[module] = _compress_module(module, delta, rank, energy, dtype)
            energies[n] = stats[module].delta_norm ** 2
        else:
            energies[n] = svd.frobenius_norm(delta) ** 2
        del delta

    stats, energies = dict(sorted(stats.items())), dict(sorted(energies.items()))  # order-independent sums
    factors = {m: f for m, f in factors.items() if f is not None}
    totals = _totals(stats, energies, modules)
    if totals.delta_energy == 0:
        raise AVError(f"base {base_ck.root} and aligned {aligned_ck.root} are identical: there is no delta")
    if not factors:
        raise AVError("no LoRA target module has a delta: everything that changed (norms, embeddings...) cannot be served as LoRA")
    meta = AVMeta(
        name=name,
        description=description,
        tool_version=__version__,
        base_path=str(base_ck.root.resolve()),
        aligned_path=str(aligned_ck.root.resolve()),
        base=base_ck.fingerprint(),
        aligned=aligned_ck.fingerprint(),
        settings={
            "rank": rank,
            "energy": energy,
            "dtype": dtype,
            "device": device,
            "tied_embeddings": _tied_embeddings(base_ck.config),
            "svd": {"exact_max_dim": svd.EXACT_MAX_DIM, "oversample": svd.OVERSAMPLE, "power_iters": svd.POWER_ITERS},
        },
        modules=stats,
        dropped={n: e / totals.delta_energy for n, e in energies.items() if n not in modules and e > 0},
        totals=totals,
    )
    _write_atomically(out, meta, factors)
    return meta


def _tied_embeddings(config: dict) -> bool:
    """Whether the model ties ``lm_head`` to the input embeddings (then one tensor holds both deltas)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def _compress_module(module: str, delta, rank, energy, dtype: str):
    """``(ModuleStats, (A, B) on CPU in dtype, or None for a zero delta)``; the error is measured on the saved factors."""
    import torch

    lr = svd.compress(delta, rank=rank, energy=energy)
    stats = ModuleStats(tuple(delta.shape), lr.rank, lr.retained_energy, lr.rel_error, lr.delta_norm, lr.method)
    if lr.rank == 0:
        return stats, None
    save_dtype = getattr(torch, dtype)
    A, B = lr.A.to("cpu", save_dtype), lr.B.to("cpu", save_dtype)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise AVError(f"factors of {module} overflow {dtype}; use --dtype float32 or bfloat16")
    if save_dtype != torch.float32:
        stats.rel_error = svd.relative_error(delta, B.to(delta.device), A.to(delta.device))
    return stats, (A, B)


def _check_options(rank, energy, name, device, dtype) -> None:
    import torch

    if (rank is None) == (energy is None):
        raise AVError("give exactly one of --rank R or --energy F")
    if rank is not None and rank < 1:
        raise AVError(f"--rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise AVError(f"--energy must be in (0, 1], got {energy}")
    problem = name_problem(name)
    if problem:
        raise AVError(f"{problem} (set it with --name)")
    if dtype not in DTYPES:
        raise AVError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device not in DEVICES:
        raise AVError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise AVError(f"--device cuda: CUDA is not available to this torch ({torch.__version__}); use --device cpu")


def _check_out(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise AVError(f"output directory {out} exists (use --force to replace it)")
    if not out.is_dir() or (any(out.iterdir()) and not (out / AV_JSON).is_file()):
        raise AVError(f"refusing to replace {out} with --force: it is not an AV directory")


def _check_pair(base: Checkpoint, aligned: Checkpoint) -> None:
    b_arch, a_arch = arch_fields(base.config), arch_fields(aligned.config)
    for k in sorted(set(b_arch) | set(a_arch)):
        if b_arch.get(k) != a_arch.get(k):
            raise AVError(
                f"different architectures: {k} is {b_arch.get(k)!r} in base {base.root}/config.json "
                f"but {a_arch.get(k)!r} in aligned {aligned.root}/config.json"
            )
    for have, lack in ((base, aligned), (aligned, base)):
        missing = sorted(set(have.tensors) - set(lack.tensors))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise AVError(f"tensor {missing[0]} of {have.root} is missing from {lack.root}{more}")
    for n in sorted(base.tensors):
        b, a = base.tensors[n].shape, aligned.tensors[n].shape
        if b != a:
            raise AVError(f"shape mismatch for tensor {n}: {list(b)} in base {base.root} but {list(a)} in aligned {aligned.root}")


def _delta(base: Checkpoint, aligned: Checkpoint, name: str, device: str):
    """aligned − base for one tensor, float32 on ``device``; AVError naming the file on NaN/Inf."""
    import torch

    b = base.load(name).to(device, torch.float32)
    delta = aligned.load(name).to(device, torch.float32)
    delta.sub_(b)
    if not bool(torch.isfinite(delta).all()):
        for ck, t in ((base, b), (aligned, delta + b)):
            if not bool(torch.isfinite(t).all()):
                raise AVError(f"tensor {name} in {ck.tensors[name].file} contains NaN or Inf")
        raise AVError(f"the delta of tensor {name} overflows float32 (Inf)")
    return delta


def _totals(stats: dict[str, ModuleStats], energies: dict[str, float], modules: dict[str, str]) -> Totals:
    total = sum(energies.values())
    lora = sum(energies[n] for n in modules)
    err2 = sum(s.rel_error**2 * s.delta_norm**2 for s in stats.values())
    retained = sum(s.retained_energy * s.delta_norm**2 for s in stats.values())
    denominator = total or 1.0  # identical checkpoints: all shares 0 (extract refuses them)
    return Totals(
        delta_energy=total,
        lora_share=lora / denominator,
        dropped_share=(total - lora) / denominator,
        retained_share=retained / denominator,
        rel_error=(err2 / lora) ** 0.5 if lora else 0.0,
    )


def _write_atomically(out: Path, meta: AVMeta, factors: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_av(tmp, meta, factors)
        validate_av_dir(tmp, max_rank=meta.max_rank, name=meta.name)  # what a server will check
        if out.exists():  # --force, checked by _check_out
            old = tmp.with_name(tmp.name + ".old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
