"""The AV routes of the OpenAI server, and a JSON object accepted as the HTTP mix.

``GET /v1/av`` lists the served AVs and value functions, beside vLLM's ``GET /v1/models``. With
``--av-allow-runtime-updates``, ``POST /v1/av/load`` and ``/v1/av/unload`` change the library
while serving (:mod:`.runtime`). Their bodies and answers are declared as pydantic models, as
vLLM's own ``/v1/load_lora_adapter`` is, so ``/openapi.json`` describes them; the bodies are
checked by the update flows themselves, whose 400 messages name the field. The front's library
lives on ``app.state.vllm_av``, taken from the app's engine client at the first call.

``"vllm_xargs": {"av": {"pirate": 1, "shouting": 0.5}}``: vLLM's request schema types
``vllm_xargs`` values as ``str | int | float | list[...]``, so an object there fails pydantic
validation with a long error before any plugin code runs. :class:`ObjectMixMiddleware` rewrites
such an object into the string form (``"pirate:1,shouting:0.5"``) before vLLM parses the body; the
mix is then validated as any other. Bodies without an object-valued ``vllm_xargs.av`` pass
through byte for byte.
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from vllm_av.serving.compat import patch_points as points
from vllm_av.serving.front import runtime
from vllm_av.serving.front.served import ServedLibrary, served_by
from vllm_av.serving.protocol import IN_USE_METHOD, MIX_KEY, UPDATE_METHOD, AVUpdateError

logger = logging.getLogger("vllm.av")


class AVLoadRequest(BaseModel):
    """``POST /v1/av/load``: serve the AV in ``path`` as ``name``."""

    name: str = Field(description="the name requests will mix it by ([A-Za-z0-9_.-])")
    path: str = Field(description="the AV directory on the server (a PEFT LoRA adapter, av.json optional)")
    replace: bool = Field(False, description="replace a loaded AV of that name")


class AVUnloadRequest(BaseModel):
    """``POST /v1/av/unload``: stop serving AV ``name``."""

    name: str


class AVSummary(BaseModel):
    """One served AV, as ``GET /v1/av`` lists it."""

    name: str
    rank: int
    modules: int
    description: str
    compatibility: str = Field(description="same_base, same_architecture or unknown")
    path: str
    digest: str = Field(description="of the AV's files: which weights its requests run with")
    in_use: int | None = Field(None, description="queued or running requests using it (with runtime updates)")


class AVLoaded(AVSummary):
    """``POST /v1/av/load``'s answer."""

    replaced: bool


class AVUnloaded(BaseModel):
    """``POST /v1/av/unload``'s answer."""

    name: str
    unloaded: bool


class ValueFunctionSummary(BaseModel):
    """One served RE-Control value function."""

    name: str
    layers: int
    width: int
    hidden_size: int
    reward: str
    description: str
    compatibility: str
    path: str


class AVListing(BaseModel):
    """``GET /v1/av``."""

    object: str = "list"
    data: list[AVSummary]
    value_functions: list[ValueFunctionSummary]
    limits: dict[str, float | int | bool] = Field(description="this server's request limits (--av-*)")
    lora_requests: bool = Field(description="whether ordinary LoRA requests are served too")
    runtime_updates: dict[str, int] | None = Field(None, description="max_loaded and loaded AVs (with runtime updates)")


class AVErrorBody(BaseModel):
    """A refused AV request: ``{"error": {"message": ..., "code": status}}``."""

    error: dict[str, str | int]


def rewrite_body(body: bytes) -> bytes | None:
    """The body with an object ``vllm_xargs.av`` in string form, or None to leave it unchanged."""
    if b"vllm_xargs" not in body:
        return None
    try:
        request = json.loads(body)
    except ValueError:
        return None
    xargs = request.get("vllm_xargs") if isinstance(request, dict) else None
    mix = xargs.get(MIX_KEY) if isinstance(xargs, dict) else None
    if not isinstance(mix, dict) or not mix:
        return None
    if not all(isinstance(k, str) and not set(k) & {",", ":"} for k in mix):
        return None
    if not all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in mix.values()):
        return None
    xargs[MIX_KEY] = ",".join(f"{name}:{scale if isinstance(scale, str) else json.dumps(scale)}" for name, scale in mix.items())
    return json.dumps(request).encode()


