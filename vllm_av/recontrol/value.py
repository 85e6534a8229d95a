"""The RE-Control value function and the hidden-state steering it drives.

``V(s)`` is a ReLU MLP, ``hidden → width → (width →) 1``, on the post-norm last-layer hidden state.
At decode time each steered row runs ``u ← u + α ∇_s V(s + u)`` for its own ``n`` steps, then
``lm_head(s + u)``. For a ReLU MLP the input gradient is closed-form, one chain of small GEMMs
through the ReLU masks (:func:`input_gradient`), so serving needs no autograd; all rows take each
step together (:func:`steer`).

Training is the paper's TD objective on the base policy's own rollouts (:func:`td_loss`):
``Σ_t (V(s_t) − sg(V(s_{t+1})))²`` over non-final positions plus ``(V(s_T) − r)²`` at the last.
The reference code does not stop the target's gradient; this follows the paper and does.
"""

from __future__ import annotations

import torch


class ValueMLP(torch.nn.Module):
    """``V(s)``: ``layers`` linear layers (2 or 3) with ReLU between them, one scalar out."""

    def __init__(self, hidden_size: int, width: int, layers: int = 2):
        super().__init__()
        if layers not in (2, 3):
            raise ValueError(f"layers={layers}: the paper's value function has 2 or 3 layers")
        sizes = [hidden_size] + [width] * (layers - 1) + [1]
        self.linears = torch.nn.ModuleList(torch.nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``V`` of each row of ``s [rows, hidden]``, shape ``[rows]``."""
        h = s
        for linear in self.linears[:-1]:
            h = torch.relu(linear(h))
        return self.linears[-1](h).squeeze(-1)


def input_gradient(value: ValueMLP, s: torch.Tensor) -> torch.Tensor:
    """``∇_s V(s)`` for each row of ``s`` in closed form: the forward pass keeps the ReLU masks,
    the backward pass is ``W_1ᵀ (m_1 ⊙ W_2ᵀ (m_2 ⊙ … w_Lᵀ))`` (the output layer's activations are
    never needed, only its mask)."""
    hidden = value.linears[:-1]
    masks = []
    h = s
    for i, linear in enumerate(hidden):
        pre = torch.nn.functional.linear(h, linear.weight, linear.bias)
        masks.append(pre > 0)
        if i + 1 < len(hidden):
            h = torch.relu(pre)
    g = masks[-1] * value.linears[-1].weight  # ∂V/∂pre_last, [rows, width]
    for i in range(len(hidden) - 1, -1, -1):
        g = g @ hidden[i].weight
        if i:
            g = g * masks[i - 1]
    return g


@torch.no_grad()
def steer(value: ValueMLP, s: torch.Tensor, alpha: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """``s + u`` after ``steps[row]`` updates ``u ← u + alpha[row] · ∇V(s + u)`` per row, all rows at once.

    Rows with ``steps == 0`` come back unchanged. ``alpha`` float ``[rows]``, ``steps`` int ``[rows]``."""
    out = s.clone()
    for k in range(int(steps.max()) if steps.numel() else 0):
        active = steps > k
        rows = out[active]
        out[active] = rows + alpha[active, None].to(rows.dtype) * input_gradient(value, rows)
    return out


def td_loss(value: ValueMLP, states: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The paper's TD loss over a batch of trajectories, mean per position.

    ``states [trajectories, T, hidden]`` (padded), ``lengths [trajectories]`` (≥ 1), ``rewards [trajectories]``:
    ``(V(s_t) − sg(V(s_{t+1})))²`` for ``t < length − 1`` and ``(V(s_{length−1}) − r)²``."""
    b, t, _ = states.shape
    v = value(states.reshape(b * t, -1)).reshape(b, t)
    positions = torch.arange(t, device=states.device)
    last = positions[None, :] == (lengths[:, None] - 1)
    inner = positions[None, :] < (lengths[:, None] - 1)
    target = torch.where(last, rewards[:, None].to(v.dtype), torch.zeros_like(v))
    target[:, :-1] = torch.where(inner[:, :-1], v[:, 1:].detach(), target[:, :-1])
    used = last | inner
    return ((v - target) ** 2 * used).sum() / used.sum()
