"""Shared benchmark plumbing: start Ray + Serve + the app in-process, stream one session with flow control, and
collect per-frame / per-window timings as the client sees them.

Loopback only. Every wait is bounded, so a benchmark always stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.evaluation.synthetic import SceneSpec, render_sequence
from serve_app.media.imaging import encode_image
from serve_app.protocol import decode_points, encode_frame_message
from serve_app.ray_env import RAY_ENV_VARS

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RETRY_CODES = {"QUEUE_FULL", "FRAME_RATE_LIMITED", "BYTE_RATE_LIMITED"}  # the frame was not accepted; send it again later


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK:
        raise SystemExit(f"refusing non-loopback URL {url!r}: benchmarks only talk to 127.0.0.1 / localhost")


# --- frames -------------------------------------------------------------------------------------------------
def synthetic_frames(num_frames: int = 48, width: int = 154, height: int = 112, seed: int = 3,
                     quality: int = 90) -> list[bytes]:
    """JPEG-encoded frames of one orbit (the orbit is closed, so cycling the list stays continuous)."""
    seq = render_sequence(SceneSpec(seed=seed, num_frames=num_frames, width=width, height=height,
                                    trajectory="orbit"))
    return [encode_image(img, "JPEG", quality) for img in seq.images]


# --- app lifecycle ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(*, model: str = "random:da3-small", backend: str = "da3", process_res: int = 154,
             window_size: int = 4, overlap: int = 2, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.0,
             max_in_flight: int = 32, max_sessions: int = 64, oracle_scene: dict | None = None,
             actor_name: str | None = None) -> dict:
    """build_app args for a benchmark app (limits loose enough that only flow control shapes the load)."""
    mdl: dict[str, Any] = {"backend": backend, "checkpoint": model, "amp": "auto"}
    if backend == "oracle":
        mdl["oracle_scene"] = oracle_scene or {"seed": 3, "num_frames": 48, "width": 154, "height": 112,
                                               "trajectory": "orbit"}
    return {
        "model": mdl,
        "batching": {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s},
        "session_defaults": {"process_res": process_res, "window_size": window_size, "overlap": overlap},
        "limits": {"max_sessions": max_sessions, "max_sessions_per_key": max_sessions,
                   "sessions_per_minute": 10000.0, "max_in_flight": max_in_flight, "model_timeout_s": 600.0},
        "session_actor": {"name": actor_name or f"bench_sessions_{uuid.uuid4().hex[:8]}",
                          "namespace": "da3-serve-bench"},
    }


class LocalApp:
    """Ray (with fake logical GPUs so `num_gpus: 1` schedules on CPU) + Serve + the da3 app, in this process."""

    def __init__(self, num_cpus: int = 4, num_gpus: int = 1, omp_threads: int = 2):
        import ray
        from ray import serve

        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, namespace="da3-serve-bench",
                 log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(omp_threads),
                                           **RAY_ENV_VARS}})
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = "bench"

    def deploy(self, args: dict, timeout_s: float = 600.0) -> str:
        """(Re)deploy the app and wait until /healthz answers 200 and the model runs `args`' batching."""
        from ray import serve

        from serve_app.app import build_app

        serve.run(build_app(args), name=self.name, route_prefix="/", blocking=False)
        want = args["batching"]["max_batch_size"]
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=10).status_code == 200:
                    st = httpx.get(self.url + "/stats", timeout=30).json()
                    if st["model"]["batching"]["max_batch_size"] == want:
                        return self.url
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(1)
        raise RuntimeError("bench app did not become healthy")

    def replica_pids(self) -> dict[str, int]:
        """{"Ingress": pid, "DA3ModelServer": pid, "SessionActor": pid}: our Ray workers are descendants of this
        driver (it started the raylet), named by their process title (no dashboard needed)."""
        import psutil

        tags = {"Ingress": f"ServeReplica:{self.name}:Ingress", "DA3ModelServer":
                f"ServeReplica:{self.name}:DA3ModelServer", "SessionActor": "ray::SessionActor"}
        out: dict[str, int] = {}
        for p in psutil.Process().children(recursive=True):
            try:
                title = " ".join(p.cmdline())
            except psutil.Error:
                continue
            for key, tag in tags.items():
                if tag in title and key not in out:
                    out[key] = p.pid
        return out

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def rss_mb(pid: int | None) -> float:
    if not pid:
        return float("nan")
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - process gone or psutil missing
        return float("nan")


def stats(url: str) -> dict:
    return httpx.get(url.rstrip("/") + "/stats", timeout=30).json()


