"""Random RE-Control value functions for tests: a value-function library built in seconds."""

from __future__ import annotations

from pathlib import Path

DEMO_VALUES = {"helpful": (2, 64, 1), "brief": (3, 32, 2)}  # name -> (layers, width, seed)


def build_value_library(model_dir: str | Path, out_dir: str | Path, values: dict = DEMO_VALUES,
                        gain: float = 20.0) -> Path:
    """One random value MLP per entry of ``values`` for ``model_dir``'s hidden size, its fingerprint
    recorded; the output layer is scaled by ``gain`` so that modest steps change greedy tokens."""
    import torch

    from vllm_av.format.checkpoint import Checkpoint
    from vllm_av.recontrol.value import ValueMLP
    from vllm_av.recontrol.valuefile import save_value_function

    checkpoint = Checkpoint.open(model_dir)
    hidden_size = checkpoint.config["hidden_size"]
    out_dir = Path(out_dir)
    for name, (layers, width, seed) in values.items():
        torch.manual_seed(seed)
        value = ValueMLP(hidden_size, width, layers)
        with torch.no_grad():
            value.linears[-1].weight.mul_(gain)
        save_value_function(out_dir / name, value, {"name": name, "description": f"random test value ({seed=})",
                                                    "base": checkpoint.fingerprint().to_dict(), "reward": "random"})
    return out_dir
