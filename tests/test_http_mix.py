"""The HTTP object-mix rewrite (serving/front/http.py), without a server."""

import asyncio
import json

from vllm_av.serving.front.http import ObjectMixMiddleware, rewrite_body


def test_object_mix_becomes_the_string_form():
    body = json.dumps({"prompt": "hi", "vllm_xargs": {"av": {"pirate": 1, "shouting": -0.5}, "other": 3}}).encode()
    out = json.loads(rewrite_body(body))
    assert out == {"prompt": "hi", "vllm_xargs": {"av": "pirate:1,shouting:-0.5", "other": 3}}


def test_other_bodies_are_left_alone():
    for request in [{"prompt": "hi"}, {"vllm_xargs": {"av": "pirate:1"}}, {"vllm_xargs": {"av": {}}},
                    {"vllm_xargs": {"av": {"a:b": 1}}}, {"vllm_xargs": {"av": {"a": True}}},
                    {"vllm_xargs": {"av": {"a": [1]}}}, {"vllm_xargs": 5}, ["vllm_xargs"]]:
        assert rewrite_body(json.dumps(request).encode()) is None, request
    assert rewrite_body(b"{not json vllm_xargs") is None


def test_middleware_rewrites_json_posts_and_fixes_content_length():
    seen = {}

    async def app(scope, receive, send):
        seen["headers"] = dict(scope["headers"])
        seen["body"] = (await receive())["body"]

    body = json.dumps({"vllm_xargs": {"av": {"pirate": 0.5}}}).encode()
    chunks = [{"type": "http.request", "body": body[:10], "more_body": True},
              {"type": "http.request", "body": body[10:], "more_body": False}]

    async def receive():
        return chunks.pop(0)

    scope = {"type": "http", "method": "POST",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    asyncio.run(ObjectMixMiddleware(app)(scope, receive, None))
    assert json.loads(seen["body"]) == {"vllm_xargs": {"av": "pirate:0.5"}}
    assert seen["headers"][b"content-length"] == str(len(seen["body"])).encode()
