"""Access rules (serve_app/ingress/auth.py) and the off-loop status cache, without Ray. The middleware runs in a real
Starlette app through its TestClient; tests/ingress/test_hostile_web.py checks the same rules on the real Serve app."""

from __future__ import annotations

import asyncio
import time

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from serve_app.config import AuthConfig, parse_args
from serve_app.errors import ErrorCode, ServiceError
from serve_app.ingress.auth import AccessMiddleware, AccessPolicy, bearer_token, host_name
from serve_app.observability.status_cache import CachedCall

KEYED = AuthConfig(mode="api_key", api_keys=["key-alice"], operator_keys=["key-op"])


def test_key_only_from_header_or_subprotocol_never_the_url():
    assert bearer_token({"authorization": "Bearer k1"}) == "k1"
    assert bearer_token({"sec-websocket-protocol": "da3.v1, bearer.k2"}) == "k2"
    assert bearer_token({}) is None  # a `?token=` query is not looked at: there is no way to pass it in


def test_operator_role():
    p = AccessPolicy(KEYED)
    assert p.is_operator("key-op") and not p.is_operator("key-alice") and not p.is_operator(None)
    p.require_operator("key-op")
    with pytest.raises(ServiceError) as e:
        p.require_operator("key-alice")
    assert e.value.code is ErrorCode.FORBIDDEN and e.value.http_status == 403
    for bad in (None, "nope"):
        with pytest.raises(ServiceError) as e:
            p.require_operator(bad)
        assert e.value.code is ErrorCode.UNAUTHORIZED
    assert p.owner("key-op") and p.owner("key-op") != p.owner("key-alice")  # operators are users too
    # Without keys: everyone (loopback-only by default) is an operator, unless operator keys are configured.
    assert AccessPolicy(AuthConfig()).is_operator(None)
    assert not AccessPolicy(AuthConfig(operator_keys=["op"])).is_operator(None)


def test_hosts_clients_and_origins():
    none = AccessPolicy(AuthConfig(), cors_origins=["http://app.example"])
    assert [none.host_allowed(h) for h in ("127.0.0.1:8000", "localhost", "[::1]:80", "LOCALHOST:1")] == [True] * 4
    assert not any(none.host_allowed(h) for h in ("evil.example", "evil.example:8000", "127.0.0.1.nip.io", "", None))
    assert AccessPolicy(KEYED).host_allowed("anything.example")  # with keys: any name unless configured
    named = AccessPolicy(AuthConfig(allowed_hosts=["*.example.org", "da3.local"]))
    assert named.host_allowed("a.example.org:443") and named.host_allowed("da3.local")
    assert not named.host_allowed("example.org.evil.com") and not named.host_allowed("localhost")
    assert host_name("[::1]:8000") == "::1" and host_name("a.b:80") == "a.b"

    assert none.client_allowed("127.0.0.1") and none.client_allowed("::1")
    assert not none.client_allowed("192.0.2.7") and not none.client_allowed(None)
    assert AccessPolicy(AuthConfig(allow_remote=True)).client_allowed("192.0.2.7")
    assert AccessPolicy(KEYED).client_allowed("192.0.2.7")

    assert none.origin_allowed(None, "127.0.0.1:8000")  # not a browser
    assert none.origin_allowed("http://127.0.0.1:8000", "127.0.0.1:8000")  # same origin
    assert none.origin_allowed("http://app.example", "127.0.0.1:8000")  # cors_origins
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "http://127.0.0.1:8000.evil.example"):
        assert not none.origin_allowed(origin, "127.0.0.1:8000"), origin


def test_keys_must_be_subprotocol_tokens():
    with pytest.raises(ValueError, match="subprotocol"):
        parse_args({"auth": {"mode": "api_key", "api_keys": ["has space"]}})
    with pytest.raises(ValueError, match="subprotocol"):
        parse_args({"auth": {"mode": "api_key", "api_keys": ["ok"], "operator_keys": ["a,b"]}})


def _app(policy: AccessPolicy) -> FastAPI:
    app = FastAPI()

    @app.get("/x")
    async def x():
        return {"ok": True}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        await websocket.send_json({"type": "ready"})
        await websocket.close()

    app.add_middleware(AccessMiddleware, policy=policy)
    return app


def test_middleware_answers_with_the_documented_codes():
    # TestClient's client address is "testclient": not loopback, like a remote client.
    c = TestClient(_app(AccessPolicy(AuthConfig())), base_url="http://127.0.0.1")
    r = c.get("/x")
    assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
    assert r.json()["error"]["details"] == {"reason": "remote_client"}

    c = TestClient(_app(AccessPolicy(AuthConfig(allow_remote=True))), base_url="http://127.0.0.1")
    assert c.get("/x").json() == {"ok": True}
    r = c.get("/x", headers={"Host": "rebound.evil.example"})
    assert r.status_code == 403 and r.json()["error"]["details"] == {"reason": "host"}
    with c.websocket_connect("ws://127.0.0.1/ws", headers={"Origin": "http://evil.example"}) as s:
        msg = s.receive_json()
        assert msg["code"] == "FORBIDDEN" and msg["fatal"] and msg["details"] == {"reason": "origin"}
        with pytest.raises(WebSocketDisconnect) as e:
            s.receive_json()
    assert e.value.code == 4403
    with c.websocket_connect("ws://127.0.0.1/ws", headers={"Origin": "http://127.0.0.1"}) as s:
        assert s.receive_json() == {"type": "ready"}


async def test_cached_call_runs_off_the_loop_once_per_ttl():
    calls = []

    def slow():  # a blocking controller call
        calls.append(time.monotonic())
        time.sleep(0.4)
        return {"n": len(calls)}

    cache = CachedCall(slow, ttl_s=30, timeout_s=5, default={})
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.02)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(*(cache.get() for _ in range(5)))  # concurrent callers share one call
        assert results == [{"n": 1}] * 5 and len(calls) == 1
        assert ticks >= 5  # the loop kept running while the call blocked its thread
        assert await cache.get() == {"n": 1} and len(calls) == 1  # within the TTL: no new call
    finally:
        t.cancel()


async def test_cached_call_answers_the_last_value_when_the_call_hangs_or_fails():
    state = {"mode": "ok"}

    def fn():
        if state["mode"] == "hang":
            time.sleep(1.0)
        if state["mode"] == "fail":
            raise RuntimeError("controller busy")
        return state["mode"]

    cache = CachedCall(fn, ttl_s=0, timeout_s=0.2, default="none")
    assert await cache.get() == "ok"
    state["mode"] = "hang"
    t0 = time.monotonic()
    assert await cache.get() == "ok" and time.monotonic() - t0 < 0.8
    state["mode"] = "fail"
    await asyncio.sleep(1.0)  # the hung call finishes
    assert await cache.get() in ("ok", "hang")
    assert await cache.get() in ("ok", "hang")
