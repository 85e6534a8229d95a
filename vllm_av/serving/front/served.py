"""The front's view of what is served, one per input processor (API server or offline ``LLM``).

:class:`ServedLibrary` is what requests may mix and what ``GET /v1/av`` lists. It is built when
vLLM builds its ``InputProcessor`` (:mod:`.admission`) and kept here, keyed by that processor, not
on vLLM's object; the HTTP routes find it from the app's engine client and keep it on
``app.state`` (:mod:`.http`), the offline helper from the ``LLM``'s engine (:mod:`.runtime`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from vllm_av.serving.settings.config import AVConfig, request_limits

_served: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # input processor -> its ServedLibrary


@dataclass
class ServedLibrary:
    """What requests may mix, and what ``GET /v1/av`` lists.

    With runtime updates it changes (:meth:`put`, :meth:`drop`) only once every rank has the
    change; ``updating`` names the AVs an update is changing right now (requests naming them are
    refused until it is done).
    """

    config: AVConfig
    entries: list
    value_functions: list = field(default_factory=list)
    model_dir: str | None = None
    updating: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.entries = list(self.entries)
        self.capacity = self.config.capacity(len(self.entries))  # fixed at start

    @property
    def names(self) -> frozenset[str]:
        return frozenset(entry.name for entry in self.entries)

    @property
    def digests(self) -> dict[str, str]:
        return {entry.name: entry.digest for entry in self.entries}

    def put(self, entry) -> None:
        """Serve ``entry`` (a runtime load; replaces a loaded AV of the same name)."""
        self.entries = sorted([e for e in self.entries if e.name != entry.name] + [entry], key=lambda e: e.name)

    def drop(self, name: str) -> None:
        """Stop serving AV ``name`` (a runtime unload)."""
        self.entries = [e for e in self.entries if e.name != name]

    @property
    def value_names(self) -> frozenset[str]:
        return frozenset(entry.name for entry in self.value_functions)

    def listing(self, in_use: dict[str, int] | None = None) -> dict:
        """The body of ``GET /v1/av`` (the RE-Control limits only where value functions are served,
        the slots only where runtime updates are on). ``in_use``: the engine's count of queued or
        running requests per AV, listed with each AV when given."""
        data = [entry.summary() for entry in self.entries]
        if in_use is not None:
            data = [{**av, "in_use": in_use.get(av["name"], 0)} for av in data]
        body = {
            "object": "list",
            "data": data,
            "value_functions": [entry.summary() for entry in self.value_functions],
            "limits": {k: v for k, v in request_limits(self.config).items()
                       if self.value_functions or not k.startswith("recontrol_")},
            "lora_requests": self.config.stock_lora,
        }
        if self.config.allow_runtime_updates:
            body["runtime_updates"] = {"max_loaded": self.capacity, "loaded": len(self.entries)}
        return body


def serve_for(input_processor, served: ServedLibrary | None) -> None:
    """Record what ``input_processor`` serves (None: AV serving is off there)."""
    if served is None:
        _served.pop(input_processor, None)
    else:
        _served[input_processor] = served


def served_by(input_processor) -> ServedLibrary | None:
    """What ``input_processor`` serves, or None where AV serving is off."""
    return _served.get(input_processor)
