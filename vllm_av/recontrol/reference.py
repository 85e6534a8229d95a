"""The reference RE-Control decoder in plain transformers: the oracle for what vLLM serves, and the
baselines for its speed.

As the paper's code does it: at each greedy step take the post-norm last-layer hidden state ``s``
of the last position, run ``steps`` SGD steps with learning rate ``alpha`` on a perturbation
``u`` (loss ``−V(s + u)``, gradients by autograd), and pick the argmax of ``lm_head(s + u)``.
The KV cache holds the unedited states.

:func:`recontrol_generate` is a lean loop that steers the sampled position only (the oracle);
:func:`generate_as_published` runs the way the published code does (transformers ``generate``
over a model whose final-norm output is steered at *every* position, the prompt's included at
prefill): the same tokens, at the published code's cost.
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


@torch.no_grad()
def generate_as_published(model, value, prompts: list[list[int]], alpha: float, steps: int, max_new_tokens: int,
                          pad_token_id: int = 0) -> list[list[int]]:
    """``max_new_tokens`` greedy ids after each prompt, decoded as the RE-Control reference code
    decodes: ``model.generate`` with the final norm's output steered at every position it computes
    (a forward hook standing in for the reference code's patched ``LlamaModel.forward``).

    ``model``: a transformers causal LM whose decoder (``.model``) ends in the final norm ``.norm``."""
    def steer_every_position(module, inputs, output):
        flat = output.reshape(-1, output.shape[-1]).float()
        return steered_state(value, flat, alpha, steps).to(output.dtype).reshape(output.shape)

    device = next(model.parameters()).device
    ids, mask, _ = left_padded(prompts, pad_token_id, device)
    hook = model.model.norm.register_forward_hook(steer_every_position)
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id)
    finally:
        hook.remove()
    return [row[ids.shape[1]:].tolist() for row in out]
