"""The real Ray Serve app end to end: HTTP routes and the WebSocket stream (docs/WEBSOCKET_API.md)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
import websockets

from serve_app.media.imaging import encode_image
from serve_app.protocol import decode_points, encode_frame_message
from serve_app.ray_env import RAY_ENV_VARS
from serve_app.recon.exports import read_ply

pytestmark = pytest.mark.ray


def ws_url(base: str, sid: str, **query) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return base.replace("http://", "ws://") + f"/ws/reconstruct/{sid}" + (f"?{q}" if q else "")


def create(base: str, **params) -> dict:
    r = httpx.post(base + "/ws/session/create", json=params, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


class Collector:
    """Reads a stream until it closes, sorting messages by type."""

    def __init__(self):
        self.msgs: list[dict] = []
        self.chunks = []
        self.close_code = None

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.msgs if m["type"] == kind]

    async def read_until_closed(self, ws, timeout=240.0):
        async def _loop():
            try:
                async for raw in ws:
                    if isinstance(raw, bytes):
                        self.chunks.append(decode_points(raw))
                    else:
                        self.msgs.append(json.loads(raw))
            except websockets.ConnectionClosed:
                pass
        await asyncio.wait_for(_loop(), timeout)
        self.close_code = ws.close_code


def frame_bytes(seq, i, fmt="PNG") -> bytes:
    return encode_image(seq.images[i], fmt)


async def test_http_routes(serve_url):
    r = httpx.get(serve_url + "/healthz", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert r.json()["model"]["model_name"] == "da3-small"

    s = create(serve_url, window_size=5, overlap=2)
    sid = s["session_id"]
    assert s["params"]["window_size"] == 5 and s["params"]["process_res"] == 154
    assert s["websocket_url"].endswith(f"/ws/reconstruct/{sid}") and s["expires_at"] > s["created_at"]

    info = httpx.get(f"{serve_url}/ws/session/{sid}").json()
    assert info["state"] == "created" and info["frames_received"] == 0
    listing = httpx.get(f"{serve_url}/ws/sessions").json()
    assert sid in [x["session_id"] for x in listing["sessions"]] and listing["limits"]["max_sessions"] == 20

    bad = httpx.post(serve_url + "/ws/session/create", json={"overlap": 9})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "INVALID_PARAMS"
    assert "overlap" in bad.json()["error"]["message"]
    bad = httpx.post(serve_url + "/ws/session/create", content=b"{not json")
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "INVALID_PARAMS"

    assert httpx.delete(f"{serve_url}/ws/session/{sid}").status_code == 204
    for method in ("get", "delete"):
        r = getattr(httpx, method)(f"{serve_url}/ws/session/{sid}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "SESSION_NOT_FOUND"
    r = httpx.get(f"{serve_url}/ws/session/nope/reconstruction.ply")
    assert r.status_code == 404


async def test_unknown_session_websocket_closes_4404(serve_url):
    async with websockets.connect(ws_url(serve_url, "does-not-exist")) as ws:
        msg = json.loads(await ws.recv())
        assert msg["type"] == "error" and msg["code"] == "SESSION_NOT_FOUND" and msg["fatal"] is True
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4404


async def stream_all(serve_url, seq, n, params=None, binary=True):
    s = create(serve_url, **(params or {}))
    sid = s["session_id"]
    col = Collector()
    async with websockets.connect(ws_url(serve_url, sid), max_size=None) as ws:
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready" and ready["session_id"] == sid and ready["max_in_flight"] == 12
        reader = asyncio.create_task(col.read_until_closed(ws))
        for i in range(n):
            while len(col.of("ack")) + 10 <= i:  # stay inside the advertised in-flight window
                await asyncio.sleep(0.01)
            while i - len(col.of("frame_result")) >= 10:
                await asyncio.sleep(0.02)
            if binary:
                await ws.send(encode_frame_message(frame_bytes(seq, i), {"frame_id": f"f{i}", "timestamp": i / 30}))
            else:
                import base64
                await ws.send(json.dumps({"type": "frame", "frame_id": f"f{i}",
                                          "image": base64.b64encode(frame_bytes(seq, i, "JPEG")).decode()}))
        await ws.send(json.dumps({"type": "finalize"}))
        await reader
    return sid, col


async def test_full_stream_results_for_every_frame_and_ply(serve_url, synthetic_seq):
    n = 11
    sid, col = await stream_all(serve_url, synthetic_seq, n)
    assert col.close_code == 1000
    assert not col.of("error"), col.of("error")
    assert [a["frame_id"] for a in col.of("ack")] == [f"f{i}" for i in range(n)]
    results = col.of("frame_result")
    assert sorted(r["index"] for r in results) == list(range(n))
    for r in results:
        pose = np.array(r["pose"])
        assert pose.shape == (4, 4) and np.allclose(pose[3], [0, 0, 0, 1])
        np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-3)
        assert r["image_size"] == [154, 112] and r["original_size"] == [154, 112]
        assert np.array(r["intrinsics"]).shape == (3, 3) and r["latency_ms"] > 0
    assert results[0]["timestamp"] == 0.0
    windows = col.of("window")
    assert [w["seq"] for w in windows] == list(range(1, len(windows) + 1))
    for w in windows:  # the latency split (WEBSOCKET_API.md 3.5): parts of the round trip and of the total
        t = w["timings_ms"]
        assert all(t[k] >= 0 for k in ("queue", "ingest", "model", "batch_wait", "transfer", "geometry_wait",
                                        "geometry", "last_frame", "total")), t
        assert t["model_roundtrip"] == pytest.approx(t["model"] + t["batch_wait"] + t["transfer"], abs=0.05)
        assert t["ingest"] <= t["queue"] and t["last_frame"] <= t["total"]
        assert t["last_frame"] >= t["ingest"] + t["model_roundtrip"] + t["geometry"] - 0.05
        assert abs(w["server_time"] - time.time()) < 300
    assert windows[0]["alignment"]["ok"] and windows[0]["context_frame_ids"] == []
    assert all(w["context_frame_ids"] for w in windows[1:])  # later windows carry overlap context
    assert len(col.chunks) == len(windows)
    total = sum(len(c.points) for c in col.chunks)
    assert total > 0 and sum(r["points_added"] for r in results) == pytest.approx(total, rel=0.05, abs=n)
    summary = col.of("summary")[0]
    assert summary["frames_processed"] == n and summary["points_total"] == total

    info = httpx.get(f"{serve_url}/ws/session/{sid}").json()
    assert info["state"] == "complete" and info["frames_processed"] == n
    ply = httpx.get(f"{serve_url}/ws/session/{sid}/reconstruction.ply", timeout=30)
    assert ply.status_code == 200
    pts, cols = read_ply(ply.content)
    assert len(pts) == total and cols.dtype == np.uint8
    streamed = np.concatenate([c.points for c in col.chunks])
    # float16 on the wire relative to a per-chunk origin: close to the float32 export
    assert np.abs(np.sort(pts, axis=0) - np.sort(streamed, axis=0)).max() < 0.05 * (1 + np.abs(pts).max())
    traj = httpx.get(f"{serve_url}/ws/session/{sid}/trajectory.json").json()
    assert [f["index"] for f in traj["frames"]] == sorted(r["index"] for r in results)
    tum = httpx.get(f"{serve_url}/ws/session/{sid}/trajectory.txt").text.strip().splitlines()
    assert len(tum) == n and len(tum[0].split()) == 8
    glb = httpx.get(f"{serve_url}/ws/session/{sid}/reconstruction.glb", timeout=30)
    assert glb.status_code == 200 and glb.content[:4] == b"glTF"


async def test_json_base64_frames(serve_url, synthetic_seq):
    _sid, col = await stream_all(serve_url, synthetic_seq, 5, binary=False)
    assert col.close_code == 1000 and not col.of("error")
    assert sorted(r["frame_id"] for r in col.of("frame_result")) == [f"f{i}" for i in range(5)]


def test_stats_reports_the_ray_settings_of_each_process(serve_url):
    """The ingress, the model replica and the session actor each report the Ray settings they run with."""
    env = httpx.get(serve_url + "/stats", timeout=30).json()["ray_env"]
    assert env == {"ingress": RAY_ENV_VARS, "model": RAY_ENV_VARS, "session_actor": RAY_ENV_VARS}


async def test_two_sessions_share_batches(serve_url, synthetic_seq):
    before = httpx.get(serve_url + "/stats", timeout=30).json()["model"]["batch_sizes"]
    (_, a), (_, b) = await asyncio.gather(stream_all(serve_url, synthetic_seq, 8),
                                          stream_all(serve_url, synthetic_seq, 8))
    assert a.close_code == b.close_code == 1000
    assert len(a.of("frame_result")) == len(b.of("frame_result")) == 8
    after = httpx.get(serve_url + "/stats", timeout=30).json()["model"]["batch_sizes"]
    grown = {int(k): v - before.get(k, 0) for k, v in after.items()}
    assert any(k > 1 and v > 0 for k, v in grown.items()), after
    assert max(w["batch_size"] for w in a.of("window") + b.of("window")) > 1


async def test_concurrent_streams_share_store_accept_calls_and_lose_nothing(serve_url, synthetic_seq):
    """Frames of several streams that reach the replica while its accept call to the session store is out go
    to the store together (session_actor.accept_batch): every frame is still acked once, in order, and
    processed, and the replica made fewer accept calls than it stored frames."""
    n, streams = 12, 6
    before = httpx.get(serve_url + "/stats", timeout=30).json()["store_accepts"]
    got = await asyncio.gather(*[stream_all(serve_url, synthetic_seq, n) for _ in range(streams)])
    for sid, _ in got:  # the shared app caps open sessions (max_sessions 20): leave none for the later tests
        assert httpx.delete(f"{serve_url}/ws/session/{sid}", timeout=30).status_code == 204
    for _, col in got:
        assert col.close_code == 1000 and not col.of("error"), col.of("error")
        assert [a["frame_id"] for a in col.of("ack")] == [f"f{i}" for i in range(n)]
        assert [a["index"] for a in col.of("ack")] == list(range(n))
        assert sorted(r["frame_id"] for r in col.of("frame_result")) == sorted(f"f{i}" for i in range(n))
    after = httpx.get(serve_url + "/stats", timeout=30).json()["store_accepts"]
    frames, calls = after["frames"] - before["frames"], after["calls"] - before["calls"]
    assert frames == n * streams
    assert calls < frames, after


async def test_windows_arriving_during_a_forward_share_the_next_batch(serve_url, synthetic_seq):
    """Windows that reach the model replica one by one while it runs a forward are held until it is free and then
    go through as one batch (Serve's batcher alone would make each of them a batch of one)."""
    from ray import serve

    from serve_app.prediction import WindowRequest

    model = serve.get_deployment_handle("DA3ModelServer", app_name="da3")
    req = WindowRequest(images=np.ascontiguousarray(synthetic_seq.images[:4]))
    sizes = []
    for _ in range(3):  # another test's leftover window may hold the model when `first` arrives: try again
        first = model.infer.remote(req)
        await asyncio.sleep(0.15)  # the first forward is running (da3-small takes several hundred ms here)
        later = []
        for _ in range(4):  # max_batch_size of this app
            later.append(model.infer.remote(req))
            await asyncio.sleep(0.03)  # each arrives after the 50 ms batch wait of the one before would close
        res = [await r for r in (first, *later)]
        assert all(r["ok"] for r in res)
        sizes = [r["batch_size"] for r in res]
        if sizes == [1, 4, 4, 4, 4]:
            break
    assert sizes == [1, 4, 4, 4, 4]  # without the gate: [1, 2, 2, 2, 2] every time
    # The held windows report their wait at the gate: at least until the first forward ended
    waits = [r["batch_wait_ms"] for r in res]
    assert all(w >= 0 for w in waits) and min(waits[1:]) > waits[0]
    assert waits[1] > waits[4] > 0  # the earliest arrival waited longest


async def test_bad_input_is_reported_and_stream_continues(serve_url, synthetic_seq):
    sid = create(serve_url)["session_id"]
    async with websockets.connect(ws_url(serve_url, sid), max_size=None) as ws:
        await ws.recv()  # ready

        async def expect(kind, code=None):
            while True:
                m = await asyncio.wait_for(ws.recv(), 60)
                if isinstance(m, bytes):
                    continue
                m = json.loads(m)
                if m["type"] == kind and (code is None or m.get("code") == code):
                    return m
                assert m["type"] in ("progress", "window", "frame_result", "ack", "error"), m

        await ws.send(b"this is not an image")
        e = await expect("error")
        assert e["code"] == "INVALID_IMAGE" and e["fatal"] is False
        await ws.send(encode_frame_message(b"\x89PNG\r\n\x1a\ntruncated", {"frame_id": 7}))
        e = await expect("error")
        assert e["code"] == "INVALID_IMAGE" and e["frame_id"] == 7
        await ws.send("{not json")
        assert (await expect("error"))["code"] == "INVALID_MESSAGE"
        await ws.send(json.dumps({"type": "teleport"}))
        assert (await expect("error"))["code"] == "INVALID_MESSAGE"
        await ws.send(b"DA3F\x01\x00\x10\x00{}")  # header length beyond the message
        assert (await expect("error"))["code"] == "INVALID_MESSAGE"
        await ws.send(json.dumps({"type": "ping", "t": 42}))
        assert (await expect("pong"))["t"] == 42
        await ws.send(encode_frame_message(frame_bytes(synthetic_seq, 0), {"frame_id": "ok"}))
        ack = await expect("ack")
        assert ack["frame_id"] == "ok" and ack["index"] == 0
        await ws.send(json.dumps({"type": "finalize"}))
        await ws.send(encode_frame_message(frame_bytes(synthetic_seq, 1), None))  # after finalize
        assert (await expect("error"))["code"] == "SESSION_FINALIZED"
        await expect("summary")
    info = httpx.get(f"{serve_url}/ws/session/{sid}").json()
    assert info["frames_received"] == 1 and info["frames_processed"] == 1 and info["state"] == "complete"


async def test_queue_full_rejects_excess_without_losing_accepted(serve_url, synthetic_seq):
    sid = create(serve_url, window_size=8, overlap=2)["session_id"]
    col = Collector()
    async with websockets.connect(ws_url(serve_url, sid), max_size=None) as ws:
        await ws.recv()
        reader = asyncio.create_task(col.read_until_closed(ws))
        for i in range(20):  # ignore flow control on purpose
            await ws.send(encode_frame_message(frame_bytes(synthetic_seq, i), {"frame_id": i}))
        await asyncio.sleep(1.0)
        await ws.send(json.dumps({"type": "finalize"}))
        await reader
    rejected = [e for e in col.of("error") if e["code"] == "QUEUE_FULL"]
    accepted = [a["frame_id"] for a in col.of("ack")]
    assert rejected and all(e["fatal"] is False for e in rejected)
    assert len(accepted) + len(rejected) == 20
    assert sorted(r["frame_id"] for r in col.of("frame_result")) == sorted(accepted)


async def test_reconnect_resumes_without_losing_accepted_frames(serve_url, synthetic_seq):
    sid = create(serve_url)["session_id"]
    acked = []
    async with websockets.connect(ws_url(serve_url, sid), max_size=None) as ws:
        await ws.recv()
        for i in range(7):
            await ws.send(encode_frame_message(frame_bytes(synthetic_seq, i), {"frame_id": i}))
        while len(acked) < 7:
            m = await ws.recv()
            if isinstance(m, str) and json.loads(m)["type"] == "ack":
                acked.append(json.loads(m)["frame_id"])
        # drop the connection without finalizing
    col = Collector()
    async with websockets.connect(ws_url(serve_url, sid, resume_from=0), max_size=None) as ws:
        ready = json.loads(await ws.recv())
        assert ready["frames_received"] == 7
        reader = asyncio.create_task(col.read_until_closed(ws))
        await ws.send(json.dumps({"type": "finalize"}))
        await reader
    assert col.close_code == 1000
    assert sorted(r["frame_id"] for r in col.of("frame_result")) == list(range(7))


async def test_second_connection_takes_over(serve_url):
    sid = create(serve_url)["session_id"]
    async with websockets.connect(ws_url(serve_url, sid)) as first:
        await first.recv()
        async with websockets.connect(ws_url(serve_url, sid)) as second:
            assert json.loads(await second.recv())["type"] == "ready"
            m = json.loads(await asyncio.wait_for(first.recv(), 30))
            assert m["code"] == "SESSION_BUSY" and m["fatal"] is True
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(first.recv(), 30)
            assert first.close_code == 4409
            await second.send(json.dumps({"type": "ping", "t": 1}))
            assert json.loads(await second.recv())["type"] == "pong"


async def test_delete_closes_open_stream(serve_url):
    sid = create(serve_url)["session_id"]
    async with websockets.connect(ws_url(serve_url, sid)) as ws:
        await ws.recv()
        assert httpx.delete(f"{serve_url}/ws/session/{sid}").status_code == 204
        m = json.loads(await asyncio.wait_for(ws.recv(), 30))
        assert m["type"] == "error" and m["fatal"]
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 30)
    assert ws.close_code == 4000


