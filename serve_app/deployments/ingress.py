"""The FastAPI ingress: HTTP session routes, the WebSocket stream, exports. Never blocks its event loop:
image decoding, resizing, geometry and export encoding run in a thread pool."""


import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from ray import serve

from serve_app import exports, protocol, ray_env
from serve_app.admission import ConcurrencyGate
from serve_app.auth import AccessMiddleware, AccessPolicy, bearer_token
from serve_app.config import AppArgs, LimitsConfig, SessionParams, merge_session_params
from serve_app.decode_pool import DecodeGate
from serve_app.deployments.drain import replica_draining
from serve_app.deployments.session_actor import call, get_session_shards, store_unavailable
from serve_app.deployments.session_worker import SessionWorker
from serve_app.errors import (
    WS_CLOSE,
    WS_CLOSE_NORMAL,
    WS_CLOSE_SERVICE_RESTART,
    WS_CLOSE_SESSION_DELETED,
    ErrorCode,
    ServiceError,
)
from serve_app.flow_control import FlowControl
from serve_app.imaging import ImageLimits, decode_image
from serve_app.limits import FrameRateLimiter
from serve_app.metrics import IngressMetrics
from serve_app.preprocess import resize_for_model
from serve_app.reconstruction import FrameInput, StreamReconstructor
from serve_app.session_store import CorrectionRecord, ResultRecord
from serve_app.status_cache import CachedCall
from serve_app.uploads import classify_upload, limited_request
from serve_app.video import VideoFrames, VideoLimits

log = logging.getLogger("ray.serve.da3.ingress")  # child of ray.serve: goes to the replica log files

api = FastAPI(title="da3-serve", version="0.1.0",
              description="Real-time 3D reconstruction with Depth Anything 3. Protocol: docs/WEBSOCKET_API.md")


WS_SUBPROTOCOL = "da3.v1"
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
api.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")