# --- one streamed session -----------------------------------------------------------------------------------
@dataclass
class StreamResult:
    session_id: str = ""
    frames_sent: int = 0  # distinct frames sent (a resend after QUEUE_FULL is not counted again)
    sends: int = 0  # messages sent, resends included
    acked: set = field(default_factory=set)
    results: dict = field(default_factory=dict)  # frame_id -> frame_result message
    failed_frames: int = 0
    windows: list = field(default_factory=list)  # window messages + "t_recv" + "t_points" + "points_bytes"
    chunks: list = field(default_factory=list)  # decoded PointChunks (keep_points only)
    frame_latency_ms: dict = field(default_factory=dict)  # frame_id -> client send -> its points message
    send_t: dict = field(default_factory=dict)  # frame_id -> first send time (monotonic)
    errors: Counter = field(default_factory=Counter)
    summary: dict | None = None
    loops_accepted: int | None = None  # the latest `correction` message's count (loops closed so far)
    close_code: int | None = None
    t_first_send: float = 0.0
    t_last_points: float = 0.0
    t_end: float = 0.0
    json_bytes: int = 0  # window + frame_result JSON bytes received
    fatal: str | None = None
    rejected_final: int = 0  # frames refused for good (not retried)
    clock_offset: float = 0.0  # time.time() - time.monotonic() here: server_time on the client's clock (loopback)
    types: Counter = field(default_factory=Counter)  # JSON messages received, by type (unknown types too)

    @property
    def lost(self) -> list:
        """Acked frames with no frame_result: must be empty after a clean finalize."""
        return sorted((f for f in self.acked if f not in self.results), key=str)

    @property
    def span_s(self) -> float:
        return max(self.t_last_points - self.t_first_send, 1e-9)

    def window_rows(self) -> list[dict]:
        """Per window: server timings, batch size, client latency (last new frame sent -> points received)
        and network ≈ client latency of the window's first new frame minus the server's `total`."""
        rows = []
        for w in self.windows:
            t = w.get("timings_ms", {})
            ids = w.get("frame_ids", [])
            sends = [self.send_t[f] for f in ids if f in self.send_t]
            if not sends or "t_points" not in w:
                continue
            first, last = min(sends), max(sends)
            client_first = (w["t_points"] - first) * 1000.0
            client_last = (w["t_points"] - last) * 1000.0
            # On one clock (loopback): the server's results-ready time and its last-frame arrival
            ready = w["server_time"] - self.clock_offset if "server_time" in w else None
            last_rx = ready - t.get("last_frame", 0.0) / 1000.0 if ready is not None else None
            rows.append({
                "queue": t.get("queue"), "model": t.get("model"), "model_roundtrip": t.get("model_roundtrip"),
                "geometry": t.get("geometry"), "total": t.get("total"), "batch_size": w.get("batch_size"),
                "client_last": client_last, "client_first": client_first,
                # last frame sent -> its points received, minus the forward: what serving adds to the model
                "overhead_last": client_last - (t.get("model") or 0.0),
                "upload_decode": (last_rx - last) * 1000.0 if last_rx is not None else None,
                "ready_to_client": (w["t_points"] - ready) * 1000.0 if ready is not None else None,
                **{k: t.get(k) for k in ("ingest", "batch_wait", "transfer", "geometry_wait", "last_frame")},
                "network": client_first - (t.get("total") or 0.0), "new_frames": len(ids),
                # (b)'s "overhead": everything but queueing and the forward
                "overhead": client_first - (t.get("queue") or 0.0) - (t.get("model") or 0.0),
                "points": w.get("points_count", 0), "ok": bool(w.get("alignment", {}).get("ok")),
            })
        return rows


async def create_session(url: str, params: dict | None = None) -> dict:
    async with httpx.AsyncClient(timeout=60) as c:
        r = await c.post(url.rstrip("/") + "/ws/session/create", json=params or {})
        if r.status_code != 201:
            raise RuntimeError(f"create_session: HTTP {r.status_code} {r.text[:200]}")
        return r.json()


async def delete_session(url: str, sid: str) -> None:
    async with httpx.AsyncClient(timeout=60) as c:
        await c.delete(url.rstrip("/") + f"/ws/session/{sid}")