async def test_expiry_sweep_removes_idle_session(serve_url):
    sid = create(serve_url, idle_ttl_s=1.0)["session_id"]
    deadline = time.time() + 30
    while time.time() < deadline:
        r = httpx.get(f"{serve_url}/ws/session/{sid}")
        if r.status_code != 200:
            break
        await asyncio.sleep(0.3)
    assert r.status_code == 410 and r.json()["error"]["code"] == "SESSION_EXPIRED"
    assert sid not in [s["session_id"] for s in httpx.get(f"{serve_url}/ws/sessions").json()["sessions"]]
    async with websockets.connect(ws_url(serve_url, sid)) as ws:
        assert json.loads(await ws.recv())["code"] == "SESSION_EXPIRED"
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4410


async def test_hostile_and_odd_images(serve_url, synthetic_seq):
    """Odd but valid images are converted; hostile ones get their own codes; the session keeps working."""
    import io
    import struct
    import zlib

    from PIL import Image

    def png_bomb(w=60000, h=60000) -> bytes:  # a tiny file declaring 3.6 G pixels
        def chunk(t, d):
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
            chunk(b"IEND", b"")

    def pil_bytes(img: Image.Image, fmt: str) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt)
        return buf.getvalue()

    base = Image.fromarray(synthetic_seq.images[2])
    odd = {  # all must be accepted and processed
        "gray": pil_bytes(base.convert("L"), "PNG"),
        "rgba": pil_bytes(base.convert("RGBA"), "PNG"),
        "cmyk": pil_bytes(base.convert("CMYK"), "JPEG"),
        "big": pil_bytes(base.resize((320, 240)), "JPEG"),  # mixed resolution within the session
        "webp": pil_bytes(base, "WEBP"),
    }
    hostile = {
        "bomb": (png_bomb(), "TOO_MANY_PIXELS"),
        "empty": (b"", "INVALID_MESSAGE"),
        "gif": (pil_bytes(base.convert("P"), "GIF"), "UNSUPPORTED_FORMAT"),
        "huge": (b"\xff" * 2_100_000, "MESSAGE_TOO_LARGE"),
        "toobig": (b"\xff" * 2_010_000, "IMAGE_TOO_LARGE"),
    }
    sid = create(serve_url)["session_id"]
    col = Collector()
    async with websockets.connect(ws_url(serve_url, sid), max_size=None) as ws:
        await ws.recv()
        reader = asyncio.create_task(col.read_until_closed(ws))
        for name, (data, _) in hostile.items():
            if name == "huge":
                await ws.send(data)
            elif not data:  # the client library refuses to build this; craft it by hand
                hdr = json.dumps({"frame_id": name}).encode()
                await ws.send(b"DA3F" + struct.pack("<BBH", 1, 0, len(hdr)) + hdr)
            else:
                await ws.send(encode_frame_message(data, {"frame_id": name}))
        for name, data in odd.items():
            await ws.send(encode_frame_message(data, {"frame_id": name}))
        await asyncio.sleep(0.5)
        await ws.send(json.dumps({"type": "finalize"}))
        await reader
    errors = {e.get("frame_id"): e["code"] for e in col.of("error") if e.get("frame_id") is not None}
    anonymous = sorted(e["code"] for e in col.of("error") if e.get("frame_id") is None)
    # messages rejected before their header is trusted carry no frame id
    assert anonymous == ["INVALID_MESSAGE", "MESSAGE_TOO_LARGE"]
    assert errors == {name: code for name, (_, code) in hostile.items() if name not in ("empty", "huge")}
    assert sorted(r["frame_id"] for r in col.of("frame_result")) == sorted(odd)
    assert all(not r.get("failed") for r in col.of("frame_result"))
    sizes = {r["frame_id"]: r["original_size"] for r in col.of("frame_result")}
    assert sizes["big"] == [320, 240] and all(r["image_size"] == [154, 112] for r in col.of("frame_result"))
    assert col.close_code == 1000


