"""Runtime AV updates from the front: validate, ask the engine core, then change what requests may use.

One flow for ``POST /v1/av/load`` / ``/v1/av/unload`` (:mod:`.http`) and for the offline helper
:class:`AVRuntime` over ``vllm.LLM``:

1. a new AV is validated here exactly as the library is at start (safetensors only, shapes against
   the model, rank limit, NaN/Inf, links, name, compatibility class): a bad one is a 400 naming
   the file and nothing reaches the engine;
2. while the update runs, its AV name is *updating*: requests naming it are refused (400, "retry")
   rather than admitted against weights that are about to change;
3. the engine core (:mod:`vllm_av.serving.engine.updates`) refuses updates to AVs in use (409) or beyond the
   fixed capacity (409), else loads the AV on every rank between two engine steps;
4. only then does the front's library change (``GET /v1/av``, mix validation, prefix-cache salts).

Salts carry each AV's files digest, so KV computed with an AV's old weights is never reused after
it is replaced with other files.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor

from vllm_av.serving.front.served import served_by
from vllm_av.serving.library.avs import AVLibraryError, load_av
from vllm_av.serving.protocol import IN_USE_METHOD, UPDATE_METHOD, AVUpdateError


async def load(served, call, name: object, path: object, replace: bool = False) -> dict:
    """Load AV ``name`` from directory ``path`` (``replace``: over a loaded AV of that name).

    ``served``: the front's :class:`~vllm_av.serving.front.served.ServedLibrary`; ``call(*args)``: an
    awaitable engine-core utility call of :data:`UPDATE_METHOD`. Returns the AV's listing entry.
    """
    _require_updates(served)
    if not isinstance(name, str) or not isinstance(path, str) or not path:
        raise AVUpdateError(400, "a load needs \"name\" and \"path\" (strings)")
    if not isinstance(replace, bool):
        raise AVUpdateError(400, "\"replace\" must be true or false")
    try:
        entry = await asyncio.to_thread(load_av, path, name, served.config, served.model_dir)
    except AVLibraryError as exc:
        raise AVUpdateError(400, str(exc)) from None
    async with _updating(served, name):
        answer = await call("load", name, _as_dict(entry), replace)
        _raise_refusal(answer)
        served.put(entry)
    return {**entry.summary(), "replaced": answer.get("replaced", False)}


async def unload(served, call, name: object) -> dict:
    """Unload AV ``name``; refused (409) while queued or running requests use it."""
    _require_updates(served)
    if not isinstance(name, str):
        raise AVUpdateError(400, "an unload needs \"name\" (a string)")
    if name not in served.names:
        raise AVUpdateError(404, f"AV {name!r} is not loaded")
    async with _updating(served, name):
        answer = await call("unload", name, None, False)
        _raise_refusal(answer)
        served.drop(name)
    return {"name": name, "unloaded": True}


def _require_updates(served) -> None:
    if served is None:
        raise AVUpdateError(404, "AV serving is not enabled")
    if not served.config.allow_runtime_updates:
        raise AVUpdateError(404, "runtime AV updates are off; start the server with --av-allow-runtime-updates")


def _raise_refusal(answer: dict) -> None:
    if answer.get("status") != 200:
        raise AVUpdateError.from_answer(answer)


def _as_dict(entry) -> dict:
    """The entry as plain data (the engine-core utility's arguments travel as msgpack)."""
    return {**dataclasses.asdict(entry), "modules": list(entry.modules)}


class _updating:
    """Mark ``name`` as updating (requests naming it are refused) for the duration; one update at a time."""

    def __init__(self, served, name: str):
        self.served, self.name = served, name

    async def __aenter__(self):
        if self.served.updating:
            raise AVUpdateError(409, f"another AV update ({', '.join(sorted(self.served.updating))}) is running; retry")
        self.served.updating.add(self.name)

    async def __aexit__(self, *exc_info):
        self.served.updating.discard(self.name)


class AVRuntime:
    """Load, replace and unload AVs of an offline ``vllm.LLM`` started with ``allow_runtime_updates``.

    >>> runtime = AVRuntime(llm)
    >>> runtime.load("pirate", "/avs/pirate")          # then SamplingParams(extra_args={"av": {"pirate": 1}})
    >>> runtime.load("pirate", "/avs/pirate-v2", replace=True)
    >>> runtime.unload("pirate")

    Errors raise :class:`AVUpdateError` (``.status`` as the server would answer).
    """

    def __init__(self, llm):
        engine = llm.llm_engine
        self._served = served_by(engine.input_processor)
        self._client = engine.engine_core

    def _call(self, method: str, *args) -> dict:
        if hasattr(self._client, "call_utility"):  # the engine core in its own process
            return self._client.call_utility(method, *args)
        return getattr(self._client.engine_core, method)(*args)  # in-process engine core

    def _run(self, flow, *args):
        async def call(*call_args):
            return self._call(UPDATE_METHOD, *call_args)

        update = flow(self._served, call, *args)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: no event loop in this thread
            return asyncio.run(update)
        with ThreadPoolExecutor(1) as pool:  # called inside a running loop (Jupyter, async code): block it, as LLM does
            return pool.submit(asyncio.run, update).result()

    def load(self, name: str, path: str, replace: bool = False) -> dict:
        """Load AV ``name`` from ``path``; see :func:`load`."""
        return self._run(load, name, path, replace)

    def unload(self, name: str) -> dict:
        """Unload AV ``name``; see :func:`unload`."""
        return self._run(unload, name)

    def list(self) -> list[dict]:
        """The loaded AVs, as ``GET /v1/av`` lists them (with each AV's ``in_use`` count)."""
        if self._served is None:
            return []
        in_use = self._call(IN_USE_METHOD) if self._served.config.allow_runtime_updates else None
        return self._served.listing(in_use)["data"]
