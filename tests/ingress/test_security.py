"""API keys, ownership, CORS and rate limits on a real app (the `secure` app from conftest)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from serve_app.media.imaging import encode_image
from serve_app.protocol import encode_frame_message

pytestmark = pytest.mark.ray
ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}


def ws(base, sid, **q):
    qs = "&".join(f"{k}={v}" for k, v in q.items())
    return base.replace("http://", "ws://") + f"/ws/reconstruct/{sid}" + (f"?{qs}" if qs else "")


def test_http_requires_a_valid_key(secure_url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic a2V5LWFsaWNl"}):
        r = httpx.post(secure_url + "/ws/session/create", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHORIZED"
        assert httpx.get(secure_url + "/ws/sessions", headers=headers).status_code == 401
    assert httpx.get(secure_url + "/healthz").status_code == 200  # probes need no key


def test_sessions_belong_to_their_key(secure_url):
    r = httpx.post(secure_url + "/ws/session/create", headers=ALICE)
    assert r.status_code == 201
    sid = r.json()["session_id"]
    assert r.json()["websocket_path"] == f"/secure/ws/reconstruct/{sid}"
    assert httpx.get(f"{secure_url}/ws/session/{sid}", headers=ALICE).status_code == 200
    for method, path in (("get", ""), ("get", "/reconstruction.ply"), ("get", "/trajectory.json"),
                         ("delete", "")):
        r = getattr(httpx, method)(f"{secure_url}/ws/session/{sid}{path}", headers=BOB)
        assert r.status_code == 404 and r.json()["error"]["code"] == "SESSION_NOT_FOUND"
    listed = httpx.get(secure_url + "/ws/sessions", headers=BOB).json()["sessions"]
    assert sid not in [s["session_id"] for s in listed]
    assert httpx.delete(f"{secure_url}/ws/session/{sid}", headers=ALICE).status_code == 204


async def refused(url: str, **kwargs) -> tuple[str, int]:
    """Connect, expect an error message and a close: (code, close code)."""
    async with websockets.connect(url, **kwargs) as c:
        m = json.loads(await asyncio.wait_for(c.recv(), 30))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(c.recv(), 30)
    return m.get("code", m["type"]), c.close_code


async def test_websocket_auth_by_header_or_subprotocol_never_the_url(secure_url):
    """Through Ray Serve's proxy: the Authorization header and the `bearer.<key>` subprotocol reach the app; the
    server answers with da3.v1 and never echoes the key; a key in the URL (`?token=`) is not accepted."""
    sid = httpx.post(secure_url + "/ws/session/create", headers=ALICE).json()["session_id"]
    assert await refused(ws(secure_url, sid)) == ("UNAUTHORIZED", 4401)
    assert await refused(ws(secure_url, sid, token="key-alice")) == ("UNAUTHORIZED", 4401)
    assert await refused(ws(secure_url, sid), additional_headers=BOB) == ("SESSION_NOT_FOUND", 4404)
    async with websockets.connect(ws(secure_url, sid), additional_headers=ALICE) as c:
        assert json.loads(await c.recv())["type"] == "ready"
    async with websockets.connect(ws(secure_url, sid), subprotocols=["da3.v1", "bearer.key-alice"]) as c:
        assert c.subprotocol == "da3.v1" and c.response.headers["Sec-WebSocket-Protocol"] == "da3.v1"
        assert json.loads(await c.recv())["type"] == "ready"
    async with websockets.connect(ws(secure_url, sid), subprotocols=["bearer.key-alice"]) as c:
        assert c.subprotocol is None and "Sec-WebSocket-Protocol" not in c.response.headers  # key not echoed
        assert json.loads(await c.recv())["type"] == "ready"
    httpx.delete(f"{secure_url}/ws/session/{sid}", headers=ALICE)


def test_cors_only_for_configured_origins(secure_url):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = httpx.options(secure_url + "/ws/session/create", headers={"Origin": "http://allowed.example", **pre})
    assert ok.headers.get("access-control-allow-origin") == "http://allowed.example"
    bad = httpx.options(secure_url + "/ws/session/create", headers={"Origin": "http://evil.example", **pre})
    assert bad.headers.get("access-control-allow-origin") is None


def test_per_key_session_cap(secure_url):
    made = []
    try:
        for _ in range(3):
            r = httpx.post(secure_url + "/ws/session/create", headers=BOB)
            assert r.status_code == 201
            made.append(r.json()["session_id"])
        r = httpx.post(secure_url + "/ws/session/create", headers=BOB)
        assert r.status_code == 429 and r.json()["error"]["code"] == "KEY_SESSION_LIMIT"
        assert httpx.post(secure_url + "/ws/session/create", headers=ALICE).status_code == 201
    finally:
        for sid in made:
            httpx.delete(f"{secure_url}/ws/session/{sid}", headers=BOB)


async def test_frame_rate_limit_is_non_fatal(secure_url, synthetic_seq):
    sid = httpx.post(secure_url + "/ws/session/create", headers=ALICE).json()["session_id"]
    frame = encode_image(synthetic_seq.images[0], "PNG")
    codes, acks = [], 0
    try:  # the session is deleted either way: a leftover would count against ALICE's session limit in later tests
        async with websockets.connect(ws(secure_url, sid), additional_headers=ALICE, max_size=None) as c:
            await c.recv()
            for i in range(8):  # limit is 2 frames/s with a burst of 4
                await c.send(encode_frame_message(frame, {"frame_id": i}))
            while acks + len(codes) < 8:
                m = await asyncio.wait_for(c.recv(), 30)
                if isinstance(m, str):
                    m = json.loads(m)
                    if m["type"] == "ack":
                        acks += 1
                    elif m["type"] == "error":
                        codes.append((m["code"], m["fatal"]))
        assert acks == 4 and codes == [("FRAME_RATE_LIMITED", False)] * 4
    finally:
        httpx.delete(f"{secure_url}/ws/session/{sid}", headers=ALICE)


async def test_api_keys_never_reach_the_logs(secure_url):
    """Keys travel in headers and subprotocols (`?token=` is refused but still tried); none of them (valid or
    not) may appear in any log file Ray or Serve writes (access logs included)."""
    import time
    from pathlib import Path

    import ray

    wrong = "key-mallory-not-configured"
    sid = httpx.post(secure_url + "/ws/session/create", headers=ALICE).json()["session_id"]
    httpx.get(f"{secure_url}/ws/session/{sid}", headers={"Authorization": f"Bearer {wrong}"})
    httpx.get(f"{secure_url}/ws/session/{sid}?token={wrong}")
    for url, kwargs in ((ws(secure_url, sid, token="key-alice"), {}),
                        (ws(secure_url, sid), {"additional_headers": ALICE}),
                        (ws(secure_url, sid), {"subprotocols": ["da3.v1", "bearer.key-alice"]}),
                        (ws(secure_url, sid, token=wrong), {})):
        async with websockets.connect(url, **kwargs) as c:
            assert json.loads(await c.recv())["type"] in ("ready", "error")
    time.sleep(2)  # access logs are written when a request ends
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [f for f in logs.rglob("*") if f.is_file()]
    serve_logs = [f for f in files if "serve" in f.parts]
    access = "".join(f.read_text(errors="ignore") for f in serve_logs if "secure_Ingress" in f.name)
    assert " WS " in access and "/ws/session/" in access  # the access log lines were written
    assert any(sid[:8] in f.read_text(errors="ignore") for f in files)  # and so were our session logs
    for f in files:
        data = f.read_bytes()
        for secret in (b"key-alice", b"key-bob", wrong.encode()):
            assert secret not in data, f"{secret!r} found in {f}"
    httpx.delete(f"{secure_url}/ws/session/{sid}", headers=ALICE)


async def test_frame_limit_is_not_fatal_and_the_session_finishes(secure_url, synthetic_seq):
    sid = httpx.post(secure_url + "/ws/session/create", headers=ALICE, json={"max_frames": 2}).json()["session_id"]
    acks, errors, summary = [], [], None
    async with websockets.connect(ws(secure_url, sid), additional_headers=ALICE, max_size=None) as c:
        await c.recv()
        for i in range(3):  # within the app's 2 frames/s burst of 4
            await c.send(encode_frame_message(encode_image(synthetic_seq.images[i], "PNG"), {"frame_id": i}))
        while len(acks) + len(errors) < 3:
            m = json.loads(await asyncio.wait_for(c.recv(), 60))
            if m["type"] == "ack":
                acks.append(m["frame_id"])
            elif m["type"] == "error":
                errors.append(m)
        await c.send(json.dumps({"type": "finalize"}))
        async for raw in c:
            if isinstance(raw, str) and json.loads(raw)["type"] == "summary":
                summary = json.loads(raw)
    assert acks == [0, 1]
    assert [(e["code"], e["fatal"], e["frame_id"]) for e in errors] == [("FRAME_LIMIT_EXCEEDED", False, 2)]
    assert summary["state"] == "complete" and summary["frames_processed"] == 2 and c.close_code == 1000
    httpx.delete(f"{secure_url}/ws/session/{sid}", headers=ALICE)


async def test_python_client_waits_out_the_frame_rate_limit(secure_url, synthetic_seq):
    """FRAME_RATE_LIMITED carries details.retry_after_s; the client library resends after it: nothing is lost."""
    from da3_client import Da3Client

    async with Da3Client(secure_url, token="key-bob") as client:
        sid = (await client.create_session())["session_id"]
        async with client.stream(sid) as s:
            for i in range(8):  # 2 frames/s with a burst of 4 on this app
                await s.send_frame(encode_image(synthetic_seq.images[i], "PNG"), frame_id=i)
            summary = await s.finalize(timeout=120)
        await client.delete_session(sid)
    limited = [e for e in s.errors if e["code"] == "FRAME_RATE_LIMITED"]
    assert limited and all(0 < e["details"]["retry_after_s"] <= 1.0 and not e["fatal"] for e in limited)
    assert summary["frames_received"] == summary["frames_processed"] == 8 and not s.rejected
