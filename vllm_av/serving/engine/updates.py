"""Engine-core side of runtime AV updates: the one place that decides whether an update may run.

The API server (or the offline helper) calls the engine-core utility ``vllm_av_update``
(:func:`update`). The engine core runs utilities between engine steps, and its scheduler holds
every queued and running request, so here an update:

* is refused (409) while any queued or running request uses the AV it would unload or replace
  -- requests never switch weights mid-generation;
* is refused (409) when every slot is taken (capacity is fixed at start: no reallocation);
* reaches every rank through vLLM's ``collective_rpc`` in two phases (:mod:`vllm_av.serving.worker.slots`):
  prepare everywhere, then commit everywhere, so a rank that fails leaves no rank changed. Each
  rank answers with a :class:`~vllm_av.serving.protocol.StepResult` (its slot, or the error that
  names the problem), never an exception whose text must be searched.

Each admitted request carries the digests of the AVs it was admitted with
(``extra_args["av_versions"]``); a request whose AV was unloaded or replaced between its admission
and its arrival here is finished with an error instead of running on other weights.
"""

from __future__ import annotations

import logging
import weakref

from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.library.avs import library_for, local_model_dir
from vllm_av.serving.protocol import IN_USE_METHOD, UPDATE_METHOD, VERSIONS_KEY, Answer, answer, canonical_mix
from vllm_av.serving.settings.config import AVConfig, av_config_from
from vllm_av.serving.worker.slots import commit_av, discard_av, prepare_av, unload_av

logger = logging.getLogger("vllm.av")


_libraries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine core -> its _Library or None


class _Library:
    """The engine core's view of the loaded AVs: name -> digest, and the slot count."""

    def __init__(self, config: AVConfig, model_dir: str | None):
        entries = library_for(config, model_dir)
        self.digests = {entry.name: entry.digest for entry in entries}
        self.capacity = config.capacity(len(entries))


def _library(core) -> _Library | None:
    """This engine core's :class:`_Library` when runtime updates are on, else None."""
    if core not in _libraries:
        config = av_config_from(core.vllm_config.additional_config)
        library = None
        if config is not None and config.allow_runtime_updates:
            library = _Library(config, local_model_dir(core.vllm_config.model_config.model))
        _libraries[core] = library
    return _libraries[core]


def _uses(request, name: str) -> bool:
    return any(av == name for av, _ in canonical_mix(getattr(request.sampling_params, "extra_args", None)))


def requests_using(core, name: str) -> int:
    """How many queued or running requests of ``core``'s scheduler mix AV ``name``."""
    return sum(1 for request in core.scheduler.requests.values() if _uses(request, name))


def in_use(core) -> dict[str, int]:
    """The ``vllm_av_in_use`` utility: each loaded AV's count of queued or running requests
    (empty when runtime updates are off)."""
    library = _library(core)
    return {name: requests_using(core, name) for name in library.digests} if library is not None else {}


def update(core, op: str, name: str, entry: dict | None = None, replace: bool = False) -> Answer:
    """The ``vllm_av_update`` utility: ``op`` ``load`` (``entry``: a validated ``AVEntry`` as a dict)
    or ``unload``. Returns ``{"status": 200, "slot": ...}`` or ``{"status": 4xx, "error": ...}``."""
    library = _library(core)
    if library is None:
        return answer(404, "runtime AV updates are off; start the server with --av-allow-runtime-updates")
    loaded = library.digests
    if op == "unload" and name not in loaded:
        return answer(404, f"AV {name!r} is not loaded")
    if op == "load" and name in loaded and not replace:
        return answer(409, f"AV {name!r} is already loaded; pass \"replace\": true to replace it")
    if op == "load" and name not in loaded and len(loaded) >= library.capacity:
        return answer(409, f"all {library.capacity} AV slots are in use (--av-max-loaded); unload an AV first")
    if name in loaded:
        in_use = requests_using(core, name)
        if in_use:
            what = "replace" if op == "load" else "unload"
            return answer(409, f"AV {name!r} is used by {in_use} queued or running request(s); "
                                f"{what} it when they have finished", in_use=in_use)
    if op == "unload":
        slot = core.collective_rpc(unload_av, args=(name,))[0]["slot"]
        del loaded[name]
        logger.info("vllm-av: AV %s unloaded (slot %d)", name, slot)
        return answer(200, slot=slot)
    if op != "load" or entry is None:
        return answer(400, f"unknown AV update {op!r}")
    error = _prepare_everywhere(core, entry)
    if error is not None:  # any rank's refusal: undo everywhere, report it
        core.collective_rpc(discard_av, args=(name,))
        return answer(400, f"{entry['path']}: {error}")
    slot = core.collective_rpc(commit_av, args=(name,))[0]["slot"]
    replaced = name in loaded
    loaded[name] = entry["digest"]
    logger.info("vllm-av: AV %s %s (slot %d, rank %d, %d modules)", name, "replaced" if replaced else "loaded",
                slot, entry["rank"], len(entry["modules"]))
    return answer(200, slot=slot, replaced=replaced)


def _prepare_everywhere(core, entry: dict) -> str | None:
    """Prepare ``entry`` on every rank; the first rank's error (None: every rank is ready).

    A rank reports a bad AV in its answer; an exception here means a rank failed outright (its
    executor's message, first line)."""
    try:
        results = core.collective_rpc(prepare_av, args=(entry,))
    except Exception as exc:  # noqa: BLE001 -- a rank died or the executor failed: report it, keep serving
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return next((result["error"] for result in results if "error" in result), None)


def refusal(core, request) -> str | None:
    """Why ``request`` may not run (an AV it was admitted with was unloaded or replaced since), or None."""
    library = _library(core)
    extra = getattr(request.sampling_params, "extra_args", None) if request.sampling_params else None
    if library is None or not isinstance(extra, dict) or not extra.get(VERSIONS_KEY):
        return None
    for name, digest in extra[VERSIONS_KEY].items():
        if library.digests.get(name) != digest:
            return f"AV {name!r} was unloaded or replaced while request {request.request_id} was admitted; retry it"
    return None


def install() -> None:
    """Add the ``vllm_av_update`` and ``vllm_av_in_use`` utilities to vLLM's engine core and guard
    its ``add_request``."""
    core_class = points.ENGINE_CORE.get()
    original_add = points.ENGINE_CORE_ADD_REQUEST.get()

    def vllm_av_update(self, op: str, name: str, entry: dict | None = None, replace: bool = False) -> dict:
        return update(self, op, name, entry, replace)

    def add_request(self, request, *args, **kwargs):
        reason = refusal(self, request)
        if reason is None:
            return original_add(self, request, *args, **kwargs)
        logger.warning("vllm-av: %s", reason)
        send_error = getattr(self, "_send_error_outputs_to_client", None)
        if send_error is None:  # the in-process engine core: the caller sees the error
            raise ValueError(f"vllm-av: {reason}")
        send_error([request.request_id], request.client_index)

    setattr(core_class, UPDATE_METHOD, vllm_av_update)
    setattr(core_class, IN_USE_METHOD, in_use)
    points.ENGINE_CORE_ADD_REQUEST.replace(add_request)
