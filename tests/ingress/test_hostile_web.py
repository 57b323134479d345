"""Hostile requests against the real app: operator routes, other users' sessions, expired ids, foreign Host names
(DNS rebinding) and WebSocket Origins (docs/SECURITY.md, "Browser, auth and operators"). Each case checks the
documented answer, that the server still answers /healthz, and that a bystander session is untouched."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
import websockets

pytestmark = pytest.mark.ray
ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
OPERATOR = {"Authorization": "Bearer key-operator"}


def ws_url(base: str, sid: str) -> str:
    return base.replace("http://", "ws://") + f"/ws/reconstruct/{sid}"


async def ws_outcome(url: str, **kwargs) -> tuple[dict, int | None]:
    """Connect, read the first message; (message, close code if the server then closed)."""
    async with websockets.connect(url, **kwargs) as c:
        first = json.loads(await asyncio.wait_for(c.recv(), 30))
        if first.get("type") == "ready":
            return first, None
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(c.recv(), 30)
    return first, c.close_code


def ws_outcome_sync(url: str, **kwargs) -> tuple[dict, int | None]:
    return asyncio.run(ws_outcome(url, **kwargs))


@pytest.fixture(scope="module")
def bystanders(serve_url, secure_url):
    """One session on each app that no case touches: it must come out exactly as it went in."""
    keyless = httpx.post(serve_url + "/ws/session/create", json={}).json()["session_id"]
    keyed = httpx.post(secure_url + "/ws/session/create", headers=ALICE).json()["session_id"]
    yield {"keyless": keyless, "keyed": keyed}
    httpx.delete(f"{serve_url}/ws/session/{keyless}")
    httpx.delete(f"{secure_url}/ws/session/{keyed}", headers=ALICE)


def assert_unaffected(serve_url, secure_url, bystanders) -> None:
    for url in (serve_url, secure_url):
        assert httpx.get(url + "/healthz", timeout=30).status_code == 200
    for url, sid, headers in ((serve_url, bystanders["keyless"], {}), (secure_url, bystanders["keyed"], ALICE)):
        info = httpx.get(f"{url}/ws/session/{sid}", headers=headers).json()
        assert info["state"] == "created" and info["frames_received"] == 0 and not info.get("connected")


def test_stats_needs_an_operator_key(serve_url, secure_url, bystanders):
    bob_sid = httpx.post(secure_url + "/ws/session/create", headers=BOB).json()["session_id"]
    try:
        r = httpx.get(secure_url + "/stats")
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
        for user in (ALICE, BOB):  # a valid user key learns nothing cluster-wide
            r = httpx.get(secure_url + "/stats", headers=user)
            assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
            assert set(r.json()) == {"error"}
        r = httpx.get(secure_url + "/stats", headers=OPERATOR, timeout=30)
        assert r.status_code == 200
        listed = {s["session_id"] for s in r.json()["sessions"]}
        assert {bystanders["keyed"], bob_sid} <= listed  # the operator sees every key's sessions
        assert r.json()["deployments"]  # serve.status(), fetched off the loop
    finally:
        httpx.delete(f"{secure_url}/ws/session/{bob_sid}", headers=BOB)
    assert_unaffected(serve_url, secure_url, bystanders)


def test_users_see_only_their_own_sessions(serve_url, secure_url, bystanders):
    alice_sid = bystanders["keyed"]
    bob_sid = httpx.post(secure_url + "/ws/session/create", headers=BOB).json()["session_id"]
    try:
        listing = httpx.get(secure_url + "/ws/sessions", headers=BOB).json()
        assert [s["session_id"] for s in listing["sessions"]] == [bob_sid]
        assert listing["counts"] == {"total": 1, "created": 1} and "ray_env" not in listing
        for path in ("", "/reconstruction.ply", "/reconstruction.glb", "/trajectory.json", "/trajectory.txt"):
            r = httpx.get(f"{secure_url}/ws/session/{alice_sid}{path}", headers=BOB)
            assert r.status_code == 404 and r.json()["error"]["code"] == "SESSION_NOT_FOUND", path
        msg, code = ws_outcome_sync(ws_url(secure_url, alice_sid), additional_headers=BOB)
        assert (msg["code"], code) == ("SESSION_NOT_FOUND", 4404)
    finally:
        httpx.delete(f"{secure_url}/ws/session/{bob_sid}", headers=BOB)
    assert_unaffected(serve_url, secure_url, bystanders)


def test_healthz_says_ok_and_no_more_without_an_operator_key(serve_url, secure_url, bystanders):
    for headers in ({}, ALICE, {"Authorization": "Bearer wrong"}):
        r = httpx.get(secure_url + "/healthz", headers=headers, timeout=30)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = httpx.get(secure_url + "/healthz", headers=OPERATOR, timeout=30)
    assert r.status_code == 200 and r.json()["model"]["backend"] == "oracle" and r.json()["uptime_s"] > 0
    assert_unaffected(serve_url, secure_url, bystanders)


def test_expired_session_is_not_found_for_other_keys(serve_url, secure_url, bystanders):
    """An expired id answers SESSION_EXPIRED to its owner only; any other key gets exactly what a never-existing
    id gets (no oracle of which ids exist)."""
    sid = httpx.post(secure_url + "/ws/session/create", headers=ALICE, json={"ttl_s": 1}).json()["session_id"]
    deadline = time.time() + 30
    while (r := httpx.get(f"{secure_url}/ws/session/{sid}", headers=ALICE)).status_code == 200:
        assert time.time() < deadline, "the session did not expire"
        time.sleep(0.5)
    assert r.status_code == 410 and r.json()["error"]["code"] == "SESSION_EXPIRED"
    never = "x" * len(sid)
    for method in ("get", "delete"):
        answers = []
        for probe in (sid, never):
            r = getattr(httpx, method)(f"{secure_url}/ws/session/{probe}", headers=BOB)
            answers.append((r.status_code, json.dumps(r.json()).replace(probe, "ID")))
        assert answers[0] == answers[1] and answers[0][0] == 404, answers
    outcomes = []
    for probe in (sid, never):
        msg, code = ws_outcome_sync(ws_url(secure_url, probe), additional_headers=BOB)
        outcomes.append((msg["code"], msg["message"].replace(probe, "ID"), code))
    assert outcomes[0] == outcomes[1] == ("SESSION_NOT_FOUND", "session ID not found", 4404)
    assert_unaffected(serve_url, secure_url, bystanders)


def test_keyless_server_refuses_foreign_host_names(serve_url, secure_url, bystanders):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends `Host: evil.example`."""
    port = int(serve_url.rsplit(":", 1)[1])
    before = len(httpx.get(serve_url + "/ws/sessions").json()["sessions"])
    for method, path in (("get", "/healthz"), ("get", "/ws/sessions"), ("post", "/ws/session/create"),
                         ("get", "/stats"), ("get", f"/ws/session/{bystanders['keyless']}")):
        r = getattr(httpx, method)(serve_url + path, headers={"Host": f"rebound.evil.example:{port}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN", path
        assert r.json()["error"]["details"] == {"reason": "host"}
    assert len(httpx.get(serve_url + "/ws/sessions").json()["sessions"]) == before  # nothing was created
    assert httpx.get(serve_url + "/healthz", headers={"Host": f"localhost:{port}"}).status_code == 200
    # The same on the WebSocket: a socket to 127.0.0.1 whose handshake names evil.example.
    sock = socket.create_connection(("127.0.0.1", port))
    msg, code = ws_outcome_sync(f"ws://rebound.evil.example:{port}/ws/reconstruct/{bystanders['keyless']}",
                                 sock=sock)
    assert (msg["code"], msg["details"], code) == ("FORBIDDEN", {"reason": "host"}, 4403)
    assert_unaffected(serve_url, secure_url, bystanders)


def test_websocket_origin_is_checked(serve_url, secure_url, bystanders):
    """A page on another origin cannot open a stream (keyless server: cors_origins is empty; the secure app
    allows http://allowed.example); the page's own origin and non-browser clients (no Origin) can."""
    sid = httpx.post(serve_url + "/ws/session/create", json={}).json()["session_id"]
    try:
        msg, code = ws_outcome_sync(ws_url(serve_url, sid), origin="http://evil.example")
        assert (msg["code"], msg["details"], code) == ("FORBIDDEN", {"reason": "origin"}, 4403)
        assert httpx.get(f"{serve_url}/ws/session/{sid}").json()["state"] == "created"  # never attached
        host = serve_url.removeprefix("http://")
        for origin in (f"http://{host}", None):
            msg, code = ws_outcome_sync(ws_url(serve_url, sid), origin=origin)
            assert msg["type"] == "ready", origin
    finally:
        httpx.delete(f"{serve_url}/ws/session/{sid}")
    keyed = bystanders["keyed"]
    msg, code = ws_outcome_sync(ws_url(secure_url, keyed), origin="http://evil.example", additional_headers=ALICE)
    assert (msg["code"], code) == ("FORBIDDEN", 4403)
    sid = httpx.post(secure_url + "/ws/session/create", headers=ALICE).json()["session_id"]
    try:
        msg, _ = ws_outcome_sync(ws_url(secure_url, sid), origin="http://allowed.example", additional_headers=ALICE)
        assert msg["type"] == "ready"
    finally:
        httpx.delete(f"{secure_url}/ws/session/{sid}", headers=ALICE)
    assert_unaffected(serve_url, secure_url, bystanders)


def test_unavailable_healthz_hides_the_exception_from_non_operators(serve_url, secure_url, bystanders):
    """A probe learns "unavailable" and nothing more; the operator also gets the exception. A small app of its
    own whose session store is killed for good (max_restarts 0)."""
    import ray
    from conftest import API_KEYS, OPERATOR_KEYS, SCENE, app_args, deploy
    from ray import serve

    args = app_args(model={"backend": "oracle", "oracle_scene": SCENE},
                    auth={"mode": "api_key", "api_keys": API_KEYS, "operator_keys": OPERATOR_KEYS},
                    session_actor={"max_restarts": 0})
    url = deploy(serve_url, "brittle", args)
    try:
        ray.kill(ray.get_actor(args["session_actor"]["name"], namespace=args["session_actor"]["namespace"]),
                 no_restart=True)
        deadline = time.time() + 60
        while (r := httpx.get(url + "/healthz", timeout=30)).status_code == 200:
            assert time.time() < deadline, "healthz still ok after the session store died"
            time.sleep(0.5)
        for headers in ({}, ALICE):
            r = httpx.get(url + "/healthz", headers=headers, timeout=30)
            assert r.status_code == 503 and r.json() == {"status": "unavailable"}
        r = httpx.get(url + "/healthz", headers=OPERATOR, timeout=30)
        assert r.status_code == 503 and "Actor" in r.json()["error"]  # e.g. ActorDiedError: ...
    finally:
        serve.delete("brittle")
    assert_unaffected(serve_url, secure_url, bystanders)
