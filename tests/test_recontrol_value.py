"""RE-Control's value function (issue 20): closed-form gradient and batched steering against autograd."""

from __future__ import annotations

import pytest
import torch

from vllm_av.recontrol.value import ValueMLP, input_gradient, steer, td_loss


@pytest.fixture(params=[2, 3], ids=["2-layer", "3-layer"])
def value(request):
    torch.manual_seed(0)
    return ValueMLP(hidden_size=16, width=32, layers=request.param).double()


def test_closed_form_gradient_equals_autograd(value):
    s = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(value(s).sum(), s)
    assert torch.allclose(input_gradient(value, s.detach()), auto, atol=1e-12)


def _reference_steer(value, s_row, alpha: float, steps: int):
    """The reference algorithm: SGD ascent on the hidden state with autograd, one row at a time."""
    u = torch.zeros_like(s_row, requires_grad=True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(value(s_row[None] + u[None]).sum(), u)
        u = (u + alpha * grad).detach().requires_grad_(True)
    return (s_row + u).detach()


def test_batched_steering_equals_the_reference_per_row(value):
    """Rows with their own step size and step count (0 = not steered) in one batch."""
    torch.manual_seed(1)
    s = torch.randn(6, 16, dtype=torch.float64)
    alpha = torch.tensor([0.5, 0.0, 1.0, 0.2, 0.5, 2.0], dtype=torch.float64)
    steps = torch.tensor([30, 5, 0, 200, 1, 7])
    got = steer(value, s, alpha, steps)
    for row in range(6):
        want = _reference_steer(value, s[row], alpha[row].item(), int(steps[row]))
        assert torch.allclose(got[row], want, atol=1e-10), row
    assert torch.equal(got[2], s[2]) and torch.equal(got[1], s[1])  # n = 0 or α = 0: untouched
    assert (value(got[[0, 3]]) > value(s[[0, 3]])).all()  # ascent raises the value


def test_td_loss_stops_the_gradient_at_the_target():
    torch.manual_seed(2)
    value = ValueMLP(4, 8).double()
    states = torch.randn(2, 3, 4, dtype=torch.float64)
    rewards = torch.tensor([1.0, -1.0], dtype=torch.float64)
    lengths = torch.tensor([3, 2])
    loss = td_loss(value, states, rewards, lengths)
    with torch.no_grad():
        v = value(states.reshape(6, 4)).reshape(2, 3)
    # trajectory 0: (v0−v1)², (v1−v2)², (v2−r0)²; trajectory 1: (v0−v1)², (v1−r1)²; position 2 is padding
    terms = [(v[0, 0] - v[0, 1]) ** 2, (v[0, 1] - v[0, 2]) ** 2, (v[0, 2] - 1.0) ** 2,
             (v[1, 0] - v[1, 1]) ** 2, (v[1, 1] + 1.0) ** 2]
    assert loss.item() == pytest.approx(sum(terms).item() / 5)
    # with a stopped target, ∂loss/∂V(s_{t+1}) comes only from s_{t+1}'s own term
    s = states.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(td_loss(value, s, rewards, lengths), s)
    (own,) = torch.autograd.grad(((value(s[1, 1][None]) + 1.0) ** 2).sum() / 5, s)
    assert torch.allclose(grad[1, 1], own[1, 1])
    assert torch.count_nonzero(grad[1, 2]) == 0  # padding


def test_td_training_learns_the_terminal_reward():
    """Trajectories whose states point along ±e_0 and end with reward ±1: TD training makes V(s_0) ≈ r."""
    torch.manual_seed(3)
    sign = torch.tensor([1.0, -1.0] * 16)
    states = torch.randn(32, 5, 8) * 0.1
    states[:, :, 0] += sign[:, None]
    value = ValueMLP(8, 16)
    optimizer = torch.optim.Adam(value.parameters(), lr=1e-2)
    for _ in range(400):
        optimizer.zero_grad()
        loss = td_loss(value, states, sign, torch.full((32,), 5))
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        start = value(states[:, 0])
    assert loss.item() < 1e-2 and (start * sign > 0.8).all()


def test_value_layers_are_checked():
    with pytest.raises(ValueError, match="2 or 3 layers"):
        ValueMLP(4, 8, layers=4)


def test_the_published_style_reference_decodes_the_oracle_loops_tokens(tmp_path):
    """``generate_as_published`` (transformers ``generate``, every position steered, as the reference
    code) and the lean oracle loop (the sampled position only) give the same greedy tokens: only the
    last position's logits are sampled and the KV cache is never edited."""
    from transformers import AutoModelForCausalLM

    from vllm_av.recontrol.reference import generate_as_published, recontrol_generate
    from vllm_av.testing.models import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(str(build_tiny_model(tmp_path / "m", hidden_size=64)),
                                                 dtype=torch.float32).eval()
    torch.manual_seed(2)
    value = ValueMLP(hidden_size=64, width=32)
    prompts = [[5, 9, 13, 2], [7, 3], [11, 12, 14, 15, 16, 4]]
    lean = recontrol_generate(model, value, prompts, alpha=2.0, steps=10, max_new_tokens=12)
    published = generate_as_published(model, value, prompts, alpha=2.0, steps=10, max_new_tokens=12)
    assert published == lean
    assert lean != recontrol_generate(model, value, prompts, alpha=0.0, steps=0, max_new_tokens=12), "no steering"
