"""Worker ownership: which session workers run on this replica, taking a session over from another replica, and
the drain that hands every stream to another replica on a redeploy (a mixin of the Ingress deployment)."""


import asyncio
import dataclasses
import logging

import cv2
import numpy as np

from serve_app.config import SessionParams
from serve_app.deployments.drain import replica_draining
from serve_app.deployments.session_actor import call
from serve_app.deployments.session_worker import SessionWorker
from serve_app.errors import (
    WS_CLOSE_SERVICE_RESTART,
)
from serve_app.media.imaging import decode_image
from serve_app.model.preprocess import resize_for_model
from serve_app.recon.reconstruction import FrameInput, StreamReconstructor

log = logging.getLogger("ray.serve.da3.ingress")  # child of ray.serve: goes to the replica log files


class WorkerOwnership:
    """self.workers and their lifecycle; decoding stored frames for a takeover."""

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
            info, snap = took.info, took.stream_state
            recon = None
            if snap is not None:
                pts, _ = await call(self.store.of(sid).point_cloud, sid, owner)
                size = snap.get("input_size")
                recon = await asyncio.get_running_loop().run_in_executor(
                    self.pool, StreamReconstructor.restore, params, snap, pts,
                    lambda data: self._prepare(data, params.process_res, size)[1])
            w = SessionWorker(sid, params, self.model, self.store.of(sid), self.args.limits, self.pool,
                              on_gone=self._drop_worker, on_window=self._on_window, recon=recon,
                              processed=info["frames_processed"], epoch=took.epoch)
            pending = await asyncio.get_running_loop().run_in_executor(
                self.pool, self._decode_stored, took.pending, params.process_res, w.recon.input_size)
            for frame in pending:
                if w.recon.input_size is None:
                    w.recon.input_size = (int(frame.image.shape[1]), int(frame.image.shape[0]))
                w.add_frame(frame)
            if took.pending:
                log.info("session %s: worker epoch %d resumes %d accepted frames", sid, w.epoch,
                         len(took.pending), extra={"session_id": sid})
            if info["state"] == "finalizing":
                w.finalizing = True
                w.flush()
            self.workers[sid] = w
            return w

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

    def _on_window(self, window: dict, frames: int, error_code: str | None) -> None:
        self.metrics.frames_out.inc(frames)
        t = window.get("timings_ms", {})
        self.metrics.window_latency.observe(t.get("total", 0.0))
        self.metrics.model_latency.observe(t.get("model_roundtrip", 0.0))
        if error_code:
            self._count_error(error_code)

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
