"""``vllm-av check``: the self-test a user runs on their own machine, with their installed vLLM.

It builds a tiny Llama-shaped model with a real model's widths (hidden 576, 9 query and 3 key/value
heads of 64, intermediate 1536: SmolLM2-135M's, 2 layers), extracts two AVs from perturbed copies,
serves them offline with the installed vLLM -- its default runner, compile mode and CUDA-graph
mode -- and checks a batch where every row has its own mix (negative scales included) against
the merged-weights oracle in transformers. The oracle scores vLLM's own tokens (teacher forcing),
so a row fails only where vLLM's token or its logprob disagrees with the oracle beyond the dtype's
tolerance, and the report names the row and the token. It also prints the vLLM version and runner,
the blend implementation, the compile and CUDA-graph modes, the patch-point summary and a per-layer
microbenchmark (the blend against the layer's own GEMM), then a one-line verdict; the exit code is
non-zero on any mismatch.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# SmolLM2-135M's layer widths (576 is 9 blocks of the Triton kernel's K split), 2 layers
MODEL_SIZES = dict(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, num_layers=2)
LINEAR_SHAPES = {"qkv_proj": (576, [576, 192, 192]), "o_proj": (576, [576]), "gate_up_proj": (576, [1536, 1536]),
                 "down_proj": (1536, [576])}
AV_SEEDS = {"a": 1, "b": 2}
RANK = 4
PROMPTS = ["medical: the patient", "legal: the court said that", "financial: the bank", "cooking: heat the water"]
MIXES = [None, {"a": 1.0}, {"b": -0.7}, {"a": 0.5, "b": 1.2}, {"a": -1.5, "b": 0.3}, {"b": 2.0}]
MAX_TOKENS = 8
LOGPROB_TOL = {"float32": 2e-3, "bfloat16": 0.15, "float16": 0.08}  # vLLM (delta as x·Aᵀ·Bᵀ) vs merged weights


@dataclass
class RowResult:
    row: int
    prompt: str
    mix: dict | None
    tokens: list[int]
    problem: str | None  # None: the row equals the oracle

    def describe(self) -> str:
        return f"row {self.row} (prompt {self.prompt!r}, mix {self.mix})"


def build_check_model(root: Path, progress=print) -> tuple[Path, Path]:
    """The check's model under ``root/model`` and its AVs ``a`` and ``b`` under ``root/avs``."""
    from vllm_av.offline.extract import extract
    from vllm_av.testing.models import build_tiny_model, make_aligned_variant

    model, library = root / "model", root / "avs"
    progress(f"building a tiny Llama with real widths ({MODEL_SIZES}) and {len(AV_SEEDS)} AVs of rank {RANK} in {root}")
    build_tiny_model(model, init_std=0.05, **MODEL_SIZES)
    for name, seed in AV_SEEDS.items():
        aligned = make_aligned_variant(model, root / "aligned" / name, seed=seed, rank=RANK)
        extract(model, aligned, library / name, rank=RANK, name=name, progress=False,
                description=f"vllm-av check: seeded rank-{RANK} perturbation #{seed}")
    return model, library


def engine_kwargs(device: str, dtype: str) -> dict:
    """``LLM`` arguments: vLLM's defaults for runner, compilation and CUDA graphs; small on CPU."""
    kwargs = dict(dtype=dtype, max_model_len=256, max_num_seqs=8, seed=0)
    if device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        kwargs["gpu_memory_utilization"] = 0.4  # on CPU: the share of the node vLLM insists is free
    else:
        kwargs["gpu_memory_utilization"] = 0.3
    return kwargs


def compare_row(oracle_model, prompt_ids: list[int], tokens: list[int], logprobs: list[float], tol: float) -> str | None:
    """Score vLLM's tokens with the oracle (teacher forcing): the first disagreement, or None.

    A token disagrees when its logprob differs by more than ``tol``, or when the oracle prefers
    another token by more than ``tol`` (so a near-tie the dtype cannot resolve is not a failure).
    """
    import torch

    ids = torch.tensor([prompt_ids + tokens])
    with torch.no_grad():
        scores = torch.log_softmax(oracle_model(ids).logits[0].double(), dim=-1)
    for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
        step = scores[len(prompt_ids) - 1 + i]
        want, best = step[token].item(), int(step.argmax())
        if abs(logprob - want) > tol:
            return f"token {i} ({token}): vLLM's logprob {logprob:.4f}, the oracle's {want:.4f}"
        if best != token and step[best].item() - want > tol:
            return (f"token {i}: vLLM chose {token} (oracle logprob {want:.4f}), the oracle prefers {best} "
                    f"({step[best].item():.4f})")
    return None


