"""Frontend side (API server / offline ``LLM`` process): admit requests' mixes, list the library.

Every request passes ``InputProcessor.process_inputs`` before it reaches the engine, on the
OpenAI server and offline alike. There the ``av`` entry of ``SamplingParams.extra_args``
(from ``vllm_xargs`` or set directly) is validated -- a bad mix raises vLLM's validation
error, which the server answers with HTTP 400 -- and replaced by its canonical form, and the
request gets a prefix-cache salt per canonical mix so KV blocks computed under one mix are
never reused under another.

Beam search builds its own sampling parameters without ``extra_args``, so a mix there would
be silently dropped: such requests are refused with HTTP 400 instead.

A request's RE-Control setting (``recontrol``, ``recontrol_alpha``, ``recontrol_steps``;
:mod:`.recontrol_request`) is validated and canonicalised the same way. It needs no salt: steering
changes which tokens are sampled, never the KV computed for a given token sequence.

``GET /v1/av`` lists the served AVs and value functions, beside vLLM's ``GET /v1/models``, and a
JSON object as ``vllm_xargs.av`` is accepted over HTTP (``serving/front/http.py``). With
``--av-allow-runtime-updates``, ``POST /v1/av/load`` and ``/v1/av/unload`` change the library
while serving (:mod:`.runtime`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fastapi import Request  # the runtime-update routes' parameter type, resolved by FastAPI from this module

from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.front import runtime
from vllm_av.serving.settings.config import AVConfig, av_config_from
from vllm_av.serving.engine.updates import IN_USE_METHOD, UPDATE_METHOD, VERSIONS_KEY
from vllm_av.serving.front.http import ObjectMixMiddleware
from vllm_av.serving.library.avs import library_for, local_model_dir
from vllm_av.serving.front.mix import MIX_KEY, MixError, mix_to_str, parse_mix
from vllm_av.serving.front.recontrol import ALPHA_KEY, RECONTROL_KEY, RECONTROL_KEYS, STEPS_KEY, parse_recontrol
from vllm_av.serving.library.values import value_library_for

logger = logging.getLogger("vllm.av")


class AVMixRejected(points.VALIDATION_ERROR.get(), ValueError):
    """A request's AV mix was rejected: HTTP 400 on the server, a ``ValueError`` offline."""


# AVConfig fields that are not request limits
_NOT_LIMITS = ("path", "stock_lora", "cpu_blend", "library_digest", "recontrol_path", "allow_runtime_updates",
               "max_loaded")


