"""The reference RE-Control decoder in plain transformers: the oracle for what vLLM serves, and the
baseline for its speed.

As the paper's code does it: at each greedy step take the post-norm last-layer hidden state ``s``
of the last position, run ``steps`` SGD steps with learning rate ``alpha`` on a perturbation
``u`` (loss ``−V(s + u)``, gradients by autograd), and pick the argmax of ``lm_head(s + u)``.
The KV cache holds the unedited states.
"""

from __future__ import annotations

import torch


def steered_state(value: torch.nn.Module, s: torch.Tensor, alpha: float, steps: int) -> torch.Tensor:
    """``s + u`` after ``steps`` SGD steps on ``u`` (from 0) maximising ``V(s + u)``, by autograd
    (minimising it for a negative ``alpha``)."""
    u = torch.zeros_like(s, requires_grad=True)
    optimizer = torch.optim.SGD([u], lr=abs(alpha))
    sign = 1.0 if alpha > 0 else -1.0
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = -sign * value(s + u).sum()
            loss.backward()
            optimizer.step()
    return (s + u).detach()


def left_padded(prompts: list[list[int]], pad_token_id: int, device=None):
    """``(input_ids, attention_mask, position_ids)`` of ``prompts`` left-padded into one batch."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def recontrol_generate(model, value, prompts: list[list[int]], alpha: float, steps: int, max_new_tokens: int,
                       eos_token_id: int | None = None, pad_token_id: int = 0) -> list[list[int]]:
    """Greedy ids after each prompt (the stop token included), every sampled state steered.

    ``model``: a transformers causal LM with ``.model`` (its decoder, ending in the final norm) and
    ``.lm_head``; prompts are left-padded into one batch. ``eos_token_id`` None: ``max_new_tokens``
    tokens whatever they are."""
    device = next(model.parameters()).device
    ids, mask, positions = left_padded(prompts, pad_token_id, device)
    past, out = None, [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                             use_cache=True)
        past = hidden.past_key_values
        s = hidden.last_hidden_state[:, -1].float()
        if steps and alpha:
            s = steered_state(value, s, alpha, steps)
        token = model.lm_head(s.to(model.lm_head.weight.dtype)).argmax(-1)
        for i, t in enumerate(token.tolist()):
            if not done[i]:
                out[i].append(t)
        if eos_token_id is not None:
            done |= token == eos_token_id
            if bool(done.all()):
                break
        ids = token[:, None]
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
    return out
