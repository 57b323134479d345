"""Hostile clients against the real app: sessions, protocol and state (docs/SECURITY.md, "Sessions, protocol
and state"). Each case checks the documented code, that the server is still healthy and that a bystander
session of another key is untouched. One extra app (`hostile`) with small limits, so each case is quick."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import websockets
from conftest import SCENE, app_args, deployed

from serve_app.media.imaging import encode_image
from serve_app.protocol import decode_points, encode_frame_message

pytestmark = pytest.mark.ray
ALICE = {"Authorization": "Bearer key-alice"}
BOB = {"Authorization": "Bearer key-bob"}
LIMITS = {"max_sessions": 24, "max_protocol_errors": 5, "ws_idle_timeout_s": 5.0, "max_concurrent_exports": 1,
          "max_unacked_result_bytes": 20_000, "slow_reader_timeout_s": 10.0, "max_session_points": 50_000,
          "max_session_ttl_s": 600.0, "max_session_idle_ttl_s": 120.0, "frames_per_s": 1000.0}


@pytest.fixture(scope="module")
def hostile(serve_url):
    """The app under attack: API keys, oracle backend, the small limits above."""
    args = app_args(model={"backend": "oracle", "oracle_scene": SCENE}, limits=LIMITS,
                    auth={"mode": "api_key", "api_keys": ["key-alice", "key-bob"]},
                    session_defaults={"max_points": 20_000, "ttl_s": 600, "idle_ttl_s": 120})
    with deployed(serve_url, "hostile", args) as url:
        yield url


@pytest.fixture(scope="module")
def bystander(hostile, synthetic_seq):
    """(session id, info) of key-bob's finished session with a map: every case checks it is untouched."""
    from da3_client import Da3Client

    async def run():
        async with Da3Client(hostile, token="key-bob") as client:
            sid = (await client.create_session())["session_id"]
            async with client.stream(sid) as s:
                for i in range(6):
                    await s.send_frame(encode_image(synthetic_seq.images[i], "PNG"), frame_id=i)
                await s.finalize(timeout=120)
        return sid

    sid = asyncio.run(run())
    info = httpx.get(f"{hostile}/ws/session/{sid}", headers=BOB).json()
    assert info["state"] == "complete" and info["points_total"] > 0
    yield sid, info
    httpx.delete(f"{hostile}/ws/session/{sid}", headers=BOB)


def assert_unharmed(url: str, bystander) -> None:
    """The server answers its probes and the other key's session is exactly as it was."""
    sid, before = bystander
    assert httpx.get(url + "/healthz", timeout=30).status_code == 200
    now = httpx.get(f"{url}/ws/session/{sid}", headers=BOB, timeout=30)
    assert now.status_code == 200
    keys = ("state", "frames_received", "frames_processed", "points_total", "last_seq", "windows")
    assert {k: now.json()[k] for k in keys} == {k: before[k] for k in keys}


def ws_url(url: str, sid: str, **q) -> str:
    qs = "&".join(f"{k}={v}" for k, v in q.items())
    return url.replace("http://", "ws://") + f"/ws/reconstruct/{sid}" + (f"?{qs}" if qs else "")


def connect(url: str, sid: str, key: str = "key-alice", **q):
    return websockets.connect(ws_url(url, sid, **q), subprotocols=["da3.v1", f"bearer.{key}"], max_size=None,
                              max_queue=None)


def alice_sessions(url: str) -> list[str]:
    return [s["session_id"] for s in httpx.get(url + "/ws/sessions", headers=ALICE).json()["sessions"]]


async def next_json(ws, kinds=("error",), timeout=30.0) -> dict:
    """The next text message of one of `kinds` (others are skipped)."""
    while True:
        m = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(m, str) and json.loads(m)["type"] in kinds:
            return json.loads(m)


async def closed_with(ws, timeout=30.0) -> tuple[int, list[dict]]:
    """Read until the server closes; (close code, the error messages seen)."""
    errors = []
    try:
        while True:
            m = await asyncio.wait_for(ws.recv(), timeout)
            if isinstance(m, str) and json.loads(m)["type"] == "error":
                errors.append(json.loads(m))
    except websockets.ConnectionClosed:
        pass
    return ws.close_code, errors


# --- 1. strict JSON and bounded parameters on create --------------------------------------------------------
@pytest.mark.parametrize("body", [b'{"voxel_size": Infinity}', b'{"voxel_size": NaN}', b'{"voxel_size": 1e400}',
                                  b'{"voxel_size": 1e9}', b'{"conf_percentile": -Infinity}'])
