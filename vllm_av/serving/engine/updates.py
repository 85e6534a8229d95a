"""Engine-core side of runtime AV updates: the one place that decides whether an update may run.

The API server (or the offline helper) calls the engine-core utility ``vllm_av_update``
(:func:`update`). The engine core runs utilities between engine steps, and its scheduler holds
every queued and running request, so here an update:

* is refused (409) while any queued or running request uses the AV it would unload or replace
  -- requests never switch weights mid-generation;
* is refused (409) when every slot is taken (capacity is fixed at start: no reallocation);
* reaches every rank through vLLM's ``collective_rpc`` in two phases (:mod:`.worker.runtime`):
  prepare everywhere, then commit everywhere, so a rank that fails leaves no rank changed.

Each admitted request carries the digests of the AVs it was admitted with
(``extra_args["av_versions"]``); a request whose AV was unloaded or replaced between its admission
and its arrival here is finished with an error instead of running on other weights.
"""

from __future__ import annotations

import logging

from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.settings.config import AVConfig, av_config_from
from vllm_av.serving.library.avs import library_for, local_model_dir
from vllm_av.serving.front.mix import MIX_KEY
from vllm_av.serving.worker.slots import commit_av, discard_av, prepare_av, unload_av

logger = logging.getLogger("vllm.av")

UPDATE_METHOD = "vllm_av_update"  # the engine-core utility's name
IN_USE_METHOD = "vllm_av_in_use"  # the engine-core utility counting each loaded AV's requests
VERSIONS_KEY = "av_versions"  # extra_args: {AV name: digest} of the AVs a request was admitted with


class _Library:
    """The engine core's view of the loaded AVs: name -> digest, and the slot count."""

    def __init__(self, config: AVConfig, model_dir: str | None):
        entries = library_for(config, model_dir)
        self.digests = {entry.name: entry.digest for entry in entries}
        self.capacity = config.capacity(len(entries))


def _library(core) -> _Library | None:
    """This engine core's :class:`_Library` when runtime updates are on, else None."""
    library = core.__dict__.get("_vllm_av_library", False)
    if library is False:
        config = av_config_from(core.vllm_config.additional_config)
        library = None
        if config is not None and config.allow_runtime_updates:
            library = _Library(config, local_model_dir(core.vllm_config.model_config.model))
        core._vllm_av_library = library
    return library


def _uses(request, name: str) -> bool:
    extra = getattr(request.sampling_params, "extra_args", None) or {}
    return any(pair[0] == name for pair in extra.get(MIX_KEY) or ())


def requests_using(core, name: str) -> int:
    """How many queued or running requests of ``core``'s scheduler mix AV ``name``."""
    return sum(1 for request in core.scheduler.requests.values() if _uses(request, name))


def in_use(core) -> dict[str, int]:
    """The ``vllm_av_in_use`` utility: each loaded AV's count of queued or running requests
    (empty when runtime updates are off)."""
    library = _library(core)
    return {name: requests_using(core, name) for name in library.digests} if library is not None else {}


def _answer(status: int, message: str = "", **fields) -> dict:
    return {"status": status, "error": message, **fields} if message else {"status": status, **fields}


def update(core, op: str, name: str, entry: dict | None = None, replace: bool = False) -> dict:
    """The ``vllm_av_update`` utility: ``op`` ``load`` (``entry``: a validated ``AVEntry`` as a dict)
    or ``unload``. Returns ``{"status": 200, "slot": ...}`` or ``{"status": 4xx, "error": ...}``."""
    library = _library(core)
    if library is None:
        return _answer(404, "runtime AV updates are off; start the server with --av-allow-runtime-updates")
    loaded = library.digests
    if op == "unload" and name not in loaded:
        return _answer(404, f"AV {name!r} is not loaded")
    if op == "load" and name in loaded and not replace:
        return _answer(409, f"AV {name!r} is already loaded; pass \"replace\": true to replace it")
    if op == "load" and name not in loaded and len(loaded) >= library.capacity:
        return _answer(409, f"all {library.capacity} AV slots are in use (--av-max-loaded); unload an AV first")
    if name in loaded:
        in_use = requests_using(core, name)
        if in_use:
            what = "replace" if op == "load" else "unload"
            return _answer(409, f"AV {name!r} is used by {in_use} queued or running request(s); "
                                f"{what} it when they have finished", in_use=in_use)
    if op == "unload":
        slot = core.collective_rpc(unload_av, args=(name,))[0]
        del loaded[name]
        logger.info("vllm-av: AV %s unloaded (slot %d)", name, slot)
        return _answer(200, slot=slot)
    if op != "load" or entry is None:
        return _answer(400, f"unknown AV update {op!r}")
    try:
        core.collective_rpc(prepare_av, args=(entry,))
    except Exception as exc:  # noqa: BLE001 -- any rank's refusal: undo everywhere, report it
        core.collective_rpc(discard_av, args=(name,))
        return _answer(400, f"{entry['path']}: {_worker_message(exc)}")
    slot = core.collective_rpc(commit_av, args=(name,))[0]
    replaced = name in loaded
    loaded[name] = entry["digest"]
    logger.info("vllm-av: AV %s %s (slot %d, rank %d, %d modules)", name, "replaced" if replaced else "loaded",
                slot, entry["rank"], len(entry["modules"]))
    return _answer(200, slot=slot, replaced=replaced)


def _worker_message(exc: Exception) -> str:
    """The message a rank raised, out of the executor's wrapping ("Worker failed with error '...', please
    check ...", or a remote traceback): the last line naming vllm-av, else the error's first line."""
    text = str(exc).strip()
    ours = [line for line in text.splitlines() if "vllm-av: " in line]
    if not ours:
        return text.splitlines()[0] if text else type(exc).__name__
    return ours[-1].split("vllm-av: ", 1)[1].split("', please check the stack trace")[0]


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
