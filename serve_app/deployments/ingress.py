"""The FastAPI ingress: HTTP session routes, the WebSocket stream, exports. Never blocks its event loop:
image decoding, resizing, geometry and export encoding run in a thread pool."""


import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve

from serve_app import exports, protocol
from serve_app.config import AppArgs, SessionParams, merge_session_params
from serve_app.deployments.session_actor import call, get_session_actor
from serve_app.deployments.session_worker import SessionWorker
from serve_app.errors import WS_CLOSE, WS_CLOSE_NORMAL, WS_CLOSE_SESSION_DELETED, ErrorCode, ServiceError
from serve_app.imaging import ImageLimits, decode_image
from serve_app.limits import TokenBucket
from serve_app.metrics import IngressMetrics
from serve_app.preprocess import resize_for_model
from serve_app.reconstruction import FrameInput, StreamReconstructor
from serve_app.session_store import owner_of
from serve_app.video import decode_video, is_video

log = logging.getLogger("da3.ingress")

api = FastAPI(title="da3-serve", version="0.1.0",
              description="Real-time 3D reconstruction with Depth Anything 3. Protocol: docs/WEBSOCKET_API.md")


WS_SUBPROTOCOL = "da3.v1"
BEARER_PROTOCOL_PREFIX = "bearer."
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")


@api.exception_handler(ServiceError)
async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status)


