"""``vllm-av recontrol train``: fit the value function to collected rollouts with the TD loss.

Batches are ``batch_size`` trajectories, padded to their longest; Adam on the paper's TD objective
(:func:`~vllm_av.recontrol.value.td_loss`, stopped target). Each epoch reports the TD loss (mean over
non-final positions) and the terminal loss (mean ``(V(s_T) − r)²``), both after the epoch's updates.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from vllm_av.errors import AVError
from vllm_av.recontrol.collect import DATA_FORMAT, DATA_JSON

logger = logging.getLogger("vllm_av.recontrol")


class TrainError(AVError):
    """Collected data that cannot be trained on."""


def load_rollouts(data_dir):
    """``(meta, trajectories)`` from a ``collect`` directory: each trajectory ``(states [T, H], reward)``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    data_dir = Path(data_dir)
    meta_path = data_dir / DATA_JSON
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise TrainError(f"{meta_path}: missing (is {data_dir} a `vllm-av recontrol collect` output?)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"{meta_path}: unreadable JSON ({exc})") from None
    if meta.get("format") != DATA_FORMAT:
        raise TrainError(f"{meta_path}: format {meta.get('format')!r} is not {DATA_FORMAT!r}")
    shards = sorted(data_dir.glob("shard-*.safetensors"))
    if not shards:
        raise TrainError(f"{data_dir}: no shard-*.safetensors files")
    trajectories = []
    for shard in shards:
        try:
            tensors = load_file(str(shard))
        except (SafetensorError, OSError) as exc:
            raise TrainError(f"{shard}: not a readable safetensors file ({exc})") from None
        states, lengths, rewards = (tensors.get(k) for k in ("states", "lengths", "rewards"))
        if states is None or lengths is None or rewards is None:
            raise TrainError(f"{shard}: needs tensors states, lengths and rewards")
        if int(lengths.sum()) != states.shape[0] or len(lengths) != len(rewards) or bool((lengths < 1).any()):
            raise TrainError(f"{shard}: lengths {int(lengths.sum())} do not cover the {states.shape[0]} states")
        for s, r in zip(states.float().split(lengths.tolist()), rewards.tolist()):
            trajectories.append((s, r))
    return meta, trajectories


def _batches(trajectories, order, batch_size):
    import torch

    for first in range(0, len(order), batch_size):
        chosen = [trajectories[i] for i in order[first:first + batch_size]]
        lengths = torch.tensor([s.shape[0] for s, _ in chosen])
        states = torch.nn.utils.rnn.pad_sequence([s for s, _ in chosen], batch_first=True)
        yield states, torch.tensor([r for _, r in chosen]), lengths


def _losses(value, trajectories, batch_size) -> tuple[float, float]:
    import torch

    td_sum = td_n = term_sum = 0.0
    with torch.no_grad():
        for states, rewards, lengths in _batches(trajectories, range(len(trajectories)), batch_size):
            v = value(states.flatten(0, 1)).reshape(states.shape[:2])
            last = v[torch.arange(len(lengths)), lengths - 1]
            term_sum += float(((last - rewards) ** 2).sum())
            inner = torch.arange(states.shape[1])[None, :-1] < (lengths[:, None] - 1)
            td_sum += float((((v[:, :-1] - v[:, 1:]) ** 2) * inner).sum())
            td_n += float(inner.sum())
    return td_sum / max(td_n, 1.0), term_sum / len(trajectories)


def train_value(data_dir, out_dir, name: str, layers: int = 2, width: int = 1024, epochs: int = 100, lr: float = 1e-4,
                batch_size: int = 512, seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """Train a value function on ``data_dir`` and save it to ``out_dir``; return its training figures.

    ``batch_size``: trajectories per Adam step."""
    import torch
    from tqdm import tqdm

    from vllm_av.recontrol.value import ValueMLP, td_loss
    from vllm_av.recontrol.valuefile import save_value_function

    meta, trajectories = load_rollouts(data_dir)
    start = time.perf_counter()
    torch.manual_seed(seed)
    value = ValueMLP(meta["hidden_size"], width, layers).to(device)
    optimizer = torch.optim.Adam(value.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    td_curve, terminal_curve = [], []
    bar = tqdm(range(epochs), desc=f"train {name}", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(trajectories), generator=generator).tolist()
        value.train()
        for states, rewards, lengths in _batches(trajectories, order, batch_size):
            loss = td_loss(value, states.to(device), rewards.to(device), lengths.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        value.eval()
        td, terminal = _losses(value.cpu(), trajectories, batch_size)
        value.to(device)
        td_curve.append(td)
        terminal_curve.append(terminal)
        bar.set_postfix(td=f"{td:.4f}", terminal=f"{terminal:.4f}")
        if not progress:
            logger.info("epoch %d: td %.5f terminal %.5f", len(td_curve), td, terminal)
    training = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "trajectories": len(trajectories),
                "states": sum(s.shape[0] for s, _ in trajectories), "seconds": time.perf_counter() - start,
                "td_loss": td_curve, "terminal_loss": terminal_curve,
                "final_td_loss": td_curve[-1] if td_curve else None,
                "final_terminal_loss": terminal_curve[-1] if terminal_curve else None}
    record = {"name": name, "description": f"RE-Control value function, reward {meta.get('reward')}",
              "reward": meta.get("reward", ""), "data": str(data_dir), "training": training}
    if meta.get("base"):
        record["base"] = meta["base"]
    save_value_function(out_dir, value.cpu(), record)
    return training