def _extensions(ws) -> str:
    response = getattr(ws, "response", None)  # websockets.asyncio client; the legacy one has response_headers
    headers = response.headers if response is not None else ws.response_headers
    return headers.get("Sec-WebSocket-Extensions", "") or ""


async def test_python_client_skips_permessage_deflate_unless_asked(serve_url, synthetic_seq):
    """The proxy would deflate every points message for a client that offers it (~10 ms a window for ~10% fewer
    bytes): the Python client does not offer it unless compression=True, and both ways give the same records."""
    from da3_client import Da3Client

    clouds = {}
    async with Da3Client(serve_url) as client:
        for compression in (False, True):
            sid = (await client.create_session(window_size=4, overlap=2))["session_id"]
            async with client.stream(sid, compression=compression) as s:
                assert ("permessage-deflate" in _extensions(s._ws)) is compression
                for i in range(6):
                    await s.send_frame(encode_image(synthetic_seq.images[i], "PNG"), frame_id=i)
                summary = await s.finalize(timeout=120)
                assert summary["frames_processed"] == 6
                clouds[compression] = s.reconstruction.points()
            await client.delete_session(sid)  # the shared app caps open sessions per key
    # same model, same frames: the same cloud (the float16 wire encoding is exact either way)
    np.testing.assert_array_equal(clouds[False], clouds[True])
    assert len(clouds[False]) > 0