@dataclass
class ServedLibrary:
    """The front's view of what is served: what requests may mix, and what ``GET /v1/av`` lists.

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
            "limits": {k: v for k, v in self.config.to_dict().items()
                       if k not in _NOT_LIMITS and (self.value_functions or not k.startswith("recontrol_"))},
            "lora_requests": self.config.stock_lora,
        }
        if self.config.allow_runtime_updates:
            body["runtime_updates"] = {"max_loaded": self.capacity, "loaded": len(self.entries)}
        return body


_served: ServedLibrary | None = None


def admit(params, served: ServedLibrary | None) -> tuple:
    """The canonical mix of ``params`` (empty for none); raise ``MixError`` for a bad one."""
    extra = getattr(params, "extra_args", None)
    if not isinstance(extra, dict) or MIX_KEY not in extra:
        return ()
    if served is None:
        raise MixError("this server does not serve AVs (start it with --enable-av --av-path DIR)")
    mix = parse_mix(extra[MIX_KEY], served.names | served.updating, served.config)
    for name, _ in mix:
        if name in served.updating:
            raise MixError(f"av {name!r} is being loaded, replaced or unloaded right now; retry")
    return mix


def admit_recontrol(params, served: ServedLibrary | None):
    """The canonical RE-Control setting of ``params`` (None: off); raise ``MixError`` for a bad one."""
    extra = getattr(params, "extra_args", None)
    if not isinstance(extra, dict) or not any(key in extra for key in RECONTROL_KEYS):
        return None
    if served is None or not served.value_functions:
        raise MixError("this server serves no RE-Control value functions (start it with --enable-av --av-path DIR "
                       "--av-recontrol-path DIR)")
    return parse_recontrol(extra, served.value_names, served.config)


def canonicalise(extra: dict, mix: tuple, setting, served: ServedLibrary | None) -> str | None:
    """Leave the canonical mix and RE-Control setting in ``extra``; the prefix-cache salt for the mix.

    The salt names each AV's files digest, so KV computed with other weights under the same name
    (an AV replaced at runtime, or a library changed between runs) is never reused. With runtime
    updates the digests also travel in ``extra`` for the engine core's check (:mod:`.engine_updates`).
    """
    salt = None
    if MIX_KEY in extra:
        if mix:
            extra[MIX_KEY] = [list(pair) for pair in mix]
            digests = {name: served.digests.get(name, "") for name, _ in mix}
            salt = f"av:{mix_to_str(mix)}|{','.join(digests.values())}"
            if served.config.allow_runtime_updates:
                extra[VERSIONS_KEY] = digests
        else:
            del extra[MIX_KEY]
    for key in (ALPHA_KEY, STEPS_KEY, RECONTROL_KEY):
        extra.pop(key, None)
    if setting is not None:
        extra[RECONTROL_KEY] = list(setting)
    return salt


def _install_input_processor() -> None:
    original_init = points.INPUT_PROCESSOR_INIT.get()
    original_process = points.PROCESS_INPUTS.get()

    def __init__(self, vllm_config, *args, **kwargs):
        global _served
        original_init(self, vllm_config, *args, **kwargs)
        config = av_config_from(vllm_config.additional_config)
        self._vllm_av = None
        if config is not None:
            model_dir = local_model_dir(vllm_config.model_config.model)
            entries = library_for(config, model_dir)
            self._vllm_av = _served = ServedLibrary(config, entries, value_library_for(config, model_dir), model_dir)

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        served = getattr(self, "_vllm_av", None)
        try:
            mix = admit(params, served)
        except MixError as exc:
            raise AVMixRejected(str(exc), parameter="vllm_xargs.av") from None
        try:
            setting = admit_recontrol(params, served)
        except MixError as exc:
            raise AVMixRejected(str(exc), parameter=f"vllm_xargs.{RECONTROL_KEY}") from None
        # vLLM's engines pass lora_request by keyword.
        if served is not None and not served.config.stock_lora and kwargs.get("lora_request") is not None:
            raise AVMixRejected("this server serves AVs only; start it with --enable-lora to serve LoRA adapters too",
                                parameter="lora_request")
        request = original_process(self, request_id, prompt, params, *args, **kwargs)
        sampling = request.sampling_params
        if sampling is not None and isinstance(sampling.extra_args, dict):
            salt = canonicalise(sampling.extra_args, mix, setting, served)
            if salt:
                request.cache_salt = f"{request.cache_salt}|{salt}" if request.cache_salt else salt
        return request

    points.INPUT_PROCESSOR_INIT.replace(__init__)
    points.PROCESS_INPUTS.replace(process_inputs)


def _install_beam_search_guard() -> None:
    """Refuse ``use_beam_search`` with an ``av`` mix or RE-Control (beam search would drop them)."""
    for point in (points.COMPLETION_BEAM_SEARCH, points.CHAT_BEAM_SEARCH):
        original = point.get()

        def to_beam_search_params(self, *args, _original=original, **kwargs):
            for key in (MIX_KEY, *RECONTROL_KEYS):
                if self.vllm_xargs and key in self.vllm_xargs:
                    what = "av mixes" if key == MIX_KEY else "RE-Control"
                    raise AVMixRejected(f"{what} cannot be used with beam search (use_beam_search)",
                                        parameter=f"vllm_xargs.{key}")
            return _original(self, *args, **kwargs)

        point.replace(to_beam_search_params)


def _error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


def _engine_core(raw_request):
    """The API server's client of the engine core, which runs vllm-av's engine-core utilities."""
    return raw_request.app.state.engine_client.engine_core


async def _run_update(raw_request, flow):
    """Run a runtime-update ``flow(body, call)`` for an HTTP request; a refusal is its status + message."""
    from fastapi.responses import JSONResponse

    try:
        body = await raw_request.json()
    except ValueError:
        return _error(400, "the body must be a JSON object")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    engine_core = _engine_core(raw_request)

    async def call(*args):
        return await engine_core.call_utility_async(UPDATE_METHOD, *args)

    try:
        return JSONResponse(await flow(body, call))
    except runtime.AVUpdateError as exc:
        return _error(exc.status, str(exc))
    except Exception as exc:  # noqa: BLE001 -- an engine failure: say so, keep serving
        logger.exception("vllm-av: runtime AV update failed")
        return _error(500, f"the AV update failed in the engine: {exc}")


def _install_listing_route() -> None:
    """Add ``GET /v1/av``, ``POST /v1/av/load`` and ``/v1/av/unload``, and the object-mix middleware,
    wherever vLLM attaches its ``/v1/models`` router."""
    from fastapi import APIRouter
    from fastapi.responses import JSONResponse

    router = APIRouter()

    @router.get("/v1/av")
    async def list_avs(raw_request: Request):
        if _served is None:
            return _error(404, "AV serving is not enabled")
        in_use = None
        if _served.config.allow_runtime_updates:  # what an unload or replace would wait for
            in_use = await _engine_core(raw_request).call_utility_async(IN_USE_METHOD)
        return JSONResponse(_served.listing(in_use))

    @router.post("/v1/av/load")
    async def load_av(raw_request: Request):
        return await _run_update(raw_request, lambda body, call: runtime.load(
            _served, call, body.get("name"), body.get("path"), body.get("replace", False)))

    @router.post("/v1/av/unload")
    async def unload_av(raw_request: Request):
        return await _run_update(raw_request, lambda body, call: runtime.unload(_served, call, body.get("name")))

    original_attach = points.ATTACH_ROUTER.get()

    def attach_router(app, *args, **kwargs):
        result = original_attach(app, *args, **kwargs)
        app.include_router(router)
        app.add_middleware(ObjectMixMiddleware)
        return result

    points.ATTACH_ROUTER.replace(attach_router)


def install() -> None:
    """Install the request-admission hooks and the listing route (idempotent via plugin.register)."""
    _install_input_processor()
    _install_beam_search_guard()
    _install_listing_route()
