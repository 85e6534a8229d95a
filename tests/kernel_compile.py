"""Compile the blend kernel for real CUDA targets with Triton's compiler and ptxas (no GPU needed).

Run as ``python -m tests.kernel_compile`` with a JSON list of jobs on stdin; prints one JSON
result per job: ``{"shared": bytes}`` or ``{"error": "..."}``. A process of its own, because
the tests import the kernel under ``TRITON_INTERPRET=1``, where it cannot be compiled.
"""

from __future__ import annotations

import json
import os
import sys


def compile_job(job: dict) -> dict:
    """``job``: ``arch``, ``num_warps`` and the kernel's constexprs (``PHASE``, ``BLOCK_*``), ``dtype``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_av.kernels.blend import _blend_kernel

    dtype = job["dtype"]
    constexprs = {key: job[key] for key in ("PHASE", "BLOCK_T", "BLOCK_M", "BLOCK_R", "BLOCK_K", "BLOCK_N")}
    constexprs.update(DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", DOT_UPCAST=False)
    pointee = {"hp_ptr": "fp32", "scale_ptr": "fp32", "index_ptr": "i32", "active_ptr": "i32", "sync_ptr": "i32"}
    signature = {}
    for name in _blend_kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointee.get(name, dtype)
        else:
            signature[name] = "i32"
    try:
        kernel = triton.compile(ASTSource(_blend_kernel, signature, constexprs=constexprs),
                                target=GPUTarget("cuda", job["arch"], 32), options={"num_warps": job["num_warps"]})
    except Exception as exc:  # reported per job: the test names the configuration
        return {"error": f"{type(exc).__name__}: {str(exc)[-500:]}"}
    if not kernel.asm.get("cubin"):
        return {"error": "no cubin"}
    return {"shared": kernel.metadata.shared}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("tests.kernel_compile: unset TRITON_INTERPRET")
    for job in json.load(sys.stdin):
        print(json.dumps(compile_job(job)), flush=True)


if __name__ == "__main__":
    main()