async def test_committed_records_go_straight_to_the_stream_and_match_the_store(serve_url, synthetic_seq):
    """Records the local worker commits are sent without waiting for the session actor's long-poll, exactly as the
    actor stored them: with a point budget smaller than a window, the budget trims each new record's oldest
    points at commit, and the streamed chunks are trimmed the same way (the export is the stream's newest
    max_points points)."""
    async with httpx.AsyncClient(base_url=serve_url, timeout=30) as http:
        before = (await http.get("/stats")).json()["records_sent"]
    info = create(serve_url, window_size=4, overlap=2, max_points=1000)
    sid, n = info["session_id"], 8
    async with websockets.connect(ws_url(serve_url, sid), max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for i in range(n):
            await ws.send(encode_frame_message(frame_bytes(synthetic_seq, i), {"frame_id": i}))
        await ws.send(json.dumps({"type": "finalize"}))
        col = Collector()
        await col.read_until_closed(ws)
    assert col.close_code == 1000 and not col.of("error")
    windows = col.of("window")
    assert len(windows) == len(col.chunks) == 3
    assert all(0 < c.count <= 1000 for c in col.chunks)
    async with httpx.AsyncClient(base_url=serve_url, timeout=30) as http:
        after = (await http.get("/stats")).json()["records_sent"]
        ply = (await http.get(f"/ws/session/{sid}/reconstruction.ply")).content
        assert (await http.delete(f"/ws/session/{sid}")).status_code == 204  # the shared app caps open sessions
    local = after.get("local", 0) - before.get("local", 0)
    # each record is sent once; the commit reply normally beats the long-poll's answer (which carries the points)
    assert local + after.get("long_poll", 0) - before.get("long_poll", 0) == 3 and local >= 2
    pts, _ = read_ply(ply)
    streamed = np.concatenate([c.points for c in col.chunks])
    assert len(pts) == 1000 < len(streamed)
    np.testing.assert_allclose(pts, streamed[-1000:], atol=0.05 * (1 + np.abs(pts).max()))  # float16 on the wire