async def stream_session(url: str, frames: list[bytes], num_frames: int, *, params: dict | None = None,
                         fps: float | None = None, duration_s: float | None = None,
                         max_in_flight: int | None = None, keep_points: bool = False,
                         finalize_timeout_s: float = 900.0, delete: bool = True) -> StreamResult:
    """Create a session and stream up to `num_frames` frames (cycling `frames`) over one WebSocket.

    Flow control: never more than `max_in_flight` (default: the server's) frames sent but without a
    frame_result, so the server never has to answer QUEUE_FULL. `fps` paces sends (None = as fast as credit
    allows); `duration_s` stops sending early. Then finalize and wait for the summary (bounded).
    """
    check_loopback(url)
    res = StreamResult()
    info = await create_session(url, params)
    res.session_id = sid = info["session_id"]
    res.clock_offset = time.time() - time.monotonic()
    ws_url = url.replace("http://", "ws://", 1).rstrip("/") + info["websocket_path"]
    credit = asyncio.Condition()
    retry: asyncio.Queue = asyncio.Queue()
    done = asyncio.Event()
    pending_chunk: dict[int, dict] = {}

    # No permessage-deflate (like the Python client's default): see WEBSOCKET_API.md 3.1
    async with websockets.connect(ws_url, max_size=64 * 2**20, open_timeout=60, ping_interval=None,
                                  close_timeout=10, compression=None) as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if ready.get("type") != "ready":
            raise RuntimeError(f"expected ready, got {ready}")
        cap = min(max_in_flight or ready["max_in_flight"], ready["max_in_flight"])

        def outstanding() -> int:  # sent, not refused for good, no frame_result yet
            return res.frames_sent - len(res.results) - res.rejected_final

        async def receiver() -> None:
            try:
                async for msg in ws:
                    now = time.monotonic()
                    if isinstance(msg, bytes):
                        chunk = decode_points(msg)
                        w = pending_chunk.pop(chunk.seq, None)
                        if w is not None:
                            w["t_points"] = now
                            w["points_bytes"] = len(msg)
                            w["points_count"] = chunk.count
                            for fid in w.get("frame_ids", []):
                                if fid in res.send_t:
                                    res.frame_latency_ms[fid] = (now - res.send_t[fid]) * 1000.0
                        res.t_last_points = now
                        try:  # result flow control
                            await ws.send(json.dumps({"type": "received", "seq": chunk.seq}))
                        except websockets.ConnectionClosed:
                            pass  # closing after the summary: keep reading what is already queued
                        if keep_points:
                            res.chunks.append(chunk)
                        continue
                    m = json.loads(msg)
                    kind = m.get("type")
                    res.types[kind] += 1
                    if kind == "ack":
                        res.acked.add(m["frame_id"])
                    elif kind == "window":
                        res.json_bytes += len(msg)
                        m["t_recv"] = now
                        res.windows.append(m)
                        pending_chunk[m["seq"]] = m
                    elif kind == "frame_result":
                        res.json_bytes += len(msg)
                        res.results[m["frame_id"]] = m
                        res.failed_frames += bool(m.get("failed"))
                        async with credit:
                            credit.notify_all()
                    elif kind == "error":
                        res.errors[m["code"]] += 1
                        if m.get("fatal"):
                            res.fatal = m["code"]
                        elif "frame_id" in m:
                            await retry.put((m["frame_id"], m["code"]))
                            async with credit:
                                credit.notify_all()
                    elif kind == "summary":
                        res.summary = m
                    elif kind == "correction" and m.get("loops_accepted") is not None:
                        res.loops_accepted = max(res.loops_accepted or 0, int(m["loops_accepted"]))
            except websockets.ConnectionClosed:
                pass
            finally:
                res.close_code = ws.close_code
                done.set()
                async with credit:
                    credit.notify_all()

        rx = asyncio.create_task(receiver())
        t0 = res.t_first_send = time.monotonic()
        attempts: Counter = Counter()
        i = 0

        async def send(fid: int) -> None:
            data = encode_frame_message(frames[fid % len(frames)], {"frame_id": fid, "timestamp": fid / (fps or 30)})
            res.send_t.setdefault(fid, time.monotonic())
            res.sends += 1
            await ws.send(data)

        try:
            while (i < num_frames or not retry.empty()) and not done.is_set():
                if duration_s is not None and time.monotonic() - t0 > duration_s:
                    break
                while not retry.empty():  # frames the server refused for now (QUEUE_FULL / *_RATE_LIMITED)
                    fid, code = retry.get_nowait()
                    if code in RETRY_CODES and attempts[fid] < 20:
                        attempts[fid] += 1
                        await asyncio.sleep(0.05 * attempts[fid])
                        await send(fid)
                    else:
                        res.rejected_final += 1
                        res.send_t.pop(fid, None)
                if i >= num_frames:
                    await asyncio.sleep(0.05)
                    continue
                if fps:
                    delay = t0 + i / fps - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                async with credit:
                    await asyncio.wait_for(credit.wait_for(lambda: outstanding() < cap or done.is_set()),
                                           finalize_timeout_s)
                if done.is_set():
                    break
                res.frames_sent += 1
                await send(i)
                i += 1
            if not done.is_set():
                await ws.send(json.dumps({"type": "finalize"}))
            await asyncio.wait_for(done.wait(), finalize_timeout_s)
        finally:
            rx.cancel()
            res.t_end = time.monotonic()
    if delete:
        try:
            await delete_session(url, sid)
        except httpx.HTTPError:
            pass
    return res


async def stream_many(url: str, frames: list[bytes], k: int, num_frames: int, **kw) -> tuple[list[StreamResult],
                                                                                             float]:
    """K concurrent sessions; returns (results, wall seconds from first send to last points)."""
    t0 = time.monotonic()
    results = await asyncio.gather(*(stream_session(url, frames, num_frames, **kw) for _ in range(k)))
    t1 = max((r.t_last_points for r in results if r.t_last_points), default=time.monotonic())
    return list(results), t1 - t0
