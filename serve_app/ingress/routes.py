"""The ingress's HTTP routes: session lifecycle, exports, health, stats and the web pages (mixins of the
Ingress deployment; serve_app/ingress/app.py maps paths to them)."""


import asyncio
import contextlib
import logging
import time
from collections import Counter

import numpy as np
from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve

from serve_app import protocol, ray_env
from serve_app.config import merge_session_params
from serve_app.deployments.session_actor import call
from serve_app.ingress.app import STATIC_DIR
from serve_app.protocol import messages as wire
from serve_app.recon import exports

log = logging.getLogger("ray.serve.da3.ingress")  # child of ray.serve: goes to the replica log files


class SessionRoutes:
    """POST/GET/DELETE of sessions and the list."""

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

    async def get_session(self, session_id: str, request: Request) -> dict:
        info = await call(self.store.of(session_id).info, session_id, self._owner(self._bearer(request)))
        worker = self.workers.get(session_id)
        info["in_flight"] = worker.in_flight if worker else 0
        # memory_bytes: the stored map (actor); worker_memory_bytes: context frames + voxel occupancy + queue
        info["worker_memory_bytes"] = worker.recon.memory_bytes() if worker else 0
        return info

    async def delete_session(self, session_id: str, request: Request) -> Response:
        await call(self.store.of(session_id).delete, session_id, self._owner(self._bearer(request)))
        self._drop_worker(session_id)
        return Response(status_code=204)

    async def list_sessions(self, request: Request) -> dict:
        token = self._bearer(request)
        res = await self.store.list(self._owner(token))
        if self.policy.is_operator(token):
            return wire.SessionList.model_validate(res).wire()
        # A user sees their own sessions and counts, nothing about the cluster.
        counts = Counter(s["state"] for s in res["sessions"])
        return wire.SessionList(sessions=res["sessions"], counts={"total": len(res["sessions"]), **counts},
                                limits=res["limits"]).wire()


class ExportRoutes:
    """The map and trajectory exports (a capped number of map exports at once)."""

    async def export_ply(self, session_id: str, request: Request) -> Response:
        owner = self._owner(self._bearer(request))
        with self._export_slot(request):
            pts, cols = await call(self.store.of(session_id).point_cloud, session_id, owner)
            data = await asyncio.get_running_loop().run_in_executor(self.pool, exports.ply_bytes, pts, cols)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.ply"'})

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

    async def export_trajectory(self, session_id: str, request: Request) -> dict:
        frames = await call(self.store.of(session_id).trajectory, session_id,
                            self._owner(self._bearer(request)))
        return {"session_id": session_id, "convention": "OpenCV camera-to-world, world = first window",
                "frames": [{k: f.get(k) for k in ("frame_id", "index", "window", "timestamp", "pose",
                                                  "intrinsics", "image_size")} for f in frames]}

    async def export_tum(self, session_id: str, request: Request) -> Response:
        frames = [f for f in await call(self.store.of(session_id).trajectory, session_id,
                                        self._owner(self._bearer(request))) if f.get("pose")]
        ts = [f["timestamp"] if f.get("timestamp") is not None else float(f["index"]) for f in frames]
        c2w = np.array([f["pose"] for f in frames], np.float64).reshape(-1, 4, 4)
        return Response(exports.trajectory_tum(ts, c2w), media_type="text/plain")


class StatusRoutes:
    """/healthz for probes, /stats for operators, and the static pages."""

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
            # this replica's accept calls to the store and the frames sent in them (frames > calls: batched)
            "store_accepts": self.store.accept_counts(),
            "ray_env": {"ingress": ray_env.in_effect(), "model": model.get("ray_env"),
                        "session_actor": sessions.get("ray_env")},
        }

    @staticmethod
    def _deployment_status() -> dict:
        """Blocking (a controller call): runs in a thread through self.deployment_status."""
        return {name: {"status": str(d.status), "replicas": dict(d.replica_states)}
                for app in serve.status().applications.values() for name, d in app.deployments.items()}

    async def index(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    async def dashboard(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "dashboard.html")