def microbenchmark(device: str, dtype: str, blend) -> list[dict]:
    """Per linear layer of the check model and token count: the blend's time over the layer's GEMM's."""
    import torch

    import vllm_av.serving.blend.op  # noqa: F401  (registers the op)

    if blend.name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return []  # Triton's interpreter: nothing worth timing
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for tokens in (1, 16, 256):
        for name, (d_in, slices) in LINEAR_SHAPES.items():
            out = sum(slices)
            make = lambda *shape: (torch.randn(*shape, generator=gen) * 0.05).to(device, torch_dtype)  # noqa: E731
            weight, x, y = make(out, d_in), make(tokens, d_in), make(tokens, out)
            lora_a, lora_b = make(len(slices), len(AV_SEEDS), RANK, d_in), make(len(AV_SEEDS), out, RANK)
            add_blend = _blend_call(blend, y, x, lora_a, lora_b, slices)
            gemm = _median_seconds(lambda: torch.mm(x, weight.t(), out=y), device)
            blended = _median_seconds(add_blend, device)
            rows.append({"layer": name, "tokens": tokens, "gemm_us": gemm * 1e6, "blend_us": blended * 1e6,
                         "blend_over_gemm": blended / gemm})
    return rows


def _blend_call(blend, y, x, lora_a, lora_b, slices):
    """``y += blend(x)`` as the engine's layers run it with the backend ``blend``: the layer's blend on a
    step's tables in which every row mixes both AVs."""
    import numpy as np

    from vllm_av.serving.worker.tables import make_tables

    rows, num_avs = y.shape[0], lora_a.shape[1]
    tables = make_tables(blend.table_form, rows, num_avs, num_avs, y.device)
    tables.reset_pool(2)
    tables.set_pool_row(1, [(0, 0.7), (1, -0.4)])
    tables.write(np.ones(rows, dtype=np.int64), rows)
    layer = blend.layer(lora_a, lora_b, slices, [RANK] * num_avs)
    return lambda: layer.from_tables(y, x, tables)


