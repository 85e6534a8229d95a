"""What crosses processes: request keys, engine-core utility names, answers and the errors they carry.

The front (API server or offline ``LLM``), the engine core and the workers run in different
processes and meet only here: a request's ``extra_args`` keys and their canonical forms (written
by the front, read by the engine core and the workers), the names of the engine-core utilities
the front calls, and the structured answers those utilities and the workers' update steps return
(never an exception whose text someone has to search).
"""

from __future__ import annotations

from typing import TypedDict

# --- a request's extra_args (SamplingParams.extra_args; vllm_xargs over HTTP) ---
MIX_KEY = "av"  # a request's AV mix; canonical: [[name, scale], ...] sorted by name, no zero scales
RECONTROL_KEY = "recontrol"  # a request's RE-Control setting; canonical: [value function, alpha, steps]
ALPHA_KEY = "recontrol_alpha"
STEPS_KEY = "recontrol_steps"
RECONTROL_KEYS = (RECONTROL_KEY, ALPHA_KEY, STEPS_KEY)
VERSIONS_KEY = "av_versions"  # {AV name: files digest} of the AVs a request was admitted with

# --- engine-core utilities (runtime AV updates) ---
UPDATE_METHOD = "vllm_av_update"  # (op "load" | "unload", name, entry as a dict or None, replace) -> Answer
IN_USE_METHOD = "vllm_av_in_use"  # () -> {AV name: queued or running requests using it}


class Answer(TypedDict, total=False):
    """An update's outcome: ``status`` as the HTTP answer (200, 400, 404, 409), ``error`` when refused."""

    status: int
    error: str
    slot: int
    replaced: bool
    in_use: int


def answer(status: int, error: str = "", **fields) -> Answer:
    """An :class:`Answer` (``error`` only when there is one)."""
    return Answer(status=status, **({"error": error} if error else {}), **fields)


class StepResult(TypedDict, total=False):
    """What one worker returns for one step of a runtime update: ``slot``, or ``error`` naming the problem."""

    slot: int
    error: str


class AVUpdateError(Exception):
    """A refused runtime update: ``status`` is the HTTP status (400, 404, 409), the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @classmethod
    def from_answer(cls, answer: Answer) -> AVUpdateError:
        return cls(answer.get("status", 500), answer.get("error", "the engine refused the update"))


def canonical_mix(extra: dict | None) -> tuple[tuple[str, float], ...]:
    """The canonical mix the front left in a request's ``extra_args`` (empty: none)."""
    return tuple((name, float(scale)) for name, scale in ((extra or {}).get(MIX_KEY) or ()))


def canonical_recontrol(extra: dict | None) -> tuple[str, float, int] | None:
    """The canonical RE-Control setting the front left in a request's ``extra_args`` (None: off)."""
    setting = (extra or {}).get(RECONTROL_KEY)
    if setting is None:
        return None
    name, alpha, steps = setting
    return name, float(alpha), int(steps)