@api.exception_handler(ServiceError)
async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    retry = exc.details.get("retry_after_s") if exc.details else None
    headers = {"Retry-After": str(max(1, int(-(-float(retry) // 1))))} if retry else None
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status, headers=headers)


class LocalRecords:
    """Records this replica's session worker committed, waiting for one stream's sender. Bounded by bytes: a stream
    that falls behind (a slow reader) leaves the rest in the session actor, and its sender fetches them there."""

    def __init__(self, max_bytes: int):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.missed = False  # a record was not queued: the sender must ask the actor for everything

    def put(self, rec: ResultRecord) -> None:
        if self.nbytes and self.nbytes + rec.nbytes > self.max_bytes:
            self.missed = True
            return
        self.nbytes += rec.nbytes
        self.queue.put_nowait(rec)

    def get_nowait(self) -> ResultRecord:
        rec = self.queue.get_nowait()
        self.nbytes -= rec.nbytes
        return rec


class Connection:
    """One WebSocket; sends are serialised because the receive loop, the sender and workers all write.

    Flow control (serve_app/flow_control.py): Serve queues whatever the replica sends without limit, so every
    message sent is counted until the client's `received` covers it; the result sender pauses at
    max_unacked_result_bytes, and a client that leaves that much of other messages unread is closed."""

    def __init__(self, ws: WebSocket, acked_seq: int = 0, limits: LimitsConfig | None = None):
        self.ws = ws
        self.id = uuid.uuid4().hex
        self.lock = asyncio.Lock()
        self.closed = False
        lim = limits or LimitsConfig()
        self.flow = FlowControl(lim.max_unacked_result_bytes, lim.max_protocol_errors, acked_seq)
        self.acked = asyncio.Event()
        self.last_work = time.monotonic()  # last frame/flush/finalize: the idle timeout counts from here
        self.overflowed = False

    @property
    def acked_seq(self) -> int:
        return self.flow.acked_seq

    @property
    def unacked_bytes(self) -> int:
        return self.flow.unacked_bytes

    def on_received(self, seq: int) -> None:
        self.flow.received(seq)  # raises INVALID_MESSAGE beyond the last record sent
        self.acked.set()

    def _count(self, nbytes: int, seq: int | None) -> None:
        if seq is not None:
            self.last_work = time.monotonic()  # results still flowing (a long replay) is not idle
        if not self.flow.sent(nbytes, seq) and not self.overflowed:
            self.overflowed = True  # the client reads nothing: stop producing for it
            asyncio.ensure_future(self._overflow())

    async def _overflow(self) -> None:
        await self.fail(ServiceError(
            ErrorCode.SLOW_CONSUMER, f"{self.flow.unacked_other_bytes} bytes of replies sent without `received` "
            f"(limit {self.flow.hard_limit}); reconnect with resume_from={self.flow.acked_seq}", fatal=True))
        await self.close(WS_CLOSE[ErrorCode.SLOW_CONSUMER], ErrorCode.SLOW_CONSUMER.value)

    async def send_json(self, msg: dict, seq: int | None = None) -> None:
        await self.send_text(json.dumps(msg, separators=(",", ":")), seq)

    # Counted before the send: the client's `received` for it may arrive while the send is still awaited.
    async def send_text(self, text: str, seq: int | None = None) -> None:
        if self.closed:
            return
        async with self.lock:
            self._count(len(text), seq)
            await self.ws.send_text(text)

    async def send_bytes(self, data: bytes, seq: int | None = None) -> None:
        if self.closed:
            return
        async with self.lock:
            self._count(len(data), seq)
            await self.ws.send_bytes(data)

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            async with self.lock:
                await self.ws.close(code=code, reason=reason[:120])
        except Exception:  # noqa: BLE001, S110 - already gone
            pass

    async def fail(self, exc: ServiceError, frame_id: Any = None) -> None:
        msg = protocol.msg_error(exc.code.value, exc.message, fatal=exc.fatal, frame_id=frame_id,
                                 details=exc.details)
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
        # the session-store shards: a session's actor is self.store.of(its id) (serve_app/shards.py)
        self.store = get_session_shards(self.args.session_actor, self.args.limits)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="da3-cpu")
        # Parallelism here comes from the pool; library thread pools on top would fight the model replica's
        # threads for the same cores (on a CPU box the model's forward ran ~2x slower).
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
        self.workers: dict[str, SessionWorker] = {}
        self.worker_locks: dict[str, asyncio.Lock] = {}
        self.connections: set[Connection] = set()
        self.draining = False
        self.drain_watch: asyncio.Task | None = None
        self.errors: Counter[str] = Counter()
        self.frames_in = 0
        self.records_sent: Counter[str] = Counter()  # "local" (from this replica's worker) or "long_poll"
        self.metrics = IngressMetrics()
        self.streams = 0
        self.processed_closed = 0  # frames processed by workers that have since gone
        self.rate: list[tuple[float, int]] = []
        self.started = time.time()
        lim = self.args.limits
        self.image_limits = ImageLimits(max_bytes=lim.max_image_bytes, max_pixels=lim.max_image_pixels,
                                        allowed_formats=tuple(f.upper() for f in lim.allowed_formats),
                                        max_bit_depth=lim.max_image_bit_depth,
                                        max_decoded_bytes=lim.max_image_decoded_bytes)
        # Image decodes share self.pool fairly between sessions; videos decode in their own small pool.
        self.decode_gate = DecodeGate(self.pool, lim.decode_cpu_s_per_s, lim.decode_cpu_burst_s,
                                      lim.max_decode_slots_per_session)
        self.video_pool = ThreadPoolExecutor(max_workers=lim.video_decode_workers, thread_name_prefix="da3-video")
        # Open decoders hold reference frames: no more videos in decoding at once than the pool has threads.
        self.video_slots = asyncio.Semaphore(lim.video_decode_workers)
        self.video_limits = VideoLimits(max_pixels=lim.max_image_pixels,
                                        max_decoded_frames=lim.max_video_decoded_frames,
                                        max_decoded_bytes=lim.max_video_decoded_bytes,
                                        max_decode_s=lim.max_video_decode_s)
        self.policy = AccessPolicy(self.args.auth, self.args.cors_origins)
        self.export_gate = ConcurrencyGate(lim.max_concurrent_exports)
        if self.args.cors_origins:
            api.add_middleware(CORSMiddleware, allow_origins=self.args.cors_origins, allow_methods=["*"],
                               allow_headers=["*"])
        api.add_middleware(AccessMiddleware, policy=self.policy)  # outermost: Host, client, Origin first
        # serve.status() is a blocking controller call: made in a thread, reused for stats_cache_s.
        self.deployment_status = CachedCall(self._deployment_status, lim.stats_cache_s, default={})

    def _count_error(self, code: str, session_id: str | None = None) -> None:
        if session_id:
            log.info("session %s: %s", session_id, code, extra={"session_id": session_id, "code": code})
        self.errors[code] += 1
        self.metrics.errors.inc(tags={"code": code})

    # --- auth -------------------------------------------------------------------------------------------
    def _owner(self, token: str | None) -> str | None:
        return self.policy.owner(token)

    @staticmethod
    def _bearer(request: Request | WebSocket) -> str | None:
        # Authorization header, or (browsers cannot set WebSocket headers) a "bearer.<key>" subprotocol.
        return bearer_token(request.headers)

    # --- HTTP routes ------------------------------------------------------------------------------------
    @api.post("/ws/session/create", status_code=201)
    async def create_session(self, request: Request) -> JSONResponse:
        owner = self._owner(self._bearer(request))
        raw = await request.body()
        body = protocol.parse_json_object(raw)  # strict: NaN / Infinity / 1e400 are INVALID_PARAMS
        params = merge_session_params(self.args.session_defaults, body, self.args.limits.max_process_res,
                                      limits=self.args.limits)
        info = await self.store.create(params.model_dump(), owner)
        sid = info["session_id"]
        try:
            ws_scheme = "wss" if request.url.scheme == "https" else "ws"
            root = request.scope.get("root_path", "").rstrip("/")  # the app's route_prefix
            info["websocket_path"] = f"{root}/ws/reconstruct/{sid}"
            info["websocket_url"] = f"{ws_scheme}://{request.url.netloc}{root}/ws/reconstruct/{sid}"
            log.info("session %s created", sid, extra={"session_id": sid})
            return JSONResponse(info, status_code=201)
        except BaseException:  # the client never learns the id: nobody could delete the session
            await self.store.of(sid).delete.remote(sid, owner)
            raise

    @api.get("/ws/session/{session_id}")
    async def get_session(self, session_id: str, request: Request) -> dict:
        info = await call(self.store.of(session_id).info, session_id, self._owner(self._bearer(request)))
        worker = self.workers.get(session_id)
        info["in_flight"] = worker.in_flight if worker else 0
        # memory_bytes: the stored map (actor); worker_memory_bytes: context frames + voxel occupancy + queue
        info["worker_memory_bytes"] = worker.recon.memory_bytes() if worker else 0
        return info

    @api.delete("/ws/session/{session_id}", status_code=204)
    async def delete_session(self, session_id: str, request: Request) -> Response:
        await call(self.store.of(session_id).delete, session_id, self._owner(self._bearer(request)))
        self._drop_worker(session_id)
        return Response(status_code=204)

    @api.get("/ws/sessions")
    async def list_sessions(self, request: Request) -> dict:
        token = self._bearer(request)
        res = await self.store.list(self._owner(token))
        if self.policy.is_operator(token):
            return res
        # A user sees their own sessions and counts, nothing about the cluster.
        counts = Counter(s["state"] for s in res["sessions"])
        return {"sessions": res["sessions"], "counts": {"total": len(res["sessions"]), **counts},
                "limits": res["limits"]}

    @api.get("/ws/session/{session_id}/reconstruction.ply")
    async def export_ply(self, session_id: str, request: Request) -> Response:
        owner = self._owner(self._bearer(request))
        with self._export_slot(request):
            pts, cols = await call(self.store.of(session_id).point_cloud, session_id, owner)
            data = await asyncio.get_running_loop().run_in_executor(self.pool, exports.ply_bytes, pts, cols)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.ply"'})

    @api.get("/ws/session/{session_id}/reconstruction.glb")
    async def export_glb(self, session_id: str, request: Request) -> Response:
        owner = self._owner(self._bearer(request))
        with self._export_slot(request):
            pts, cols = await call(self.store.of(session_id).point_cloud, session_id, owner)
            frames = [f for f in await call(self.store.of(session_id).trajectory, session_id, owner)
                      if f.get("pose")]
            c2w = np.array([f["pose"] for f in frames], np.float32).reshape(-1, 4, 4)
            K = np.array([f["intrinsics"] for f in frames], np.float32).reshape(-1, 3, 3)
            size = tuple(frames[0]["image_size"]) if frames else (1, 1)
            data = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: exports.glb_bytes(pts, cols, c2w, K, size))
        return Response(data, media_type="model/gltf-binary",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.glb"'})

    def _export_slot(self, request: Request):
        """A slot of max_concurrent_exports for a map export request (EXPORT_BUSY when none is free). The one-shot
        route answers with an export too, after all its work: that one is never refused."""
        if request.url.path.endswith(("/reconstruction.ply", "/reconstruction.glb")):
            return self.export_gate.slot()
        return contextlib.nullcontext()

    @api.get("/ws/session/{session_id}/trajectory.json")
    async def export_trajectory(self, session_id: str, request: Request) -> dict:
        frames = await call(self.store.of(session_id).trajectory, session_id,
                            self._owner(self._bearer(request)))
        return {"session_id": session_id, "convention": "OpenCV camera-to-world, world = first window",
                "frames": [{k: f.get(k) for k in ("frame_id", "index", "window", "timestamp", "pose",
                                                  "intrinsics", "image_size")} for f in frames]}

    @api.get("/ws/session/{session_id}/trajectory.txt")
    async def export_tum(self, session_id: str, request: Request) -> Response:
        frames = [f for f in await call(self.store.of(session_id).trajectory, session_id,
                                        self._owner(self._bearer(request))) if f.get("pose")]
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
        try:
            every = max(1, int(request.query_params.get("every", "1")))
        except ValueError:
            raise ServiceError(ErrorCode.INVALID_PARAMS, "every must be an integer", details={"field": "every"})
        # Bytes are counted as they arrive (chunked bodies too); files over 1 MiB spool to disk meanwhile.
        form = await limited_request(request, lim.max_upload_bytes).form(max_files=lim.max_upload_files,
                                                                        max_fields=16)
        uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
        if not uploads:
            raise ServiceError(ErrorCode.INVALID_MESSAGE, "no files: send images or a video as multipart `files`")
        overrides = protocol.parse_json_object(form.get("params") or "", "params")
        params = merge_session_params(self.args.session_defaults, overrides, lim.max_process_res, limits=lim)
        info = await self.store.create(params.model_dump(), owner)
        sid = info["session_id"]
        worker = await self._worker(sid, params, owner)
        worker.oneshot = True
        try:
            taken = 0
            for up in uploads:
                if taken >= lim.max_upload_frames:
                    break
                try:
                    taken = await self._upload_part(sid, owner, worker, up, taken, every)
                except ServiceError as exc:
                    exc.message = f"{up.filename}: {exc.message}"
                    raise
            await worker.finalize()
            done = await call(self.store.of(sid).wait_finished, sid, lim.model_timeout_s * (1 + taken))
        except BaseException:
            try:
                await self.store.of(sid).delete.remote(sid, owner)
            except Exception:  # noqa: BLE001 - already deleted (that may be why we are here)
                log.debug("upload cleanup: session %s already gone", sid)
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

    async def _upload_part(self, sid: str, owner: str | None, worker: SessionWorker, up, taken: int,
                           every: int) -> int:
        """Admit one multipart file's frames (an image, or a video's sampled frames as they decode); returns
        the frame count so far. The bytes decide what the file is, never its name."""
        lim = self.args.limits
        head = await up.read(16)
        await up.seek(0)
        demuxer = classify_upload(head, up.filename, up.content_type)
        if demuxer is None:  # an image: never read past the image limit
            await self._admit_upload_frame(sid, owner, worker, await up.read(lim.max_image_bytes + 1), taken)
            return taken + 1
        frames = VideoFrames(up.file, demuxer, max_frames=lim.max_upload_frames - taken, every=every,
                             limits=self.video_limits)
        step = None
        await self.video_slots.acquire()
        try:
            while taken < lim.max_upload_frames:
                step = self.video_pool.submit(frames.next)
                img = await asyncio.wrap_future(step)
                if img is None:
                    break
                await self._admit_upload_frame(sid, owner, worker, img, taken)
                taken += 1
        finally:
            # Close the decoder in its pool once no step runs there (a cancelled request leaves one running).
            if step is None:
                self.video_pool.submit(frames.close)
            else:
                step.add_done_callback(lambda _: self.video_pool.submit(frames.close))
            self.video_slots.release()
        return taken

    async def _admit_upload_frame(self, sid: str, owner: str | None, worker: SessionWorker, img, index: int
                                  ) -> None:
        """Upload pacing: wait for in-flight room and decode budget, never reject; a session deleted (or taken
        over) meanwhile ends the upload."""
        lim = self.args.limits
        while True:
            while worker.in_flight >= lim.max_in_flight and not worker.closed:
                await asyncio.sleep(0.02)
            if worker.closed:
                raise ServiceError(ErrorCode.SESSION_NOT_FOUND, "the session was deleted during the upload")
            try:
                await self._admit(sid, owner, worker, img, protocol.FrameMeta(frame_id=index))
                return
            except ServiceError as exc:
                if exc.code is not ErrorCode.DECODE_BUDGET_EXCEEDED:
                    raise
                await asyncio.sleep(exc.details.get("retry_after_s", 0.1))

    @api.get("/healthz")
    async def healthz(self, request: Request) -> JSONResponse:
        # Probes need no key and learn ok/unavailable only; details (model, error text) are for operators.
        operator = self.policy.is_operator(self._bearer(request))
        try:
            info = await asyncio.wait_for(self._model_info(), 10)
            await asyncio.wait_for(self.store.ping(), 10)
        except Exception as exc:  # noqa: BLE001
            log.warning("healthz: unavailable: %s: %s", type(exc).__name__, exc)
            body = {"status": "unavailable"}
            if operator:
                body["error"] = f"{type(exc).__name__}: {exc}"
            return JSONResponse(body, status_code=503)
        if not operator:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "ok", "model": info, "uptime_s": time.time() - self.started})

    async def _model_info(self) -> dict:
        return await self.model.info.remote()

    @api.get("/stats")
    async def stats(self, request: Request) -> dict:
        """Operator view (the dashboard polls it): sessions, model replicas, batching, throughput, errors.
        Cluster-wide, so an operator key only."""
        self.policy.require_operator(self._bearer(request))
        model, sessions, replicas = await asyncio.gather(
            self.model.stats.remote(), self.store.list(None, everyone=True), self.deployment_status.get())
        now = time.time()
        self.rate.append((now, sum(w.processed - w.processed_at_start for w in self.workers.values())
                          + self.processed_closed))
        self.rate = [(t, n) for t, n in self.rate if now - t <= 30]
        (t0, n0), (t1, n1) = self.rate[0], self.rate[-1]
        return {
            "time": now, "uptime_s": now - self.started, "deployments": replicas, "model": model,
            "frames_in": self.frames_in, "frames_per_s": (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0,
            "errors": dict(self.errors), "workers": len(self.workers), "records_sent": dict(self.records_sent),
            "sessions": [{k: x[k] for k in ("session_id", "state", "frames_received", "frames_processed",
                                            "points_total", "windows", "created_at", "updated_at", "connected")}
                         | {"age_s": now - x["created_at"]} for x in sessions["sessions"]],
            "counts": sessions["counts"], "limits": sessions["limits"],
            "shards": sessions.get("shards"),  # sessions per session-store shard (null with one shard)
            "ray_env": {"ingress": ray_env.in_effect(), "model": model.get("ray_env"),
                        "session_actor": sessions.get("ray_env")},
        }

    @staticmethod
    def _deployment_status() -> dict:
        """Blocking (a controller call): runs in a thread through self.deployment_status."""
        return {name: {"status": str(d.status), "replicas": dict(d.replica_states)}
                for app in serve.status().applications.values() for name, d in app.deployments.items()}

    @api.get("/")
    async def index(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @api.get("/dashboard")
    async def dashboard(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.html")

    # --- WebSocket --------------------------------------------------------------------------------------
    def _drop_worker(self, sid: str, worker: SessionWorker | None = None) -> None:
        """Stop this replica's worker for `sid` (only `worker`, if given: a newer one may have replaced it)."""
        w = self.workers.get(sid)
        if w is None or (worker is not None and w is not worker):
            if worker is not None:
                worker.close()
            return
        del self.workers[sid]
        lock = self.worker_locks.get(sid)
        if lock is not None and not lock.locked():
            del self.worker_locks[sid]
        self.processed_closed += w.processed - w.processed_at_start  # frames this replica processed
        w.close()

    async def _worker(self, sid: str, params: SessionParams, owner: str | None,
                      info: dict | None = None) -> SessionWorker:
        """This replica's worker for the session. A new worker takes the session over in the actor (fencing any
        worker elsewhere) and continues from the stored snapshot plus every accepted, uncommitted frame."""
        lock = self.worker_locks.setdefault(sid, asyncio.Lock())
        async with lock:
            w = self.workers.get(sid)
            if w is not None and not w.closed:
                current = info if info is not None else await call(self.store.of(sid).info, sid, owner)
                if current.get("worker_epoch") == w.epoch:
                    return w
                self._drop_worker(sid, w)  # superseded by a worker on another replica
            took = await call(self.store.of(sid).take_worker, sid)
            info, snap = took["info"], took["stream_state"]
            recon = None
            if snap is not None:
                pts, _ = await call(self.store.of(sid).point_cloud, sid, owner)
                size = snap.get("input_size")
                recon = await asyncio.get_running_loop().run_in_executor(
                    self.pool, StreamReconstructor.restore, params, snap, pts,
                    lambda data: self._prepare(data, params.process_res, size)[1])
            w = SessionWorker(sid, params, self.model, self.store.of(sid), self.args.limits, self.pool,
                              on_gone=self._drop_worker, on_window=self._on_window, recon=recon,
                              processed=info["frames_processed"], epoch=took["epoch"],
                              on_store_lost=self._on_store_lost)
            pending = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._decode_stored, took["pending"], params.process_res, w.recon.input_size)
            for frame in pending:
                if w.recon.input_size is None:
                    w.recon.input_size = (int(frame.image.shape[1]), int(frame.image.shape[0]))
                w.add_frame(frame)
            if took["pending"]:
                log.info("session %s: worker epoch %d resumes %d accepted frames", sid, w.epoch,
                         len(took["pending"]), extra={"session_id": sid})
            if info["state"] == "finalizing":
                w.finalizing = True
                w.flush()
            self.workers[sid] = w
            return w

    # --- draining (redeploy, downscale) -----------------------------------------------------------------------
    def _watch_drain(self) -> None:
        if self.drain_watch is None:
            self.drain_watch = asyncio.get_running_loop().create_task(self._drain_loop())

    async def _drain_loop(self) -> None:
        if replica_draining() is None:
            log.warning("cannot observe Serve's drain flag in this Ray version: streams will see 1006 at "
                        "shutdown instead of 1012 (no accepted frame is lost either way)")
            return
        while not replica_draining():
            await asyncio.sleep(self.args.limits.drain_poll_s)
        await self._drain()

    async def _drain(self) -> None:
        """Serve is stopping this replica: ask every stream to reconnect (1012) so the drain can finish. Accepted
        frames stay in the session actor; whichever replica the client reconnects to takes the session over."""
        self.draining = True
        log.warning("replica draining: closing %d streams with 1012, stopping %d workers",
                    len(self.connections), sum(1 for w in self.workers.values() if not w.oneshot))
        await asyncio.gather(*(c.close(WS_CLOSE_SERVICE_RESTART, "server restarting; reconnect with resume_from")
                               for c in list(self.connections)), return_exceptions=True)
        for sid, w in list(self.workers.items()):
            if not w.oneshot:  # an upload request is an ongoing request: Serve waits for it
                self._drop_worker(sid, w)

    # --- the session store gone (its actor restarting, its node lost) -----------------------------------------
    STORE_GONE_REASON = "session store restarting; reconnect with resume_from"

    def _on_store_lost(self, sid: str, worker: SessionWorker) -> None:
        """A session worker stopped because the store failed a call: its streams here reconnect (1012) and the
        worker that takes the session over redoes what was not committed."""
        for c in list(self.connections):
            if getattr(c, "sid", None) == sid:
                asyncio.ensure_future(self._close_store_gone(c, sid))

    async def _close_store_gone(self, conn: Connection, sid: str) -> None:
        """Close with 1012 (docs/WEBSOCKET_API.md 3.9: reconnect with resume_from), no fatal error: the session
        is intact in a durable store, and a memory-only store answers SESSION_LOST on the reconnect."""
        self._count_error("STORE_UNAVAILABLE", sid)
        log.warning("session %s: session store unavailable; closing the stream with 1012", sid,
                    extra={"session_id": sid, "connection_id": conn.id})
        await conn.close(WS_CLOSE_SERVICE_RESTART, self.STORE_GONE_REASON)

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
        conn = Connection(websocket, limits=self.args.limits)
        conn.sid = session_id  # type: ignore[attr-defined]  # for _on_store_lost
        if self.draining:  # routed here just before Serve took this replica out of rotation
            await conn.close(WS_CLOSE_SERVICE_RESTART, "server restarting; reconnect")
            return
        self._watch_drain()
        try:
            owner = self._owner(self._bearer(websocket))
            att = await call(self.store.of(session_id).attach, session_id, owner, conn.id)
        except ServiceError as exc:
            self._count_error(exc.code.value)
            await conn.fail(exc)
            await conn.close(WS_CLOSE.get(exc.code, 4500), exc.code.value)
            return
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            await self._close_store_gone(conn, session_id)
            return
        info = att["info"]
        params = SessionParams.model_validate(info["params"])
        try:
            worker = await self._worker(session_id, params, owner, info)
        except ServiceError as exc:  # deleted or expired between attach and takeover
            await conn.fail(exc)
            await conn.close(WS_CLOSE.get(exc.code, 4500), exc.code.value)
            return
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            await self._close_store_gone(conn, session_id)
            return
        try:
            resume_from = int(websocket.query_params.get("resume_from", info["last_seq"]))
        except ValueError:
            resume_from = info["last_seq"]
        conn.flow.resume(resume_from)
        self.connections.add(conn)

        def listener(msg: dict) -> None:
            asyncio.ensure_future(conn.send_json(msg))

        local = LocalRecords(self.args.limits.max_unacked_result_bytes)
        worker.listeners.append(listener)
        worker.record_listeners.append(local.put)
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
        sender = asyncio.create_task(self._send_results(conn, session_id, resume_from, params.point_encoding,
                                                        local, worker.epoch))
        idle_watch = asyncio.create_task(self._idle_watch(conn, session_id, worker))
        try:
            await self._receive_loop(conn, websocket, session_id, owner, worker)
        except WebSocketDisconnect:
            pass
        finally:
            if listener in worker.listeners:
                worker.listeners.remove(listener)
            if local.put in worker.record_listeners:
                worker.record_listeners.remove(local.put)
            worker.maybe_retire()
            sender.cancel()
            idle_watch.cancel()
            conn.closed = True
            self.connections.discard(conn)
            self.streams -= 1
            self.metrics.active_sessions.set(self.streams)
            log.info("session %s: stream closed (in flight %d)", session_id, worker.in_flight,
                     extra={"session_id": session_id, "connection_id": conn.id})
            try:
                await self.store.of(session_id).detach.remote(session_id, conn.id)
            except Exception:  # noqa: BLE001, S110 - actor restarting; attachment is advisory
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
                    conn.last_work = time.monotonic()
                    await self._accept_frame(conn, sid, owner, worker, protocol.parse_binary_message(data))
                    continue
                text = msg.get("text")
                if text is None:
                    continue
                cmsg = protocol.parse_text_message(text, max_bytes=lim.max_text_message_bytes)
                kind = cmsg.type
                if kind in ("frame", "flush", "finalize"):
                    conn.last_work = time.monotonic()
                if kind == "frame":
                    await self._accept_frame(conn, sid, owner, worker, protocol.frame_from_json(cmsg))
                elif kind == "flush":
                    worker.flush()
                elif kind == "finalize":
                    await worker.finalize()
                elif kind == "ping":
                    await conn.send_json({"type": "pong", "t": cmsg.t, "server_time": time.time()})
                elif kind == "received":
                    conn.on_received(cmsg.seq)
            except ServiceError as exc:
                self._count_error(exc.code.value, sid)
                await conn.fail(exc, frame_id=getattr(exc, "frame_id", None))
                if exc.fatal:
                    await conn.close(WS_CLOSE.get(exc.code, 4500), exc.code.value)
                    return
                if conn.flow.protocol_error(exc.code):  # a client that keeps sending garbage gets closed
                    await self._close_with(conn, sid, ServiceError(
                        ErrorCode.TOO_MANY_ERRORS, f"{conn.flow.protocol_errors} malformed messages on this "
                        f"stream (limit {conn.flow.max_protocol_errors})", fatal=True))
                    return
            except Exception as exc:  # the frame was not acked: the client resends it after reconnecting
                if not store_unavailable(exc):
                    raise
                await self._close_store_gone(conn, sid)
                return

    async def _close_with(self, conn: Connection, sid: str, exc: ServiceError) -> None:
        self._count_error(exc.code.value, sid)
        await conn.fail(exc)
        await conn.close(WS_CLOSE[exc.code], exc.code.value)

    async def _idle_watch(self, conn: Connection, sid: str, worker: SessionWorker) -> None:
        """Close a stream that holds a connection slot without using it: no frame, flush or finalize for
        ws_idle_timeout_s and no work in flight (pings do not count)."""
        timeout = self.args.limits.ws_idle_timeout_s
        while not conn.closed:
            await asyncio.sleep(min(timeout / 4, 5.0))
            if worker.in_flight or not worker.idle:
                conn.last_work = time.monotonic()  # work in flight: the idle time starts when it is done
            elif time.monotonic() - conn.last_work >= timeout:
                await self._close_with(conn, sid, ServiceError(
                    ErrorCode.IDLE_TIMEOUT, f"no frames for {timeout:g}s and no work in flight; reconnect to "
                    "continue (the session is kept until its idle_ttl_s)", fatal=True))
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
        rgb, resized = await self.decode_gate.run(worker, self._prepare, image, worker.params.process_res,
                                                  worker.recon.input_size)
        if worker.recon.input_size is None:
            worker.recon.input_size = (int(resized.shape[1]), int(resized.shape[0]))
        original = (int(rgb.shape[1]), int(rgb.shape[0]))
        K = None
        if meta.intrinsics is not None:
            sx, sy = resized.shape[1] / original[0], resized.shape[0] / original[1]
            K = np.asarray(meta.intrinsics, np.float32) * np.array([[sx], [sy], [1.0]], np.float32)
        encoded = bytes(image) if isinstance(image, (bytes, bytearray)) else None
        frame = FrameInput(index=-1, frame_id=meta.frame_id, image=resized, original_size=original,
                           timestamp=meta.timestamp, intrinsics=K,
                           pose=None if meta.pose is None else np.asarray(meta.pose, np.float32), encoded=encoded)
        # The worker numbers the frame (the store checks the number) and plans with it at once; the actor stores
        # it meanwhile, and we ack only once it has: an acked frame survives this replica. The actor keeps the
        # client's encoded bytes when there are some (decoded again only on a takeover), else the resized array.
        index = frame.index = worker.next_index()
        if frame.frame_id is None:
            frame.frame_id = index
        stored = dataclasses.replace(frame, image=None) if encoded is not None else frame
        storing = asyncio.ensure_future(call(self.store.of(sid).accept_frame, sid, owner, worker.epoch, stored,
                                             index))
        worker.add_frame(frame, storing)
        try:
            # shield: a client leaving mid-call does not cancel the store, and the frame then stays queued
            await asyncio.shield(storing)
        except Exception:  # refused, or the actor call failed: not acked, so not kept either (if still possible)
            await worker.retract(frame)
            raise
        self.frames_in += 1
        self.metrics.frames_in.inc()
        return index, frame.frame_id

    def _rate_check(self, worker: SessionWorker, nbytes: int) -> None:
        lim, now = self.args.limits, time.monotonic()
        if worker.rate is None:
            worker.rate = FrameRateLimiter(lim.frames_per_s, lim.bytes_per_s, now)
        worker.rate.check(nbytes, now)

    def _decode_stored(self, frames: list[FrameInput], process_res: int, size: tuple[int, int] | None
                       ) -> list[FrameInput]:
        """Frames from the session store back to model input (the ones stored as the client's encoded bytes)."""
        out = []
        for f in frames:
            if f.image is None and f.encoded is not None:
                _, resized = self._prepare(f.encoded, process_res, size)
                size = size or (int(resized.shape[1]), int(resized.shape[0]))
                f = dataclasses.replace(f, image=resized)
            out.append(f)
        return out

    def _prepare(self, image: bytes | np.ndarray, process_res: int, size: tuple[int, int] | None):
        rgb = decode_image(image, self.image_limits) if isinstance(image, (bytes, bytearray)) else image
        resized = resize_for_model(rgb, process_res).image
        if size is not None and (resized.shape[1], resized.shape[0]) != size:
            # Mixed resolutions in one session: every window must stack, so follow the first frame's size.
            resized = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        return rgb, resized

    async def _wait_for_reader(self, conn: Connection, sid: str) -> bool:
        """Pause while the client holds more than max_unacked_result_bytes of unacknowledged results (one record
        always fits). False after slow_reader_timeout_s without progress: the stream is closed with
        SLOW_CONSUMER and the results wait in the session for a reconnect with resume_from."""
        lim = self.args.limits
        while conn.flow.must_pause:
            conn.acked.clear()
            try:
                await asyncio.wait_for(conn.acked.wait(), lim.slow_reader_timeout_s)
            except TimeoutError:
                self._count_error(ErrorCode.SLOW_CONSUMER.value, sid)
                await conn.fail(ServiceError(
                    ErrorCode.SLOW_CONSUMER,
                    f"{conn.unacked_bytes} bytes of results unacknowledged for {lim.slow_reader_timeout_s:g}s "
                    f"(limit {lim.max_unacked_result_bytes}); send `received` messages, reconnect with "
                    f"resume_from={conn.acked_seq} to continue", fatal=True))
                await conn.close(WS_CLOSE[ErrorCode.SLOW_CONSUMER], ErrorCode.SLOW_CONSUMER.value)
                return False
            if conn.closed:
                return False
        return not conn.closed

    async def _send_results(self, conn: Connection, sid: str, after: int, encoding: str,
                            local: LocalRecords, epoch: int) -> None:
        """Stream result records in seq order. Records this replica's worker (fencing epoch `epoch`) commits arrive
        on `local` right after the commit; the session actor's long-poll brings the rest (a resume, records of
        another worker) and status changes. The first poll and any poll after a gap in the local records ask
        for everything, later ones leave the local worker's records out; a record both bring is sent once."""
        seq = after
        loop = asyncio.get_running_loop()
        poll = got = None
        full = True
        try:
            while not conn.closed:
                if poll is None:
                    poll = asyncio.ensure_future(self.store.of(sid).wait_records.remote(
                        sid, seq, conn.id, 20.0, None if full else epoch))
                if local.queue.empty():
                    got = asyncio.ensure_future(local.queue.get())
                    await asyncio.wait({poll, got}, return_when=asyncio.FIRST_COMPLETED)
                    if not got.done():
                        got.cancel()
                    elif not got.cancelled():
                        local.queue.put_nowait(got.result())  # handled below, in order with the rest
                while not local.queue.empty():  # local records first: a poll answer may already say "complete"
                    rec = local.get_nowait()
                    if rec.seq == seq + 1:
                        if not await self._send_record(conn, sid, rec, encoding, loop):
                            return
                        seq = rec.seq
                        self.records_sent["local"] += 1
                    elif rec.seq > seq + 1 and not full:  # a gap: ask the actor for everything after seq
                        local.missed = True
                if local.missed and not full:
                    full, local.missed = True, False
                    poll.cancel()
                    poll = None
                if poll is None:
                    continue
                if not poll.done():
                    continue
                res, poll = poll.result(), None
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
                    if rec.seq <= seq:
                        continue  # already sent from the local queue
                    if not await self._send_record(conn, sid, rec, encoding, loop):
                        return
                    seq = rec.seq
                    self.records_sent["long_poll"] += 1
                info = res["info"]
                full = seq < info["last_seq"]  # the actor has a record this stream lacks: fetch it
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
            for fut in (poll, got):  # neither may outlive the stream (a pending queue.get would be left behind)
                if fut is not None:
                    fut.cancel()
            raise
        except Exception as exc:
            if store_unavailable(exc):  # the long-poll's store died or restarted: the client reconnects
                await self._close_store_gone(conn, sid)
                return
            log.exception("result sender failed for %s", sid)
            await conn.fail(ServiceError(ErrorCode.INTERNAL_ERROR, "result stream failed", fatal=True))
            await conn.close(4500, "INTERNAL_ERROR")

    async def _send_record(self, conn: Connection, sid: str, rec, encoding: str, loop) -> bool:
        """One result record: window JSON, frame_results, points. False if the stream closed meanwhile."""
        if not await self._wait_for_reader(conn, sid):
            return False
        if isinstance(rec, CorrectionRecord):  # a correction record is one JSON message (no points)
            text = rec.text or json.dumps(rec.message, separators=(",", ":"))
            await conn.send_text(text, rec.seq)
            return not conn.closed
        texts = [json.dumps({"type": "window", **rec.window}, separators=(",", ":"))]
        texts += [json.dumps({"type": "frame_result", **fr}, separators=(",", ":")) for fr in rec.frames]
        body = rec.body
        if body is None or body.requested != encoding:  # from the long-poll: encode here
            body = await loop.run_in_executor(self.pool, protocol.encode_point_body, rec.points, rec.colors,
                                              encoding)
        data = protocol.frame_points(body, seq=rec.seq, window=rec.window.get("window", 0),
                                     frame_ids=rec.window.get("frame_ids", []))
        for t in texts:
            await conn.send_text(t, rec.seq)
        await conn.send_bytes(data, rec.seq)
        return not conn.closed