def _median_seconds(fn, device: str, reps: int = 20) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_check(device: str | None = None, dtype: str = "float32", workdir: str | None = None,
              json_out: str | None = None) -> int:
    """Run the self-test; print the report; return the exit code (0: every row equals the oracle)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype not in LOGPROB_TOL:
        raise SystemExit(f"vllm-av check: --dtype must be one of {', '.join(LOGPROB_TOL)}")
    with tempfile.TemporaryDirectory(prefix="vllm-av-check-") as tmp:
        return _check(Path(workdir or tmp), device, dtype, json_out)


def _check(root: Path, device: str, dtype: str, json_out: str | None) -> int:
    import torch

    from vllm_av.serving.compat import checker
    from vllm_av.serving.compat import patch_points as points
    from vllm_av.serving.blend.select import select_backend
    from vllm_av.testing.oracle import merged_model

    start = time.time()
    LLM, SamplingParams = points.OFFLINE_LLM.get(), points.SAMPLING_PARAMS.get()
    model, library = build_check_model(root)
    llm = LLM(str(model), **engine_kwargs(device, dtype),
              additional_config={"av": {"path": str(library), "max_per_request": len(AV_SEEDS)}})
    config = llm.llm_engine.vllm_config
    jobs = [(prompt, mix) for mix in MIXES for prompt in PROMPTS[:2]]
    for i, prompt in enumerate(PROMPTS[2:]):  # two more rows with mixes of their own
        jobs.append((prompt, MIXES[3 + i]))
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True,
                             extra_args={"av": mix} if mix else None) for _, mix in jobs]
    outputs = llm.generate([prompt for prompt, _ in jobs], params, use_tqdm=False)
    del llm
    rows, oracles = [], {}
    for i, ((prompt, mix), output) in enumerate(zip(jobs, outputs)):
        key = json.dumps(mix, sort_keys=True)
        if key not in oracles:
            oracles[key] = merged_model(model, library, mix or {})
        completion = output.outputs[0]
        tokens = list(completion.token_ids)
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, tokens)]
        problem = compare_row(oracles[key], list(output.prompt_token_ids), tokens, logprobs, LOGPROB_TOL[dtype])
        rows.append(RowResult(i, prompt, mix, tokens, problem))
    base_tokens = {row.prompt: row.tokens for row in rows if row.mix is None}
    moved = sum(1 for row in rows if row.mix and row.prompt in base_tokens and row.tokens != base_tokens[row.prompt])
    blend = select_backend(torch.device(device))  # what the engine's worker chose, by the same rule
    version, point_results = checker.check(checker.installed_source())
    missing = [f"{p.name}: {why}" for p, why in point_results if why]
    report = {
        "vllm": version, "runner": _runner(config), "blend": blend.name, "device": device, "dtype": dtype,
        "compile_mode": _name(config.compilation_config.mode),
        "cudagraph_mode": _name(config.compilation_config.cudagraph_mode),
        "patch_points": {"as_expected": len(point_results) - len(missing), "total": len(point_results),
                         "problems": missing},
        "rows": [row.__dict__ for row in rows], "rows_moved_by_their_mix": moved,
        "microbenchmark": microbenchmark(device, dtype, blend),
    }
    failures = [f"{row.describe()}: {row.problem}" for row in rows if row.problem]
    if moved == 0:
        failures.append("no mix changed any row's tokens: the AVs were not applied")
    report["seconds"] = round(time.time() - start, 1)
    report["verdict"] = _verdict(report, len(rows), failures)
    _print_report(report, rows)
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
    return 1 if failures else 0


def _runner(config) -> str:
    """Model Runner V2 or the classic runner (0.34 has only MRV2 and no longer asks)."""
    use_v2 = getattr(config, "use_v2_model_runner", True)
    return "Model Runner V2" if use_v2 else "the classic (V1) model runner"


def _name(value) -> str:
    return getattr(value, "name", str(value))


def _verdict(report: dict, num_rows: int, failures: list[str]) -> str:
    where = f"vLLM {report['vllm']}, {report['runner']}, blend {report['blend']}, {report['device']} {report['dtype']}"
    if not failures:
        return (f"vllm-av check: PASS -- all {num_rows} rows, each with its own mix, equal the merged-weights "
                f"oracle ({where})")
    return f"vllm-av check: FAIL -- {failures[0]}{f' (and {len(failures) - 1} more)' if len(failures) > 1 else ''} ({where})"


def _print_report(report: dict, rows: list[RowResult]) -> None:
    points = report["patch_points"]
    print(f"vLLM {report['vllm']} on {report['device']} ({report['dtype']}), {report['runner']}")
    print(f"blend implementation: {report['blend']}")
    print(f"compile mode: {report['compile_mode']}, CUDA-graph mode: {report['cudagraph_mode']}")
    print(f"patch points: {points['as_expected']}/{points['total']} as expected"
          + "".join(f"\n  {problem}" for problem in points["problems"]))
    for row in rows:
        status = "ok" if row.problem is None else f"MISMATCH: {row.problem}"
        print(f"row {row.row}: {row.prompt!r} mix {row.mix}: {status}")
    if report["microbenchmark"]:
        print("per-layer microbenchmark (blend / the layer's GEMM, median of 20):")
        for entry in report["microbenchmark"]:
            print(f"  {entry['layer']:<13} {entry['tokens']:>4} tokens: GEMM {entry['gemm_us']:8.1f} us, "
                  f"blend {entry['blend_us']:8.1f} us, ratio {entry['blend_over_gemm']:.2f}")
    else:
        print("per-layer microbenchmark: skipped (the Triton kernel runs in Triton's interpreter here)")
    print(f"took {report['seconds']} s")
    print(report["verdict"])
