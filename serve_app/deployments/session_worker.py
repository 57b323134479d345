"""Per-session processing inside an ingress replica: windows to the model, alignment, commits to the actor.

Windows of one session are pipelined: window k+1 goes to the model while window k is still being aligned; only
integration is ordered. The worker outlives the WebSocket, so frames accepted before a disconnect are still
processed and their results wait in the session actor for the reconnecting client.

Accepted frames are also stored in the session actor until a window commits them, and every worker holds a
fencing epoch from the actor: a worker on another replica (after a redeploy, a crash or a reconnect that landed
elsewhere) takes over with the snapshot plus those frames, and the old worker's late commits are refused.

Over 400 lines because it is one state machine (windows, commits, the graph loop, takeover fencing) whose
steps share the worker's lock and counters; the pure logic it drives lives in serve_app/recon/.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from serve_app.config import LimitsConfig, SessionParams
from serve_app.deployments.session_actor import call, store_unavailable
from serve_app.errors import ErrorCode
from serve_app.protocol import PointBody, encode_point_body
from serve_app.protocol import messages as wire
from serve_app.recon import corrections
from serve_app.recon.corrections import Correction
from serve_app.recon.graph_step import graph_step
from serve_app.recon.reconstruction import FrameInput, StreamReconstructor, WindowPlan
from serve_app.sessions.replies import CommitStatus
from serve_app.sessions.session_store import (
    CorrectionRecord,
    ResultRecord,
    finalized_error,
    frame_limit_error,
)

log = logging.getLogger("ray.serve.da3.worker")


def window_timings(plan: WindowPlan, res: dict, geometry_started: float, geometry_ms: float, now: float
                   ) -> dict[str, float]:
    """The window message's `timings_ms` (docs/WEBSOCKET_API.md). Each value is a difference on one clock: the
    model replica reports its forward and its batch wait itself, so a cluster's clock skew never enters."""
    first_rx = min(f.received_at for f in plan.new)
    last_rx = max(f.received_at for f in plan.new)
    model_rt = (res["returned_at"] - res["sent_at"]) * 1000.0
    model = res.get("model_ms", model_rt)
    batch_wait = res.get("batch_wait_ms", 0.0)

    def ms(a: float, b: float) -> float:
        return round((b - a) * 1000.0, 2)

    return {
        "queue": ms(first_rx, res["sent_at"]),
        "ingest": ms(last_rx, res["sent_at"]),
        "model": round(model, 2),
        "model_roundtrip": round(model_rt, 2),
        "batch_wait": round(batch_wait, 2),
        "transfer": round(max(model_rt - model - batch_wait, 0.0), 2),
        "geometry_wait": ms(res["returned_at"], geometry_started),
        "geometry": geometry_ms,
        "last_frame": ms(last_rx, now),
        "total": ms(first_rx, now),
    }