class Connection:
    """One WebSocket; sends are serialised because the receive loop, the sender and workers all write."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self.id = uuid.uuid4().hex
        self.lock = asyncio.Lock()
        self.closed = False

    async def send_json(self, msg: dict) -> None:
        if self.closed:
            return
        async with self.lock:
            await self.ws.send_text(json.dumps(msg, separators=(",", ":")))

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        async with self.lock:
            await self.ws.send_bytes(data)

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            async with self.lock:
                await self.ws.close(code=code, reason=reason[:120])
        except Exception:  # noqa: BLE001 - already gone
            pass

    async def fail(self, exc: ServiceError, frame_id: Any = None) -> None:
        msg = protocol.msg_error(exc.code.value, exc.message, fatal=exc.fatal, frame_id=frame_id)
        await self.send_json(msg)


@serve.deployment(
    max_ongoing_requests=2000,  # every open WebSocket holds one slot for its whole life
    ray_actor_options={"num_cpus": 1},
    graceful_shutdown_timeout_s=10,
    graceful_shutdown_wait_loop_s=1,
)
@serve.ingress(api)
class Ingress:
    def __init__(self, model, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        self.model = model
        self.actor = get_session_actor(self.args.session_actor, self.args.limits)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="da3-cpu")
        self.workers: dict[str, SessionWorker] = {}
        self.errors: Counter[str] = Counter()
        self.frames_in = 0
        self.metrics = IngressMetrics()
        self.streams = 0
        self.processed_closed = 0  # frames processed by workers that have since gone
        self.rate: list[tuple[float, int]] = []
        self.started = time.time()
        lim = self.args.limits
        self.image_limits = ImageLimits(max_bytes=lim.max_image_bytes, max_pixels=lim.max_image_pixels,
                                        allowed_formats=tuple(f.upper() for f in lim.allowed_formats))
        self.keys = self.args.auth.resolved_keys() if self.args.auth.mode == "api_key" else []
        if self.args.cors_origins:
            api.add_middleware(CORSMiddleware, allow_origins=self.args.cors_origins, allow_methods=["*"],
                               allow_headers=["*"])

    def _count_error(self, code: str, session_id: str | None = None) -> None:
        if session_id:
            log.info("session %s: %s", session_id, code, extra={"session_id": session_id, "code": code})
        self.errors[code] += 1
        self.metrics.errors.inc(tags={"code": code})

    # --- auth -------------------------------------------------------------------------------------------
    def _owner(self, token: str | None) -> str | None:
        if self.args.auth.mode == "none":
            return None
        # Constant-time comparison against every key so timing reveals nothing about which key matched.
        ok = False
        for key in self.keys:
            ok |= hmac.compare_digest((token or "").encode(), key.encode())
        if not token or not ok:
            raise ServiceError(ErrorCode.UNAUTHORIZED, "missing or invalid API key", fatal=True)
        return owner_of(token)

    @staticmethod
    def _bearer(request: Request | WebSocket) -> str | None:
        h = request.headers.get("authorization", "")
        if h.lower().startswith("bearer "):
            return h[7:].strip()
        # Browsers cannot set headers on a WebSocket: they may offer "bearer.<key>" as a subprotocol.
        for proto in request.headers.get("sec-websocket-protocol", "").split(","):
            if proto.strip().startswith(BEARER_PROTOCOL_PREFIX):
                return proto.strip()[len(BEARER_PROTOCOL_PREFIX):]
        return request.query_params.get("token")

    # --- HTTP routes ------------------------------------------------------------------------------------
    @api.post("/ws/session/create", status_code=201)
    async def create_session(self, request: Request) -> JSONResponse:
        owner = self._owner(self._bearer(request))
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except (ValueError, UnicodeDecodeError):
            raise ServiceError(ErrorCode.INVALID_PARAMS, "body must be a JSON object of session params")
        params = merge_session_params(self.args.session_defaults, body, self.args.limits.max_process_res)
        info = await call(self.actor.create, params.model_dump(), owner)
        sid = info["session_id"]
        ws_scheme = "wss" if request.url.scheme == "https" else "ws"
        root = request.scope.get("root_path", "").rstrip("/")  # the app's route_prefix
        info["websocket_path"] = f"{root}/ws/reconstruct/{sid}"
        info["websocket_url"] = f"{ws_scheme}://{request.url.netloc}{root}/ws/reconstruct/{sid}"
        log.info("session %s created", sid, extra={"session_id": sid})
        return JSONResponse(info, status_code=201)

    @api.get("/ws/session/{session_id}")
    async def get_session(self, session_id: str, request: Request) -> dict:
        info = await call(self.actor.info, session_id, self._owner(self._bearer(request)))
        worker = self.workers.get(session_id)
        info["in_flight"] = worker.in_flight if worker else 0
        # memory_bytes: the stored map (actor); worker_memory_bytes: context frames + voxel occupancy + queue
        info["worker_memory_bytes"] = worker.recon.memory_bytes() if worker else 0
        return info

    @api.delete("/ws/session/{session_id}", status_code=204)
    async def delete_session(self, session_id: str, request: Request) -> Response:
        await call(self.actor.delete, session_id, self._owner(self._bearer(request)))
        self._drop_worker(session_id)
        return Response(status_code=204)

    @api.get("/ws/sessions")
    async def list_sessions(self, request: Request) -> dict:
        return await call(self.actor.list, self._owner(self._bearer(request)))

    @api.get("/ws/session/{session_id}/reconstruction.ply")
    async def export_ply(self, session_id: str, request: Request) -> Response:
        pts, cols = await call(self.actor.point_cloud, session_id, self._owner(self._bearer(request)))
        data = await asyncio.get_running_loop().run_in_executor(self.pool, exports.ply_bytes, pts, cols)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.ply"'})

    @api.get("/ws/session/{session_id}/reconstruction.glb")
    async def export_glb(self, session_id: str, request: Request) -> Response:
        owner = self._owner(self._bearer(request))
        pts, cols = await call(self.actor.point_cloud, session_id, owner)
        frames = [f for f in await call(self.actor.trajectory, session_id, owner) if f.get("pose")]
        c2w = np.array([f["pose"] for f in frames], np.float32).reshape(-1, 4, 4)
        K = np.array([f["intrinsics"] for f in frames], np.float32).reshape(-1, 3, 3)
        size = tuple(frames[0]["image_size"]) if frames else (1, 1)
        data = await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: exports.glb_bytes(pts, cols, c2w, K, size))
        return Response(data, media_type="model/gltf-binary",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.glb"'})

    @api.get("/ws/session/{session_id}/trajectory.json")
    async def export_trajectory(self, session_id: str, request: Request) -> dict:
        frames = await call(self.actor.trajectory, session_id, self._owner(self._bearer(request)))
        return {"session_id": session_id, "convention": "OpenCV camera-to-world, world = first window",
                "frames": [{k: f.get(k) for k in ("frame_id", "index", "timestamp", "pose", "intrinsics",
                                                  "image_size")} for f in frames]}

    @api.get("/ws/session/{session_id}/trajectory.txt")
    async def export_tum(self, session_id: str, request: Request) -> Response:
        frames = [f for f in await call(self.actor.trajectory, session_id, self._owner(self._bearer(request)))
                  if f.get("pose")]
        ts = [f["timestamp"] if f.get("timestamp") is not None else float(f["index"]) for f in frames]
        c2w = np.array([f["pose"] for f in frames], np.float64).reshape(-1, 4, 4)
        return Response(exports.trajectory_tum(ts, c2w), media_type="text/plain")

    @api.post("/v1/reconstruct")
    async def reconstruct_upload(self, request: Request) -> Response:
        """One-shot: multipart `files` (images and/or videos) + optional `params` JSON field ->
        the reconstruction (`?format=json|ply|glb`), through the same windows, batching and alignment."""
        owner = self._owner(self._bearer(request))
        lim = self.args.limits
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "ply", "glb"):
            raise ServiceError(ErrorCode.INVALID_PARAMS, "format must be json, ply or glb",
                               details={"field": "format"})
        if int(request.headers.get("content-length") or 0) > lim.max_upload_bytes:
            raise ServiceError(ErrorCode.MESSAGE_TOO_LARGE, f"upload exceeds {lim.max_upload_bytes} bytes")
        try:
            every = max(1, int(request.query_params.get("every", "1")))
        except ValueError:
            raise ServiceError(ErrorCode.INVALID_PARAMS, "every must be an integer", details={"field": "every"})
        form = await request.form(max_files=lim.max_upload_files, max_fields=16)
        uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not uploads:
            raise ServiceError(ErrorCode.INVALID_MESSAGE, "no files: send images or a video as multipart `files`")
        try:
            overrides = json.loads(form.get("params") or "{}")
        except ValueError:
            raise ServiceError(ErrorCode.INVALID_PARAMS, "params must be a JSON object", details={"field": "params"})
        params = merge_session_params(self.args.session_defaults, overrides, lim.max_process_res)
        info = await call(self.actor.create, params.model_dump(), owner)
        sid = info["session_id"]
        worker = await self._worker(sid, params)
        loop = asyncio.get_running_loop()
        try:
            taken = 0
            for up in uploads:
                data = await up.read()
                if is_video(up.filename, up.content_type):
                    images = await loop.run_in_executor(
                        self.pool, lambda d=data: decode_video(d, max_frames=lim.max_upload_frames - taken,
                                                               every=every, max_pixels=lim.max_image_pixels))
                else:
                    images = [data]
                for img in images:
                    if taken >= lim.max_upload_frames:
                        break
                    while worker.in_flight >= lim.max_in_flight:  # upload pacing: wait, never reject
                        await asyncio.sleep(0.02)
                    try:
                        await self._admit(sid, owner, worker, img, protocol.FrameMeta(frame_id=taken))
                    except ServiceError as exc:
                        exc.message = f"{up.filename}: {exc.message}"
                        raise
                    taken += 1
            await worker.finalize()
            done = await call(self.actor.wait_finished, sid, lim.model_timeout_s * (1 + taken))
        except BaseException:
            await self.actor.delete.remote(sid, owner)
            self._drop_worker(sid)
            raise
        if fmt == "ply":
            return await self.export_ply(sid, request)
        if fmt == "glb":
            return await self.export_glb(sid, request)
        traj = await self.export_trajectory(sid, request)
        return JSONResponse({"session_id": sid, "state": done.get("state"), "frames": done.get("frames_processed"),
                             "frames_failed": done.get("frames_failed"), "points_total": done.get("points_total"),
                             "trajectory": traj["frames"], "exports": protocol.export_paths(sid)})

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            info = await asyncio.wait_for(self._model_info(), 10)
            await asyncio.wait_for(self.actor.ping.remote(), 10)
        except Exception as exc:  # noqa: BLE001
            return JSONResponse({"status": "unavailable", "error": f"{type(exc).__name__}: {exc}"},
                                status_code=503)
        return JSONResponse({"status": "ok", "model": info, "uptime_s": time.time() - self.started})

    async def _model_info(self) -> dict:
        return await self.model.info.remote()

    @api.get("/stats")
    async def stats(self, request: Request) -> dict:
        """Operator view (the dashboard polls it): sessions, model replicas, batching, throughput, errors."""
        owner = self._owner(self._bearer(request))
        model, sessions = await asyncio.gather(self.model.stats.remote(), call(self.actor.list, owner))
        now = time.time()
        self.rate.append((now, sum(w.processed for w in self.workers.values()) + self.processed_closed))
        self.rate = [(t, n) for t, n in self.rate if now - t <= 30]
        (t0, n0), (t1, n1) = self.rate[0], self.rate[-1]
        try:
            replicas = {name: {"status": str(d.status), "replicas": dict(d.replica_states)}
                        for app in serve.status().applications.values()
                        for name, d in app.deployments.items()}
        except Exception:  # noqa: BLE001 - controller busy; the rest is still useful
            replicas = {}
        return {
            "time": now, "uptime_s": now - self.started, "deployments": replicas, "model": model,
            "frames_in": self.frames_in, "frames_per_s": (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0,
            "errors": dict(self.errors), "workers": len(self.workers),
            "sessions": [{k: x[k] for k in ("session_id", "state", "frames_received", "frames_processed",
                                            "points_total", "windows", "created_at", "updated_at", "connected")}
                         | {"age_s": now - x["created_at"]} for x in sessions["sessions"]],
            "counts": sessions["counts"], "limits": sessions["limits"],
        }

    @api.get("/")
    async def index(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/dashboard")
    async def dashboard(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.html")

    # --- WebSocket --------------------------------------------------------------------------------------
    def _drop_worker(self, sid: str) -> None:
        w = self.workers.pop(sid, None)
        if w is not None:
            self.processed_closed += w.processed
            w.close()

    async def _worker(self, sid: str, params: SessionParams, info: dict | None = None) -> SessionWorker:
        w = self.workers.get(sid)
        if w is None or w.closed:
            recon = None
            if info and info.get("windows"):
                # The session was processed elsewhere (another replica, or before a restart): continue from the
                # snapshot the session actor holds. Frames that were only queued there are gone.
                snap = await call(self.actor.stream_state, sid)
                if snap is not None:
                    pts, _ = await call(self.actor.point_cloud, sid, info.get("owner_fp"))
                    recon = await asyncio.get_running_loop().run_in_executor(
                        self.pool, StreamReconstructor.restore, params, snap, pts)
            w = self.workers.get(sid)  # another coroutine may have created it meanwhile
            if w is None or w.closed:
                w = SessionWorker(sid, params, self.model, self.actor, self.args.limits, self.pool,
                                  on_gone=self._drop_worker, on_window=self._on_window, recon=recon,
                                  processed=(info or {}).get("frames_processed", 0))
                self.workers[sid] = w
        return w

    def _on_window(self, window: dict, frames: int, error_code: str | None) -> None:
        self.metrics.frames_out.inc(frames)
        t = window.get("timings_ms", {})
        self.metrics.window_latency.observe(t.get("total", 0.0))
        self.metrics.model_latency.observe(t.get("model_roundtrip", 0.0))
        if error_code:
            self._count_error(error_code)

    @api.websocket("/ws/reconstruct/{session_id}")
    async def reconstruct(self, websocket: WebSocket, session_id: str) -> None:
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",")]
        await websocket.accept(subprotocol=WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None)
        conn = Connection(websocket)
        try:
            owner = self._owner(self._bearer(websocket))
            att = await call(self.actor.attach, session_id, owner, conn.id)
        except ServiceError as exc:
            self._count_error(exc.code.value)
            await conn.fail(exc)
            await conn.close(WS_CLOSE.get(exc.code, 4500), exc.code.value)
            return
        info = att["info"]
        params = SessionParams.model_validate(info["params"])
        worker = await self._worker(session_id, params, {**info, "owner_fp": owner})
        try:
            resume_from = int(websocket.query_params.get("resume_from", info["last_seq"]))
        except ValueError:
            resume_from = info["last_seq"]

        def listener(msg: dict) -> None:
            asyncio.ensure_future(conn.send_json(msg))

        worker.listeners.append(listener)
        self.streams += 1
        self.metrics.active_sessions.set(self.streams)
        await conn.send_json({
            "type": "ready", "protocol": protocol.PROTOCOL_VERSION, "session_id": session_id,
            "params": info["params"], "state": info["state"], "frames_received": info["frames_received"],
            "frames_processed": info["frames_processed"], "points_total": info["points_total"],
            "last_seq": info["last_seq"], "max_in_flight": self.args.limits.max_in_flight,
            "in_flight": worker.in_flight})
        log.info("session %s: stream connected (resume_from=%s)", session_id, resume_from,
                 extra={"session_id": session_id, "connection_id": conn.id})
        sender = asyncio.create_task(self._send_results(conn, session_id, resume_from, params.point_encoding))
        try:
            await self._receive_loop(conn, websocket, session_id, owner, worker)
        except WebSocketDisconnect:
            pass
        finally:
            if listener in worker.listeners:
                worker.listeners.remove(listener)
            sender.cancel()
            conn.closed = True
            self.streams -= 1
            self.metrics.active_sessions.set(self.streams)
            log.info("session %s: stream closed (in flight %d)", session_id, worker.in_flight,
                     extra={"session_id": session_id, "connection_id": conn.id})
            try:
                await self.actor.detach.remote(session_id, conn.id)
            except Exception:  # noqa: BLE001 - actor restarting; attachment is advisory
                pass

    async def _receive_loop(self, conn: Connection, websocket: WebSocket, sid: str, owner: str | None,
                            worker: SessionWorker) -> None:
        lim = self.args.limits
        while not conn.closed:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            try:
                if msg.get("bytes") is not None:
                    data = msg["bytes"]
                    if len(data) > lim.max_image_bytes + 65536:
                        raise ServiceError(ErrorCode.MESSAGE_TOO_LARGE,
                                           f"binary message of {len(data)} bytes exceeds the limit")
                    await self._accept_frame(conn, sid, owner, worker, protocol.parse_binary_message(data))
                    continue
                text = msg.get("text")
                if text is None:
                    continue
                cmsg = protocol.parse_text_message(text, max_bytes=lim.max_text_message_bytes)
                kind = cmsg.type
                if kind == "frame":
                    await self._accept_frame(conn, sid, owner, worker, protocol.frame_from_json(cmsg))
                elif kind == "flush":
                    worker.flush()
                elif kind == "finalize":
                    await worker.finalize()
                elif kind == "ping":
                    await conn.send_json({"type": "pong", "t": cmsg.t, "server_time": time.time()})
            except ServiceError as exc:
                self._count_error(exc.code.value, sid)
                await conn.fail(exc, frame_id=getattr(exc, "frame_id", None))
                if exc.fatal:
                    await conn.close(WS_CLOSE.get(exc.code, 4500), exc.code.value)
                    return

    async def _accept_frame(self, conn: Connection, sid: str, owner: str | None, worker: SessionWorker,
                            frame: protocol.IncomingFrame) -> None:
        try:
            self._rate_check(worker, len(frame.image))
            if worker.in_flight >= self.args.limits.max_in_flight:
                raise ServiceError(ErrorCode.QUEUE_FULL,
                                   f"{worker.in_flight} frames in flight (max {self.args.limits.max_in_flight}); "
                                   "wait for results before sending more")
            index, fid = await self._admit(sid, owner, worker, frame.image, frame.meta)
        except ServiceError as exc:
            exc.frame_id = frame.meta.frame_id
            raise
        await conn.send_json({"type": "ack", "frame_id": fid, "index": index, "frames_received": index + 1,
                              "in_flight": worker.in_flight, "max_in_flight": self.args.limits.max_in_flight})

    async def _admit(self, sid: str, owner: str | None, worker: SessionWorker, image: bytes | np.ndarray,
                     meta: protocol.FrameMeta) -> tuple[int, Any]:
        """Decode/resize off the loop, reserve an index in the actor, queue the frame. Returns (index, frame_id)."""
        rgb, resized = await asyncio.get_running_loop().run_in_executor(
            self.pool, self._prepare, image, worker.params.process_res, worker.recon.input_size)
        if worker.recon.input_size is None:
            worker.recon.input_size = (int(resized.shape[1]), int(resized.shape[0]))
        index = await call(self.actor.accept_frames, sid, owner, 1)
        self.frames_in += 1
        self.metrics.frames_in.inc()
        original = (int(rgb.shape[1]), int(rgb.shape[0]))
        K = None
        if meta.intrinsics is not None:
            sx, sy = resized.shape[1] / original[0], resized.shape[0] / original[1]
            K = np.asarray(meta.intrinsics, np.float32) * np.array([[sx], [sy], [1.0]], np.float32)
        fid = meta.frame_id if meta.frame_id is not None else index
        worker.add_frame(FrameInput(
            index=index, frame_id=fid, image=resized, original_size=original, timestamp=meta.timestamp,
            intrinsics=K, pose=None if meta.pose is None else np.asarray(meta.pose, np.float32)))
        return index, fid

    def _rate_check(self, worker: SessionWorker, nbytes: int) -> None:
        lim, now = self.args.limits, time.monotonic()
        if worker.frame_bucket is None:
            worker.frame_bucket = TokenBucket(lim.frames_per_s, 2 * lim.frames_per_s, stamp=now)
            worker.byte_bucket = TokenBucket(lim.bytes_per_s, 2 * lim.bytes_per_s, stamp=now)
        wait = worker.frame_bucket.take(1, now)
        if not wait:
            wait = worker.byte_bucket.take(nbytes, now)
            if wait:
                worker.frame_bucket.tokens += 1  # refund: the frame is rejected as a whole
        if wait:
            raise ServiceError(ErrorCode.RATE_LIMITED,
                               f"session over its rate limit ({lim.frames_per_s:g} frames/s, "
                               f"{lim.bytes_per_s / 1e6:g} MB/s); retry in {wait:.2f}s",
                               details={"retry_after_s": round(wait, 3)})

    def _prepare(self, image: bytes | np.ndarray, process_res: int, size: tuple[int, int] | None):
        rgb = decode_image(image, self.image_limits) if isinstance(image, (bytes, bytearray)) else image
        resized = resize_for_model(rgb, process_res).image
        if size is not None and (resized.shape[1], resized.shape[0]) != size:
            # Mixed resolutions in one session: every window must stack, so follow the first frame's size.
            resized = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        return rgb, resized

    async def _send_results(self, conn: Connection, sid: str, after: int, encoding: str) -> None:
        """Stream result records from the session actor (long-poll), so a reconnect anywhere resumes."""
        seq = after
        loop = asyncio.get_running_loop()
        try:
            while not conn.closed:
                res = await self.actor.wait_records.remote(sid, seq, conn.id, 20.0)
                if "gone" in res:
                    if res["gone"] in (ErrorCode.SESSION_EXPIRED.value, ErrorCode.SESSION_LOST.value):
                        code = ErrorCode(res["gone"])
                        msg = ("session expired" if code is ErrorCode.SESSION_EXPIRED else
                               "the session store restarted without this session's state; start a new session")
                        await conn.fail(ServiceError(code, msg, fatal=True))
                        await conn.close(WS_CLOSE[code], code.value)
                    else:
                        await conn.fail(ServiceError(ErrorCode.SESSION_NOT_FOUND, "session was deleted",
                                                     fatal=True))
                        await conn.close(WS_CLOSE_SESSION_DELETED, "SESSION_DELETED")
                    return
                if res.get("displaced"):
                    await conn.fail(ServiceError(ErrorCode.SESSION_BUSY,
                                                 "another connection took over this session", fatal=True))
                    await conn.close(WS_CLOSE[ErrorCode.SESSION_BUSY], "SESSION_BUSY")
                    return
                for rec in res["records"]:
                    await conn.send_json({"type": "window", **rec.window})
                    for fr in rec.frames:
                        await conn.send_json({"type": "frame_result", **fr})
                    data = await loop.run_in_executor(
                        self.pool, lambda r=rec: protocol.encode_points(
                            r.points, r.colors, seq=r.seq, window=r.window.get("window", 0),
                            frame_ids=r.window.get("frame_ids", []), encoding=encoding))
                    await conn.send_bytes(data)
                    seq = rec.seq
                info = res["info"]
                if info["state"] in ("complete", "failed") and seq >= info["last_seq"]:
                    dur = (info.get("updated_at") or time.time()) - info["created_at"]
                    await conn.send_json({
                        "type": "summary", "state": info["state"], "frames_received": info["frames_received"],
                        "frames_processed": info["frames_processed"], "frames_failed": info["frames_failed"],
                        "points_total": info["points_total"], "windows": info["windows"], "duration_s": dur,
                        "exports": protocol.export_paths(sid)})
                    await conn.close(WS_CLOSE_NORMAL, "complete")
                    return
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001
            log.exception("result sender failed for %s", sid)
            await conn.fail(ServiceError(ErrorCode.INTERNAL_ERROR, "result stream failed", fatal=True))
            await conn.close(4500, "INTERNAL_ERROR")
