"""RE-Control in the worker: steer the sampled rows' last hidden states before ``lm_head``.

Each step the runner hooks call :meth:`Steering.prepare` with the batch's requests in order
(one sampled row each: speculative decoding is refused with RE-Control). It groups the rows that
asked for RE-Control by value function, sorts each group by step count (descending) and *arms*
the step's plan. The model's ``compute_logits``, wrapped on the instance, *takes* the armed plan
once and, per group, runs ``x ← x + α ∇V(x)`` from ``x = s`` on the first ``c_k`` rows at step
``k`` (``c_k``: the rows with more than ``k`` steps) -- one batched closed-form gradient per step,
in float32 -- then ``lm_head`` on the edited rows. The KV cache is untouched. Calls without an
armed plan (dummy and profiling runs, prompt logprobs, a step where nobody steers) pass through
unchanged, so rows and steps without RE-Control pay nothing.

The wrap is on the model instance, which every runner's sampling path calls with the sampled rows
``hidden_states[logits_indices]``: the classic runner's ``execute_model`` (vLLM 0.32, 0.33), Model
Runner V2's ``sample`` (0.32, 0.33) and, in 0.34, its ``model_state.compute_sample_logits``, which
calls ``model.compute_logits`` on the same object (read off the 0.33.0 and 0.34.0 wheels).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vllm_av.recontrol.value import input_gradient
from vllm_av.recontrol.valuefile import load_value_function
from vllm_av.serving.protocol import canonical_recontrol

logger = logging.getLogger("vllm.av")


@dataclass
class Group:
    """The rows one value function steers in a step, sorted by step count, descending."""

    value: torch.nn.Module
    rows: torch.Tensor  # long [m], indices into the step's sampled rows
    alpha: torch.Tensor  # float32 [m, 1]
    active: list[int]  # active[k]: how many leading rows take step k


@dataclass
class Plan:
    num_rows: int
    groups: list[Group]


def steer_rows(plan: Plan, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden [rows, H]`` with each steered row replaced by ``s + u`` after its steps."""
    out = hidden
    for group in plan.groups:
        x = hidden.index_select(0, group.rows).float()
        for count in group.active:
            head = x[:count]
            head.addcmul_(group.alpha[:count], input_gradient(group.value, head))
        out = out.index_copy(0, group.rows, x.to(hidden.dtype))
    return out


class Steering:
    """The served value functions and the per-step plan of which rows they steer."""

    def __init__(self, values: dict[str, torch.nn.Module], device: torch.device, max_live_requests: int):
        self.values = values
        self.device = device
        self._settings: dict[str, tuple | None] = {}  # req_id -> (name, α, n) or None
        self._capacity = max(4 * max_live_requests, 64)
        self._last_ids: list[str] | None = None
        self._last_plan: Plan | None = None
        self._armed: Plan | None = None
        self._warned = False

    def _setting(self, req_id: str, requests: dict):
        setting = canonical_recontrol(getattr(requests[req_id].sampling_params, "extra_args", None))
        if setting is not None and setting[0] not in self.values:  # the front validated it: reaching here is a bug
            logger.error("vllm-av: request %s: unknown value function %r; serving it without RE-Control",
                         req_id, setting[0])
            return None
        return setting

    def _build(self, req_ids: Sequence[str], requests: dict) -> Plan | None:
        if len(self._settings) > self._capacity:
            self._settings = {rid: s for rid, s in self._settings.items() if rid in requests}
        by_value: dict[str, list[tuple[int, float, int]]] = {}
        for row, rid in enumerate(req_ids):
            if rid not in self._settings:
                self._settings[rid] = self._setting(rid, requests)
            setting = self._settings[rid]
            if setting is not None:
                by_value.setdefault(setting[0], []).append((row, setting[1], setting[2]))
        if not by_value:
            return None
        groups = []
        for name, members in sorted(by_value.items()):
            members.sort(key=lambda m: -m[2])
            steps = np.array([m[2] for m in members])
            active = [int((steps > k).sum()) for k in range(int(steps[0]))]
            rows = torch.tensor([m[0] for m in members], dtype=torch.long).to(self.device, non_blocking=True)
            alpha = torch.tensor([[m[1]] for m in members], dtype=torch.float32).to(self.device, non_blocking=True)
            groups.append(Group(self.values[name], rows, alpha, active))
        return Plan(len(req_ids), groups)

    def forget(self, req_id: str) -> None:
        """Request ``req_id`` left the runner: drop its setting (an id sent again is read afresh)."""
        self._settings.pop(req_id, None)
        self._last_ids = None

    def prepare(self, req_ids: Sequence[str], requests: dict) -> None:
        """Arm the plan for the step about to run: ``req_ids[i]`` owns sampled row ``i``."""
        if req_ids != self._last_ids:
            self._last_ids = list(req_ids)
            self._last_plan = self._build(req_ids, requests)
        self._armed = self._last_plan

    def take(self, num_rows: int) -> Plan | None:
        """The armed plan, once, if it fits ``num_rows`` sampled rows."""
        plan, self._armed = self._armed, None
        if plan is not None and plan.num_rows != num_rows:
            if not self._warned:
                logger.error("vllm-av: RE-Control plan for %d rows met %d sampled rows; not steering this step",
                             plan.num_rows, num_rows)
                self._warned = True
            return None
        return plan


def install_steering(model, entries: Sequence, max_live_requests: int) -> Steering:
    """Load ``entries`` (validated value functions) onto the model's device; wrap ``model.compute_logits``."""
    device = next(iter(model.parameters())).device
    values = {entry.name: load_value_function(entry.path).to(device) for entry in entries}
    steering = Steering(values, device, max_live_requests)
    original = model.compute_logits

    def compute_logits(hidden_states, *args, **kwargs):
        plan = steering.take(hidden_states.shape[0])
        if plan is not None:
            hidden_states = steer_rows(plan, hidden_states)
        return original(hidden_states, *args, **kwargs)

    model.compute_logits = compute_logits
    logger.info("vllm-av: RE-Control: %d value functions (%s) steer the sampled rows before lm_head",
                len(values), ", ".join(values))
    return steering