def test_non_finite_create_body_is_refused_and_creates_nothing(hostile, bystander, body):
    """It used to answer 500 and leave a session nobody knew the id of, counting against the limits."""
    before = alice_sessions(hostile)
    r = httpx.post(hostile + "/ws/session/create", headers={**ALICE, "Content-Type": "application/json"},
                   content=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_PARAMS"
    assert alice_sessions(hostile) == before
    assert_unharmed(hostile, bystander)


# --- 6. server caps on what a client may ask for ------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("ttl_s", 30 * 86400), ("idle_ttl_s", 7 * 86400),
                                         ("max_points", 50_000_000)])
def test_session_params_above_the_server_caps_are_refused(hostile, bystander, field, value):
    before = alice_sessions(hostile)
    r = httpx.post(hostile + "/ws/session/create", headers=ALICE, json={field: value})
    assert r.status_code == 422 and r.json()["error"]["code"] == "INVALID_PARAMS"
    assert r.json()["error"]["details"]["field"] == field
    assert alice_sessions(hostile) == before
    lower = {"ttl_s": 60, "idle_ttl_s": 30, "max_points": 5000}[field]
    r = httpx.post(hostile + "/ws/session/create", headers=ALICE, json={field: lower})
    assert r.status_code == 201 and r.json()["params"][field] == lower  # lowering is always allowed
    assert httpx.delete(f"{hostile}/ws/session/{r.json()['session_id']}", headers=ALICE).status_code == 204
    assert_unharmed(hostile, bystander)


def test_per_key_cap_defaults_to_a_fraction_of_max_sessions(hostile, bystander):
    """max_sessions 24 and no per-key setting: one key gets 3, and cannot fill the server for the others."""
    made = []
    try:
        for _ in range(3):
            r = httpx.post(hostile + "/ws/session/create", headers=ALICE)
            assert r.status_code == 201
            made.append(r.json()["session_id"])
        r = httpx.post(hostile + "/ws/session/create", headers=ALICE)
        assert r.status_code == 429 and r.json()["error"]["code"] == "KEY_SESSION_LIMIT"
        r = httpx.post(hostile + "/ws/session/create", headers=BOB)
        assert r.status_code == 201
        httpx.delete(f"{hostile}/ws/session/{r.json()['session_id']}", headers=BOB)
    finally:
        for sid in made:
            httpx.delete(f"{hostile}/ws/session/{sid}", headers=ALICE)
    assert_unharmed(hostile, bystander)


@pytest.fixture
def alice_session(hostile):
    sid = httpx.post(hostile + "/ws/session/create", headers=ALICE).json()["session_id"]
    yield sid
    httpx.delete(f"{hostile}/ws/session/{sid}", headers=ALICE)


# --- 2. priors checked as they are used ---------------------------------------------------------------------
async def test_unusable_priors_are_refused_per_frame_and_the_stream_goes_on(hostile, bystander, alice_session,
                                                                           synthetic_seq):
    img = encode_image(synthetic_seq.images[0], "PNG")
    bad = [{"frame_id": "huge-k", "intrinsics": [[1e39, 0, 70], [0, 1e39, 50], [0, 0, 1]]},
           {"frame_id": "scaled", "pose": [[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]]},
           {"frame_id": "mirror", "pose": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]]}]
    async with connect(hostile, alice_session) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for meta in bad:  # encode_frame_message validates on the client side: build the raw header here
            header = json.dumps(meta).encode()
            await ws.send(b"DA3F\x01\x00" + len(header).to_bytes(2, "little") + header + img)
            err = await next_json(ws)
            assert (err["code"], err["fatal"], err["frame_id"]) == ("INVALID_PRIOR", False, meta["frame_id"])
        await ws.send(encode_frame_message(img, {"frame_id": "good"}))
        ack = await next_json(ws, ("ack", "error"))
        assert ack["type"] == "ack" and ack["frame_id"] == "good"
    assert_unharmed(hostile, bystander)


# --- 3. flow control ------------------------------------------------------------------------------------------
async def test_received_beyond_the_last_record_sent_is_a_protocol_error(hostile, bystander, alice_session):
    """`received` with a seq never sent used to switch result flow control off for the stream."""
    async with connect(hostile, alice_session) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "flush"}))  # work: the idle timeout stays out of this case
        await ws.send(json.dumps({"type": "received", "seq": 2**62}))
        err = await next_json(ws)
        assert err["code"] == "INVALID_MESSAGE" and not err["fatal"] and "beyond" in err["message"]
        await ws.send(json.dumps({"type": "received", "seq": 0}))  # nothing sent yet: 0 is fine
        await ws.send(json.dumps({"type": "ping", "t": "still-here"}))
        assert (await next_json(ws, ("pong", "error")))["t"] == "still-here"
    assert_unharmed(hostile, bystander)


