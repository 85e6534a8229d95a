"""Accept a JSON object as the HTTP mix: ``"vllm_xargs": {"av": {"pirate": 1, "shouting": 0.5}}``.

vLLM's request schema types ``vllm_xargs`` values as ``str | int | float | list[...]``, so an
object there fails pydantic validation with a long error before any plugin code runs. This ASGI
middleware rewrites such an object into the string form (``"pirate:1,shouting:0.5"``) before
vLLM parses the body; the mix is then validated as any other. Bodies without an object-valued
``vllm_xargs.av`` pass through byte for byte.
"""

from __future__ import annotations

import json

from vllm_av.serving.front.mix import MIX_KEY


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