class ObjectMixMiddleware:
    """Pure ASGI middleware: JSON POST bodies get :func:`rewrite_body` applied."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not _is_json(scope):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        new_body = rewrite_body(body)
        if new_body is not None:
            body = new_body
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        return await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}], receive), send)


def _is_json(scope) -> bool:
    return any(k == b"content-type" and v.split(b";")[0].strip() == b"application/json" for k, v in scope["headers"])


def _replay(messages: list, receive):
    """A ``receive`` that returns ``messages`` first, then defers to the real one."""
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed


def served_of(app) -> ServedLibrary | None:
    """What the app's front serves: ``app.state.vllm_av``, from its engine client's input processor."""
    state = app.state
    if not hasattr(state, "vllm_av"):
        state.vllm_av = served_by(state.engine_client.input_processor)
    return state.vllm_av


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "code": status}}, status_code=status)


def _engine_core(raw_request: Request):
    """The API server's client of the engine core, which runs vllm-av's engine-core utilities."""
    return raw_request.app.state.engine_client.engine_core


def _body_schema(model: type[BaseModel]) -> dict:
    """``openapi_extra`` declaring ``model`` as a route's JSON body (checked by the update flow itself)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


ERRORS = {status: {"model": AVErrorBody} for status in (400, 404, 409, 500)}


async def _run_update(raw_request: Request, flow):
    """Run a runtime-update ``flow(served, body, call)`` for an HTTP request; a refusal is its status + message."""
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
        return JSONResponse(await flow(served_of(raw_request.app), body, call))
    except AVUpdateError as exc:
        return _error(exc.status, str(exc))
    except Exception as exc:  # noqa: BLE001 -- an engine failure: say so, keep serving
        logger.exception("vllm-av: runtime AV update failed")
        return _error(500, f"the AV update failed in the engine: {exc}")


def build_router() -> APIRouter:
    """``GET /v1/av``, ``POST /v1/av/load`` and ``POST /v1/av/unload``."""
    router = APIRouter()

    @router.get("/v1/av", response_model=AVListing, responses={404: {"model": AVErrorBody}})
    async def list_avs(raw_request: Request):
        served = served_of(raw_request.app)
        if served is None:
            return _error(404, "AV serving is not enabled")
        in_use = None
        if served.config.allow_runtime_updates:  # what an unload or replace would wait for
            in_use = await _engine_core(raw_request).call_utility_async(IN_USE_METHOD)
        return JSONResponse(served.listing(in_use))

    @router.post("/v1/av/load", response_model=AVLoaded, responses=ERRORS, openapi_extra=_body_schema(AVLoadRequest))
    async def load_av(raw_request: Request):
        return await _run_update(raw_request, lambda served, body, call: runtime.load(
            served, call, body.get("name"), body.get("path"), body.get("replace", False)))

    @router.post("/v1/av/unload", response_model=AVUnloaded, responses=ERRORS,
                 openapi_extra=_body_schema(AVUnloadRequest))
    async def unload_av(raw_request: Request):
        return await _run_update(raw_request, lambda served, body, call: runtime.unload(served, call, body.get("name")))

    return router


def install() -> None:
    """Add the AV routes and the object-mix middleware wherever vLLM attaches its ``/v1/models`` router."""
    original_attach = points.ATTACH_ROUTER.get()
    router = build_router()

    def attach_router(app, *args, **kwargs):
        result = original_attach(app, *args, **kwargs)
        app.include_router(router)
        app.add_middleware(ObjectMixMiddleware)
        return result

    points.ATTACH_ROUTER.replace(attach_router)