async def test_a_stream_of_malformed_messages_is_closed_after_the_limit(hostile, bystander, alice_session):
    """Invalid 1-byte messages used to get an error reply each, forever; at max_protocol_errors (5 here) the
    stream is closed with TOO_MANY_ERRORS / 4400. The session itself stays usable."""
    async with connect(hostile, alice_session) as ws:
        await ws.recv()
        for _ in range(50):
            await ws.send("x")
        code, errors = await closed_with(ws)
    assert code == 4400
    assert [e["code"] for e in errors] == ["INVALID_MESSAGE"] * 5 + ["TOO_MANY_ERRORS"] and errors[-1]["fatal"]
    async with connect(hostile, alice_session) as ws:  # a new stream starts with a clean count
        assert json.loads(await ws.recv())["type"] == "ready"
    assert_unharmed(hostile, bystander)


async def test_replies_a_client_never_reads_are_bounded(hostile, bystander, alice_session):
    """Pings (and any other message the server answers) from a client that reads nothing: the replies count
    towards max_unacked_result_bytes (20 kB here) and past it the stream is closed with SLOW_CONSUMER / 4408
    instead of queueing pongs without bound."""
    async with connect(hostile, alice_session) as ws:
        await ws.recv()
        for i in range(2000):  # ~60 bytes per pong: about 350 fill the budget
            await ws.send(json.dumps({"type": "ping", "t": i}))
            if i % 50 == 0:  # work (no reply): keeps the idle timeout out of this case on a loaded machine
                await ws.send(json.dumps({"type": "flush"}))
        code, errors = await closed_with(ws)
    assert code == 4408 and errors[-1]["code"] == "SLOW_CONSUMER" and errors[-1]["fatal"]
    assert_unharmed(hostile, bystander)


async def test_a_reader_that_acknowledges_gets_every_result(hostile, bystander, alice_session, synthetic_seq):
    """The stricter accounting does not starve a well-behaved client: acks and progress between records are
    acknowledged by the `received` of the next record, and every result arrives (budget 20 kB here)."""
    n = 12
    seqs = []
    async with connect(hostile, alice_session) as ws:
        await ws.recv()
        for i in range(n):
            await ws.send(encode_frame_message(encode_image(synthetic_seq.images[i], "PNG"), {"frame_id": i}))
        await ws.send(json.dumps({"type": "finalize"}))
        async for m in ws:
            if isinstance(m, bytes):
                seqs.append(decode_points(m).seq)
                await ws.send(json.dumps({"type": "received", "seq": seqs[-1]}))
            elif json.loads(m)["type"] == "summary":
                summary = json.loads(m)
    assert ws.close_code == 1000 and summary["frames_processed"] == n
    assert seqs == list(range(1, summary["windows"] + 1))
    assert_unharmed(hostile, bystander)


# --- 6. idle WebSockets -------------------------------------------------------------------------------------
async def test_an_idle_websocket_is_closed_and_the_session_kept(hostile, bystander, alice_session):
    """A stream that sends no frames (pings do not count) and has nothing in flight holds a connection slot:
    closed with IDLE_TIMEOUT / 4420 after ws_idle_timeout_s (5 s here); the session stays and can reconnect."""
    t0 = time.monotonic()
    async with connect(hostile, alice_session) as ws:
        await ws.recv()

        async def keep_pinging():
            while True:
                await ws.send(json.dumps({"type": "ping", "t": 1}))
                await asyncio.sleep(0.5)

        pinger = asyncio.create_task(keep_pinging())
        try:
            code, errors = await closed_with(ws, timeout=30)
        finally:
            pinger.cancel()
    assert code == 4420 and errors[-1]["code"] == "IDLE_TIMEOUT" and errors[-1]["fatal"]
    assert 5.0 <= time.monotonic() - t0 < 30
    info = await asyncio.to_thread(httpx.get, f"{hostile}/ws/session/{alice_session}", headers=ALICE)
    assert info.status_code == 200
    async with connect(hostile, alice_session) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
    assert_unharmed(hostile, bystander)


# --- 4. exports -------------------------------------------------------------------------------------------------
async def test_concurrent_exports_over_the_cap_answer_export_busy(hostile, bystander):
    """max_concurrent_exports is 1 here: of many simultaneous PLY exports some are refused with EXPORT_BUSY,
    503 and Retry-After; the ones served are complete, and a later export succeeds."""
    sid, info = bystander
    async with httpx.AsyncClient(timeout=60) as http:
        rs = await asyncio.gather(*(http.get(f"{hostile}/ws/session/{sid}/reconstruction.ply", headers=BOB)
                                    for _ in range(12)))
        busy = [r for r in rs if r.status_code == 503]
        ok = [r for r in rs if r.status_code == 200]
        assert len(busy) + len(ok) == 12 and ok and busy
        assert all(r.json()["error"]["code"] == "EXPORT_BUSY" and int(r.headers["retry-after"]) >= 1 for r in busy)
        assert all(f"element vertex {info['points_total']}".encode() in r.content[:300] for r in ok)
        r = await http.get(f"{hostile}/ws/session/{sid}/reconstruction.ply", headers=BOB)
        assert r.status_code == 200
    assert_unharmed(hostile, bystander)
