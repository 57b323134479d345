"""Client library without Ray: wire compatibility with serve_app.protocol, the Reconstruction accumulator, PLY
output, frame sources, the CLI as a script, and StreamSession flow control / resume against a small protocol
peer (a WebSocket server built from serve_app.protocol that can drop connections on demand, which the real
server cannot be made to do; the lead's end-to-end tests run the client against the real server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from da3_client import (
    Da3Client,
    Da3Error,
    Reconstruction,
    decode_points,
    encode_frame,
    frame_header,
    iter_image_files,
    iter_video_frames,
)
from da3_client.sources import resize_longest
from plyfile import PlyData
from websockets.asyncio.server import serve

from serve_app import protocol as P
from serve_app.media.imaging import decode_image, encode_image

ROOT = Path(__file__).resolve().parents[2]


def pose(tx: float) -> list:
    m = np.eye(4)
    m[0, 3] = tx
    return m.tolist()


def record_messages(seq: int, window: int, frame_ids: list, n_points: int, index0: int = 0) -> list:
    """The messages of one result record as the server sends them: window, frame_results, points."""
    rng = np.random.default_rng(seq)
    pts = rng.normal(size=(n_points, 3)).astype(np.float32) + seq
    cols = rng.integers(0, 256, (n_points, 3), dtype=np.uint8)
    msgs: list = [P.msg_window(seq, {"window": window, "frame_ids": frame_ids, "context_frame_ids": [],
                                     "alignment": {"ok": True, "scale": 1.0, "rmse": 0.0, "inlier_ratio": 1.0,
                                                   "num_points": 0},
                                     "timings_ms": {"queue": 1, "model": 2, "geometry": 3, "total": 6}})]
    for i, fid in enumerate(frame_ids):
        msgs.append(P.msg_frame_result(seq, {
            "frame_id": fid, "index": index0 + i, "window": window, "pose": pose(float(index0 + i)),
            "intrinsics": [[50.0, 0, 20], [0, 50.0, 15], [0, 0, 1]], "image_size": [40, 30],
            "original_size": [80, 60], "depth": {"min": 1, "max": 2, "median": 1.5},
            "points_added": n_points // len(frame_ids), "latency_ms": 5.0, "timestamp": 0.1 * (index0 + i)}))
    msgs.append(P.encode_points(pts, cols, seq=seq, window=window, frame_ids=frame_ids))
    return msgs


# --- wire compatibility ----------------------------------------------------------------------------------------
def test_client_frames_parse_on_the_server():
    K = [[100.0, 0, 50], [0, 100.0, 40], [0, 0, 1]]
    data = encode_frame(b"IMG", frame_header("f1", 2.5, np.array(K), np.eye(4)))
    frame = P.parse_binary_message(data)
    assert frame.image == b"IMG" and frame.meta.frame_id == "f1" and frame.meta.timestamp == 2.5
    assert frame.meta.intrinsics == K and frame.meta.pose == np.eye(4).tolist()
    assert P.parse_binary_message(encode_frame(b"IMG")).meta == P.FrameMeta()


@pytest.mark.parametrize("kwargs", [{"frame_id": -1}, {"frame_id": True}, {"frame_id": "x" * 65},
                                    {"timestamp": float("nan")}, {"intrinsics": np.eye(4)},
                                    {"pose": np.full((4, 4), np.inf)}])
def test_frame_header_validates_locally(kwargs):
    with pytest.raises(ValueError):
        frame_header(**kwargs)


@pytest.mark.parametrize("encoding", ["float16", "float32"])
def test_server_points_decode_in_the_client(encoding):
    pts = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32) * 4 + 20
    cols = np.arange(150, dtype=np.uint8).reshape(50, 3)
    data = P.encode_points(pts, cols, seq=9, window=4, frame_ids=["a", 3], encoding=encoding)
    chunk = decode_points(data)
    ref = P.decode_points(data)
    assert (chunk.seq, chunk.window, chunk.frame_ids) == (9, 4, ["a", 3])
    assert np.array_equal(chunk.points, ref.points) and np.array_equal(chunk.colors, cols)
    assert np.allclose(chunk.points, pts, atol=0.02)
    with pytest.raises(Da3Error) as ei:
        decode_points(data[:-2])
    assert ei.value.code == "PROTOCOL_ERROR"


# --- Reconstruction --------------------------------------------------------------------------------------------
def test_reconstruction_accumulates_records(tmp_path):
    recon = Reconstruction()
    msgs = record_messages(1, 0, [0, 1, 2], 30) + record_messages(2, 1, [3, 4], 20, index0=3)
    chunks = [recon.apply(m) for m in msgs]
    assert sum(c is not None for c in chunks) == 2
    assert recon.last_seq == 2 and recon.num_points == 50
    assert set(recon.poses) == {0, 1, 2, 3, 4}
    assert np.allclose(recon.poses[4][0, 3], 4.0) and recon.intrinsics[3][0, 0] == 50.0
    pts, cols = recon.points(), recon.colors()
    assert pts.shape == (50, 3) and pts.dtype == np.float32 and cols.shape == (50, 3) and cols.dtype == np.uint8
    expected = np.concatenate([P.decode_points(msgs[4]).points, P.decode_points(msgs[-1]).points])
    assert np.array_equal(pts, expected)
    traj = recon.trajectory()
    assert [f["frame_id"] for f in traj] == [0, 1, 2, 3, 4] and traj[2]["pose"][0][3] == 2.0

    # A replayed record (seq <= last_seq) changes nothing.
    for m in record_messages(2, 1, [3, 4], 20, index0=3):
        recon.apply(m)
    assert recon.num_points == 50 and len(recon.chunks) == 2

    ply = recon.write_ply(tmp_path / "out.ply")
    v = PlyData.read(str(ply))["vertex"]
    assert len(v) == 50
    assert np.allclose(np.stack([v["x"], v["y"], v["z"]], 1), pts)
    assert np.array_equal(np.stack([v["red"], v["green"], v["blue"]], 1), cols)
    data = json.loads(recon.write_trajectory(tmp_path / "t.json").read_text())
    assert len(data["frames"]) == 5 and data["frames"][0]["intrinsics"][0][0] == 50.0


def test_reconstruction_failed_frames_and_empty(tmp_path):
    recon = Reconstruction()
    recon.apply({"type": "window", "seq": 1, "window": 0, "frame_ids": ["x"], "alignment": {"ok": False}})
    recon.apply({"type": "frame_result", "seq": 1, "frame_id": "x", "index": 0, "pose": None, "intrinsics": None})
    recon.apply(P.encode_points(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), seq=1, window=0, frame_ids=["x"]))
    assert recon.failed_frames == ["x"] and recon.poses == {} and recon.trajectory() == []
    assert recon.last_seq == 1 and recon.points().shape == (0, 3)
    assert len(PlyData.read(str(recon.write_ply(tmp_path / "e.ply")))["vertex"]) == 0


# --- sources ---------------------------------------------------------------------------------------------------
def test_iter_image_files_natural_order_and_resize(tmp_path):
    for i in (10, 2, 1):
        (tmp_path / f"frame{i}.png").write_bytes(encode_image(np.full((30, 60, 3), i, np.uint8), "PNG"))
    (tmp_path / "notes.txt").write_text("skip me")
    out = list(iter_image_files(tmp_path, resize=20))
    assert [fid for fid, _ in out] == ["frame1", "frame2", "frame10"]
    assert out[2][1].shape == (10, 20, 3) and out[2][1][0, 0, 0] == 10
    assert [f for f, _ in iter_image_files(str(tmp_path / "*.png"), every=2)] == ["frame1", "frame10"]
    assert len(list(iter_image_files(tmp_path, max_frames=1))) == 1
    with pytest.raises(FileNotFoundError):
        list(iter_image_files(tmp_path / "none"))
    assert resize_longest(np.zeros((10, 10, 3), np.uint8), 50).shape == (10, 10, 3)  # never upscales


def test_iter_video_frames(tmp_path):
    import av

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            img = np.full((48, 64, 3), i * 12, np.uint8)
            for pkt in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    all_frames = list(iter_video_frames(path))
    assert [i for i, _ in all_frames] == list(range(20)) and all_frames[0][1].shape == (48, 64, 3)
    assert [i for i, _ in iter_video_frames(path, every=5)] == [0, 5, 10, 15]
    fps = list(iter_video_frames(path, fps=2.5, with_timestamp=True))
    assert [i for i, _, _ in fps] == [0, 4, 8, 12, 16]
    assert list(iter_video_frames(path, max_frames=3, resize=32))[2][1].shape == (24, 32, 3)


# --- CLI as a plain script -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_runs_as_script_and_reports_errors(tmp_path):
    cmd = [sys.executable, str(ROOT / "clients" / "websocket_client.py")]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and "--keep-session" in r.stdout
    r = subprocess.run([*cmd, "--video", "a.mp4", "--images", "x"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=60)
    assert r.returncode == 2  # the two sources are exclusive
    r = subprocess.run([*cmd, "--images", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "no image files" in r.stderr  # checked before any session is created
    (tmp_path / "a.png").write_bytes(encode_image(np.zeros((8, 8, 3), np.uint8), "PNG"))
    r = subprocess.run([*cmd, "--url", "http://127.0.0.1:9", "--images", str(tmp_path), "--json"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 1 and "CONNECTION_ERROR" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["error"]["code"] == "CONNECTION_ERROR"


# --- StreamSession against a protocol peer ---------------------------------------------------------------------
class Peer:
    """A minimal protocol peer: windows of `window` new frames, one record each, acks, QUEUE_FULL and a one-off
    connection drop (close 1001) after a chosen accepted frame, before its ack is sent."""

    def __init__(self, window: int = 2, max_in_flight: int = 3, queue_full_once: tuple = (),
                 drop_after: int | None = None, missing: bool = False, fatal_after: int | None = None,
                 over_budget_once: tuple = ()):
        self.window, self.max_in_flight = window, max_in_flight
        self.queue_full_once = set(queue_full_once)
        self.over_budget_once = set(over_budget_once)  # answered DECODE_BUDGET_EXCEEDED once
        self.drop_after, self.missing, self.fatal_after = drop_after, missing, fatal_after
        self.accepted: list = []  # frame ids in acceptance order
        self.images: list = []
        self.pending: list = []
        self.records: list[list] = []
        self.processed = 0
        self.connections: list[dict] = []
        self.state = "created"

    async def handler(self, ws):
        q = parse_qs(urlparse(ws.request.path).query)
        self.connections.append({k: v[0] for k, v in q.items()}
                                | {"authorization": ws.request.headers.get("Authorization"),
                                   "x-session-id": ws.request.headers.get("x-session-id")})
        if self.missing:
            await ws.send(json.dumps(P.msg_error("SESSION_NOT_FOUND", "no such session", fatal=True)))
            await ws.close(4404, "SESSION_NOT_FOUND")
            return
        await ws.send(json.dumps(P.msg_ready(
            session_id="s1", params={}, state=self.state, frames_received=len(self.accepted),
            frames_processed=self.processed, points_total=0, last_seq=len(self.records),
            max_in_flight=self.max_in_flight, in_flight=len(self.pending))))
        after = int(q.get("resume_from", [len(self.records)])[0])
        for rec in self.records[after:]:
            for m in rec:
                await ws.send(m if isinstance(m, bytes) else json.dumps(m))
        async for raw in ws:
            if isinstance(raw, bytes):
                frame = P.parse_binary_message(raw)
                fid = frame.meta.frame_id
                if fid in self.queue_full_once or len(self.pending) >= self.max_in_flight:
                    self.queue_full_once.discard(fid)
                    await ws.send(json.dumps(P.msg_error("QUEUE_FULL", "full", frame_id=fid)))
                    continue
                if fid in self.over_budget_once:
                    self.over_budget_once.discard(fid)
                    await ws.send(json.dumps(P.msg_error("DECODE_BUDGET_EXCEEDED", "over budget", frame_id=fid,
                                                         details={"retry_after_s": 0.05})))
                    continue
                self.accepted.append(fid)
                self.images.append(decode_image(frame.image))
                self.pending.append(fid)
                if self.drop_after is not None and len(self.accepted) == self.drop_after:
                    self.drop_after = None
                    await ws.close(1001, "going away")  # the ack of this frame is lost
                    return
                if self.fatal_after is not None and len(self.accepted) == self.fatal_after:
                    await ws.send(json.dumps(P.msg_error("INTERNAL_ERROR", "boom", fatal=True)))
                    await ws.close(4500, "INTERNAL_ERROR")
                    return
                await ws.send(json.dumps(P.msg_ack(fid, len(self.accepted) - 1, in_flight=len(self.pending),
                                                   max_in_flight=self.max_in_flight)))
                if len(self.pending) >= self.window:
                    await self.process(ws)
                continue
            msg = P.parse_text_message(raw, max_bytes=1 << 20)
            if msg.type == "ping":
                await ws.send(json.dumps(P.msg_pong(msg.t)))
            elif msg.type in ("flush", "finalize"):
                if self.pending:
                    await self.process(ws)
                if msg.type == "finalize":
                    self.state = "complete"
                    await ws.send(json.dumps(P.msg_summary(
                        "s1", frames_received=len(self.accepted), frames_processed=self.processed,
                        points_total=0, windows=len(self.records), duration_s=0.1)))
                    await ws.close(1000, "complete")
                    return

    async def process(self, ws):
        ids, self.pending = self.pending, []
        rec = record_messages(len(self.records) + 1, len(self.records), ids, 4 * len(ids), index0=self.processed)
        self.records.append(rec)
        self.processed += len(ids)
        for m in rec:
            await ws.send(m if isinstance(m, bytes) else json.dumps(m))


async def run_peer(peer: Peer, body):
    async with serve(peer.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with Da3Client(f"http://127.0.0.1:{port}", token="k e y") as client:
            return await body(client)


def frames(n: int) -> list[np.ndarray]:
    return [np.full((16, 20, 3), 10 * i, np.uint8) for i in range(n)]


async def test_stream_flow_control_queue_full_and_finalize():
    peer = Peer(window=2, max_in_flight=3, queue_full_once=(3,))
    seen: list = []

    async def body(client):
        async with client.stream("s1", on_message=seen.append, backoff_s=0.05) as s:
            for img in frames(7):
                await s.send_frame(img)
            pong = await s.ping()
            summary = await s.finalize(timeout=30)
        return s, summary, pong

    s, summary, pong = await run_peer(peer, body)
    # The frame answered QUEUE_FULL was resent (frames already on the wire behind it may overtake it).
    assert sorted(peer.accepted) == list(range(7)) and peer.accepted.index(3) > 2
    assert [int(img[0, 0, 0]) for img in peer.images] == [10 * fid for fid in peer.accepted]
    assert summary["frames_processed"] == 7 and s.summary is summary
    assert s.reconstruction.last_seq == 4 and set(s.reconstruction.poses) == set(range(7))
    assert s.reconstruction.num_points == 28 and s.frames_processed == 7
    assert s.pending == 0 and s.rejected == [] and pong["type"] == "pong"
    # The key goes in the handshake's Authorization header, never in the URL.
    assert peer.connections[0]["authorization"] == "Bearer k e y" and "token" not in peer.connections[0]
    # and the session id as the routing key of Serve's consistent-hash router (session affinity)
    assert peer.connections[0]["x-session-id"] == s.session_id
    assert any(isinstance(m, dict) and m.get("code") == "QUEUE_FULL" for m in seen)


async def test_stream_resends_a_frame_refused_for_the_decode_budget():
    peer = Peer(window=2, max_in_flight=3, over_budget_once=(1, 4))

    async def body(client):
        async with client.stream("s1", backoff_s=0.05) as s:
            for img in frames(6):
                await s.send_frame(img)
            await s.finalize(timeout=30)
        return s

    s = await run_peer(peer, body)
    assert sorted(peer.accepted) == list(range(6)) and s.rejected == [] and s.frames_processed == 6


async def test_stream_resumes_after_going_away():
    peer = Peer(window=2, max_in_flight=4, drop_after=3)

    async def body(client):
        async with client.stream("s1", backoff_s=0.05) as s:
            for img in frames(6):
                await s.send_frame(img)
            summary = await s.finalize(timeout=30)
        return s, summary

    s, summary = await run_peer(peer, body)
    assert s.reconnects == 1
    assert peer.accepted == list(range(6))  # frame 2 was accepted before the drop: not sent twice
    assert peer.connections[1]["resume_from"] == "1"  # record 1 (frames 0, 1) had arrived
    assert set(s.reconstruction.poses) == set(range(6)) and s.reconstruction.last_seq == 3
    assert summary["frames_received"] == 6


async def test_stream_errors_raise_da3error():
    async def connect_missing(client):
        with pytest.raises(Da3Error) as ei:
            async with client.stream("nope"):
                pass
        return ei.value

    err = await run_peer(Peer(missing=True), connect_missing)
    assert err.code == "SESSION_NOT_FOUND" and err.status == 4404

    async def fatal(client):
        async with client.stream("s1", backoff_s=0.05) as s:
            with pytest.raises(Da3Error) as ei:
                for img in frames(10):
                    await s.send_frame(img)
                await s.finalize(timeout=10)
        return ei.value

    err = await run_peer(Peer(fatal_after=2), fatal)
    assert err.code == "INTERNAL_ERROR"


async def test_http_errors_carry_server_codes():
    async with Da3Client("http://127.0.0.1:9", timeout=2) as client:
        with pytest.raises(Da3Error) as ei:
            await client.get_session("x")
    assert ei.value.code == "CONNECTION_ERROR"
    c = Da3Client("https://example.org/", token="t")
    assert c.websocket_url("abc", 5) == "wss://example.org/ws/reconstruct/abc?resume_from=5"
    assert c.headers == {"Authorization": "Bearer t"}


async def test_stream_never_overruns_the_in_flight_window():
    peer = Peer(window=3, max_in_flight=3)

    async def body(client):
        async with client.stream("s1") as s:
            for img in frames(9):
                await s.send_frame(img)
            return s, await s.finalize(timeout=30)

    s, summary = await run_peer(peer, body)
    assert s.errors == [] and peer.accepted == list(range(9)) and summary["windows"] == 3


async def test_stream_applies_and_acknowledges_a_correction_record_live_and_on_resume():
    """A `correction` record (docs/WEBSOCKET_API.md 3.5.1) is applied to the Reconstruction, acknowledged with
    `received` like a points message, counts as the last complete record, and is replayed on a resume."""
    from serve_app.recon import corrections as C
    from serve_app.recon.geometry import Sim3

    T = Sim3(1.1, np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), np.array([1.0, 2.0, 3.0]))
    correction = C.to_message(C.Correction(1, {0: T}), seq=2)
    records = [record_messages(1, 0, [0, 1], 6), [correction], record_messages(3, 1, [2, 3], 6, index0=2)]
    received: list[int] = []
    connections: list[str] = []

    async def handler(ws):
        q = parse_qs(urlparse(ws.request.path).query)
        after = int(q.get("resume_from", ["0"])[0])
        connections.append(str(after))
        await ws.send(json.dumps(P.msg_ready(session_id="s1", params={}, state="streaming", frames_received=4,
                                             frames_processed=4, points_total=12, last_seq=3, max_in_flight=4,
                                             in_flight=0)))
        for rec in records[after:2] if after == 0 else records[after:]:  # first: up to the correction
            for m in rec:
                await ws.send(m if isinstance(m, bytes) else json.dumps(m))
        async for raw in ws:
            msg = json.loads(raw)
            if msg["type"] == "received":
                received.append(msg["seq"])
                if len(connections) == 1 and msg["seq"] == 2:
                    await ws.close(1012, "restart")  # drop right after the correction: resume from seq 2
                    return
            elif msg["type"] == "finalize":
                await ws.send(json.dumps(P.msg_summary("s1", frames_received=4, frames_processed=4,
                                                       points_total=12, windows=2, duration_s=0.1)))
                await ws.close(1000, "complete")
                return

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = Da3Client(f"http://127.0.0.1:{port}")
        async with client, client.stream("s1", resume_from=0, backoff_s=0.05) as s:
            for _ in range(1000):  # the peer drops the connection once the correction is acknowledged
                if s.reconnects:
                    break
                await asyncio.sleep(0.01)
            await s.finalize(timeout=30)
    rec = s.reconstruction
    assert connections == ["0", "2"] and received[:2] == [1, 2] and received[-1] == 3
    assert rec.last_seq == 3 and rec.corrections == 1 and rec.correction_version == 1
    raw = rec.points(corrected=False)
    out = rec.points()
    Tq = C.from_message(correction).transforms[0]
    assert np.allclose(out[:6], Tq.apply(raw[:6]), atol=1e-6) and np.array_equal(out[6:], raw[6:])
    assert np.allclose(rec.poses[0], Tq.transform_c2w(rec.original_poses[0]), atol=1e-6)
    assert np.array_equal(rec.poses[2], rec.original_poses[2])  # window 1 came after: identity