class SessionWorker:
    def __init__(self, session_id: str, params: SessionParams, model, actor, limits: LimitsConfig,
                 pool: Executor, on_gone: Callable[[str, SessionWorker], None],
                 on_window: Callable[[dict, int, str | None], None] | None = None,
                 recon: StreamReconstructor | None = None, processed: int = 0, epoch: int = 0,
                 on_store_lost: Callable[[str, SessionWorker], None] | None = None):
        self.sid = session_id
        self.params = params
        self.model = model
        self.actor = actor
        self.limits = limits
        self.pool = pool
        self.on_gone = on_gone
        self.on_window = on_window
        self.recon = recon or StreamReconstructor(params)
        self.epoch = epoch  # fencing token from the session actor (take_worker)
        self.oneshot = False  # serves a POST /v1/reconstruct request: kept running while the replica drains
        self.lock = asyncio.Lock()  # the reconstructor is only touched under this lock (integration in the pool)
        self.wake = asyncio.Event()
        self.slots = asyncio.Semaphore(limits.max_windows_in_flight)
        self.order: asyncio.Queue = asyncio.Queue()
        self.accepted = processed  # a restored worker starts where the stored session left off
        self.processed = processed
        self.processed_at_start = processed
        self.flush_requested = False
        self.finalizing = False
        self.completing = False
        self.closed = False
        self.listeners: list[Callable[[wire.ServerMessage], Any]] = []
        self.record_listeners: list[Callable[[ResultRecord], Any]] = []  # get each record once it is committed
        self.rate = None  # FrameRateLimiter, created by the ingress
        self.storing: dict[int, asyncio.Future] = {}  # frame index -> the session actor's accept_frame call
        self.graph_wake = asyncio.Event()  # global consistency: a placed window has graph work for _graph_loop
        self.graph_busy = False
        self.on_store_lost = on_store_lost
        self.store_lost = False  # a store call failed for want of the store: this worker stopped
        self.tasks = [asyncio.create_task(self._guard(self._plan_loop())),
                      asyncio.create_task(self._guard(self._integrate_loop()))]
        if self.recon.consistency is not None:
            self.tasks.append(asyncio.create_task(self._guard(self._graph_loop())))

    # --- called by the WebSocket handler ----------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return self.accepted - self.processed

    def next_index(self) -> int:
        """The index the session store will give the next frame: this worker is the session's only writer
        (fenced by its epoch) and numbers frames in acceptance order. Raises what the store would for a frame
        past max_frames or after a finalize seen here."""
        if self.finalizing:
            raise finalized_error("finalizing")
        if self.accepted >= self.params.max_frames:
            raise frame_limit_error(self.params.max_frames)
        return self.accepted

    def add_frame(self, frame: FrameInput, storing: asyncio.Future | None = None) -> None:
        """Queue a frame for planning. `storing`: the store call still in flight for it; its window is planned
        and sent to the model meanwhile, but not committed before the store holds the frame."""
        self.recon.add_frame(frame)  # deque append is atomic; planning happens under the lock
        self.accepted += 1
        if storing is not None:
            self.storing[frame.index] = storing
        self.wake.set()

    async def retract(self, frame: FrameInput) -> bool:
        """Take back the newest frame after its store call failed, if no window has taken it yet (else that
        window goes on: the store refused the frame because the session left this worker, or was finalized
        from elsewhere at that moment)."""
        async with self.lock:
            self.storing.pop(frame.index, None)
            if frame.index != self.accepted - 1 or not self.recon.pending or self.recon.pending[-1] is not frame:
                return False
            self.recon.pending.pop()
            self.accepted -= 1
            return True

    def flush(self) -> None:
        self.flush_requested = True
        self.wake.set()

    async def finalize(self) -> None:
        self.finalizing = True
        self.flush()
        await call(self.actor.set_state, self.sid, "finalizing")
        await self._maybe_complete()

    def close(self) -> None:
        self.closed = True
        for t in self.tasks:
            t.cancel()

    def _emit(self, msg: wire.ServerMessage) -> None:
        for fn in list(self.listeners):
            try:
                fn(msg)
            except Exception:
                log.debug("listener failed", exc_info=True)

    async def _run(self, fn, *args):
        async with self.lock:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _guard(self, loop_coro) -> None:
        """Run one of the worker's loops. A store call that fails because the store's actor is gone (restarting,
        its node lost) stops the worker: what it had committed is in the store, what it had not is redone by the
        worker that takes the session over when the client reconnects (the ingress closes its streams with
        1012). Without this the loop would die silently and the stream would wait for results forever."""
        try:
            await loop_coro
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            log.warning("session %s: session store unavailable (%s); worker epoch %d stops", self.sid,
                        type(exc).__name__, self.epoch, extra={"session_id": self.sid})
            if not self.closed:
                self.store_lost = True
                self._gone()
                if self.on_store_lost is not None:
                    self.on_store_lost(self.sid, self)

    # --- planning and inference -------------------------------------------------------------------------
    async def _plan_loop(self) -> None:
        while not self.closed:
            await self.wake.wait()
            self.wake.clear()
            while True:
                force = self.flush_requested
                async with self.lock:  # planning is a few list operations: not worth a hop to the pool
                    plan = self.recon.next_window(force)
                if plan is None:
                    if force and not self.recon.pending:
                        self.flush_requested = False
                    break
                await self.slots.acquire()
                task = asyncio.create_task(self._infer(plan))
                await self.order.put((plan, task))
                self._emit(wire.Progress(stage="inference", window=plan.window, frames_received=self.accepted,
                                         frames_processed=self.processed, in_flight=self.in_flight,
                                         windows_pending=self.order.qsize()))
            await self._maybe_complete()

    async def _infer(self, plan: WindowPlan) -> dict:
        sent = time.time()
        request = plan.request(tag=f"{self.sid}:{plan.window}")
        error = "no attempt"
        try:
            for attempt in range(self.limits.model_retries + 1):
                try:
                    res = await asyncio.wait_for(self._call_model(request), self.limits.model_timeout_s)
                except Exception as exc:  # noqa: BLE001 - replica death, timeout, serialization
                    error = f"{type(exc).__name__}: {exc}"
                    log.warning("window %s attempt %d failed: %s", request.tag, attempt + 1, error)
                    continue
                res["sent_at"] = sent
                res["returned_at"] = time.time()
                if res["ok"]:
                    return res
                error = res["error"]
            return {"ok": False, "error": error, "sent_at": sent, "returned_at": time.time()}
        finally:
            self.slots.release()

    async def _call_model(self, request) -> dict:
        return await self.model.infer.remote(request)

    # --- ordered integration ----------------------------------------------------------------------------
    async def _integrate_loop(self) -> None:
        while not self.closed:
            plan, task = await self.order.get()
            res = await task
            if res["ok"]:
                out, snap, started, code = await self._run(self._integrate, plan, res["prediction"])
            else:
                out, snap, started = await self._run(self._fail, plan, f"model unavailable: {res['error']}")
                code = ErrorCode.MODEL_UNAVAILABLE
            now = time.time()
            out.window["timings_ms"] = window_timings(plan, res, started, out.window.pop("geometry_ms", 0.0), now)
            out.window["server_time"] = round(now, 4)
            out.window["batch_size"] = res.get("batch_size")
            stores = [self.storing.pop(f.index) for f in plan.new if f.index in self.storing]
            if stores:  # long done in practice: the forward alone takes longer
                await asyncio.gather(*stores, return_exceptions=True)
            commit = asyncio.ensure_future(call(self.actor.commit_window, self.sid, out.window, out.frames,
                                                out.points, out.colors, snap, not out.ok, self.epoch))
            body = await self._encode_for_streams(out)  # while the commit travels
            reply = await commit
            if reply.status is CommitStatus.FENCED:  # another worker owns the session now and redoes these frames
                log.info("session %s: worker epoch %d superseded; stopping", self.sid, self.epoch,
                         extra={"session_id": self.sid})
                self._gone()
                return
            if reply.stored:
                self._deliver(reply.seq, reply.kept, out, body)
            self.processed += len(plan.new)
            if self.on_window is not None:
                self.on_window(out.window, len(plan.new), None if out.ok else code.value)
            if reply.status is CommitStatus.GONE:
                self._gone()
                return
            if not out.ok:
                self._emit(wire.Error.of(code, f"window {plan.window} frames {out.window['frame_ids']} not "
                                                f"placed: {out.reason}", fatal=False))
            if out.ok and self.recon.consistency is not None:
                self.graph_busy = True
                self.graph_wake.set()  # the pose graph and loop closure follow in _graph_loop, off this path
            if self.recon.maintenance_due:  # now that the window's points are out
                await self._run(self.recon.maintain)
            await self._maybe_complete()

    async def _encode_for_streams(self, out) -> PointBody | None:
        """The points message body for this replica's streams; None if none is attached (or encoding failed:
        the stream then encodes it itself)."""
        if not self.record_listeners:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.pool, encode_point_body, out.points, out.colors, self.params.point_encoding)
        except Exception:  # never lose the commit over it
            log.warning("session %s: encoding points for the stream failed", self.sid, exc_info=True)
            return None

    def _deliver(self, seq: int, kept: int, out, body: PointBody | None = None) -> None:
        """The committed record, as the session actor stored it (seq added; the point budget may have dropped
        the oldest of its points), to the streams on this replica: they need not wait for the actor's long-poll."""
        if not self.record_listeners:
            return
        n = len(out.points)
        rec = ResultRecord(seq=seq, window={**out.window, "seq": seq}, frames=[{**f, "seq": seq} for f in out.frames],
                           points=out.points[n - kept:], colors=out.colors[n - kept:], epoch=self.epoch,
                           body=body if kept == n else None)  # a trimmed record is encoded again
        for fn in list(self.record_listeners):
            fn(rec)

    async def publish_correction(self, corr: Correction) -> None:
        """Commit a global optimisation's per-window corrections to the session actor as the next record
        (fenced by this worker's epoch, like a window) and hand it to this replica's streams; other streams
        and resumes get it from the actor. The stored transforms are the ones the message carries."""
        msg = await asyncio.get_running_loop().run_in_executor(self.pool, corrections.to_message, corr)
        reply = await call(self.actor.commit_correction, self.sid, msg, self.epoch)
        if reply.status is CommitStatus.FENCED:
            log.info("session %s: correction from superseded worker epoch %d refused", self.sid, self.epoch,
                     extra={"session_id": self.sid})
            return
        if not reply.stored or not self.record_listeners:
            return
        seq = reply.seq
        msg = {**msg, "seq": seq, "version": reply.version}
        text = await asyncio.get_running_loop().run_in_executor(self.pool, wire.correction_text, msg)
        rec = CorrectionRecord(seq=seq, message=msg, epoch=self.epoch, text=text)
        for fn in list(self.record_listeners):
            fn(rec)

    # --- global consistency: pose graph and loop closure, off the windows' latency path ----------------------
    async def _graph_loop(self) -> None:
        """After each placed window: odometry edges and loop retrieval (pool, under the lock, milliseconds), the
        pose-graph solve (pool, WITHOUT the lock: the next window integrates meanwhile), its result applied
        (under the lock) and published as a correction; loop candidates go through the model like a window
        (same deployment and batching) and are verified under the lock, all of those due before one global solve
        for the loops accepted among them. Never on the event loop."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            await self.graph_wake.wait()
            self.graph_wake.clear()
            try:
                await self._graph_step(loop)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed optimisation must not stop the session's windows
                log.exception("session %s: pose-graph step failed", self.sid, extra={"session_id": self.sid})
            finally:
                self.graph_busy = self.graph_wake.is_set()
            await self._maybe_complete()

    async def _graph_step(self, loop) -> None:
        """serve_app/recon/graph_step.py's operations, in order: under the lock in the pool, the solve in the pool
        without it, the correction published, the loop windows through the model."""
        steps = graph_step(self.recon)
        result = None
        while not self.closed:
            try:
                op = steps.send(result)
            except StopIteration:
                return
            kind, args = op[0], op[1:]
            if kind == "locked":
                result = await self._run(*args)
            elif kind == "solve":
                result = await loop.run_in_executor(self.pool, self.recon.consistency.run_job, args[0],
                                                    self.recon.graph_params)
            elif kind == "publish":
                result = await self.publish_correction(args[0])
            else:  # "loops"
                result = await self._verify_loops(args[0])

    async def _verify_loops(self, plans: list[WindowPlan]) -> list[dict]:
        """A batch of loop windows through the model in one call (infer_windows: one batched forward, shared with
        whatever windows wait), each verified under the lock; the reports. A failed call fails each window of
        it: integrate_loop queues the candidate again once, then drops it (a missed loop, never a false one)."""
        requests = [p.request(tag=f"{self.sid}:loop{-p.window}") for p in plans]
        results: list = [None] * len(plans)
        try:
            results = await asyncio.wait_for(self._call_model_many(requests), self.limits.model_timeout_s)
        except Exception as exc:  # noqa: BLE001 - replica death, timeout: the candidates go back to the queue
            log.warning("session %s: %d loop windows failed: %s", self.sid, len(plans), exc,
                        extra={"session_id": self.sid})
        reports = []
        for plan, res in zip(plans, results):
            pred = res["prediction"] if isinstance(res, dict) and res.get("ok") else None
            try:
                report = await self._run(self.recon.integrate_loop, plan, pred)
            except Exception:  # a bug in one verification must not wedge the loop machinery
                log.exception("session %s: verifying loop %s raised", self.sid, plan.loop,
                              extra={"session_id": self.sid})
                async with self.lock:
                    self.recon.loop_abandoned(plan)
                report = {"query": plan.loop[0], "candidate": plan.loop[1], "accepted": False,
                          "reason": "internal error"}
            report["windows_in_call"] = len(plans)
            log.info("session %s: loop %s", self.sid, report, extra={"session_id": self.sid})
            reports.append(report)
        return reports

    async def _call_model_many(self, requests: list) -> list[dict]:
        return await self.model.infer_windows.remote(requests)

    # Both run in the pool under the lock; the snapshot lets another replica continue the session.
    def _integrate(self, plan: WindowPlan, pred):
        """(output, snapshot, start time, the error code if the window is not placed)."""
        started = time.time()
        try:
            out = self.recon.integrate(plan, pred)
        except Exception as exc:  # a bug or a malformed prediction fails this window, not the session
            log.exception("session %s: placing window %d raised", self.sid, plan.window,
                          extra={"session_id": self.sid})
            out = self.recon.fail(plan, f"internal error ({type(exc).__name__}); details in the server log")
            return out, self.recon.snapshot(), started, ErrorCode.INTERNAL_ERROR
        return out, self.recon.snapshot(), started, ErrorCode.ALIGNMENT_FAILED

    def _fail(self, plan: WindowPlan, reason: str):
        started = time.time()
        out = self.recon.fail(plan, reason)
        return out, self.recon.snapshot(), started

    @property
    def idle(self) -> bool:
        return not self.recon.pending and self.order.empty() and self.in_flight == 0 and not self.graph_busy

    async def _maybe_complete(self) -> None:
        # The plan loop and finalize() both get here; `completing` keeps it to one actor call at a time, and
        # `finalizing` stays set until the actor has really marked the session complete.
        if self.finalizing and self.idle and not self.completing:
            self.completing = True
            try:
                done = await call(self.actor.complete, self.sid, self.epoch)
            finally:
                self.completing = False
            if done:
                self.finalizing = False
                self._gone()  # nothing more will be processed here
                return
        self.maybe_retire()

    def maybe_retire(self) -> None:
        """No stream attached and nothing accepted left to process: free this replica's copy of the session (its
        context frames and voxel occupancy). A later connection takes the session over from the snapshot."""
        if not self.closed and not self.listeners and not self.oneshot and not self.finalizing and self.idle:
            self._gone()

    def _gone(self) -> None:
        self.closed = True
        self.on_gone(self.sid, self)
