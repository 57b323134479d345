"""The detached, named Ray actor that owns every session's state and runs the expiry sweep.

A thin async wrapper over SessionStore (serve_app/session_store.py holds the rules). Methods that wait
(`wait_records`) use per-session asyncio conditions, so one actor serves many long-polling streams.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from serve_app.config import LimitsConfig, SessionActorConfig, SessionParams
from serve_app.errors import ServiceError
from serve_app.ray_env import in_effect
from serve_app.session_store import SessionStore, concat_parts
from serve_app.state_backends import make_backend

log = logging.getLogger("ray.serve.da3.sessions")


class SessionActor:
    def __init__(self, limits: dict[str, Any], state_dir: str | None = None, backend: dict | None = None):
        self.store = SessionStore(LimitsConfig.model_validate(limits))
        self._conds: dict[str, asyncio.Condition] = {}
        self._sweeper: asyncio.Task | None = None
        # Persistence (serve_app/state_backends.py): None = memory only; `backend` is the SessionActorConfig.
        self.backend = make_backend({"state_dir": state_dir, **(backend or {})})
        if self.backend is not None:
            restored = self.backend.load_all()
            self.store.restore(restored)
            log.warning("session store started; restored %d sessions from %s", len(restored), self.backend.name)

    async def _save(self, sid: str) -> None:
        s = self.store.sessions.get(sid)
        if self.backend is not None and s is not None:
            await self.backend.save_meta(s)

    # Conditions are created lazily: __init__ runs before the actor's event loop exists.
    def _cond(self, sid: str) -> asyncio.Condition:
        c = self._conds.get(sid)
        if c is None:
            c = self._conds[sid] = asyncio.Condition()
        return c

    async def _notify(self, sid: str) -> None:
        c = self._cond(sid)
        async with c:
            c.notify_all()

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.store.limits.sweep_interval_s)
            await self.sweep()

    async def sweep(self) -> list[str]:
        gone = self.store.sweep(time.time())
        for sid in gone:
            if self.backend is not None:
                await self.backend.delete(sid)
            log.info("session expired", extra={"session_id": sid})
            await self._notify(sid)
            self._conds.pop(sid, None)
        return gone

    async def ping(self) -> bool:
        self._ensure_sweeper()
        return True

    async def create(self, params: dict, owner: str | None) -> dict:
        self._ensure_sweeper()
        s = self.store.create(SessionParams.model_validate(params), owner, time.time())
        try:
            await self._save(s.session_id)
            return s.info()
        except BaseException:  # a session nobody was told about must not stay and count against the limits
            self.store.sessions.pop(s.session_id, None)
            if self.backend is not None:
                await self.backend.delete(s.session_id)
            raise

    async def info(self, sid: str, owner: str | None) -> dict:
        return self.store.get(sid, owner).info()

    async def delete(self, sid: str, owner: str | None) -> dict:
        s = self.store.delete(sid, owner)
        if self.backend is not None:
            await self.backend.delete(sid)
        await self._notify(sid)
        self._conds.pop(sid, None)
        return s.info()

    async def list(self, owner: str | None, everyone: bool = False) -> dict:
        """The owner's sessions (`everyone`: all of them, for the operator's /stats)."""
        found = list(self.store.sessions.values()) if everyone else self.store.list(owner)
        return {"sessions": [s.info() for s in found], "counts": self.store.counts(),
                "limits": {"max_sessions": self.store.limits.max_sessions}, "ray_env": in_effect()}

    async def accept_frame(self, sid: str, owner: str | None, epoch: int, frame: Any, index: int | None = None
                           ) -> int:
        """Store one accepted frame (a FrameInput) until a window commits it; returns its index (`index`: the one
        the worker gave it, checked). The ingress acks only after this returns, so an acked frame survives the
        replica that received it."""
        self.store.get(sid, owner)
        index = self.store.accept_frames(sid, 1, time.time(), payloads=[frame], epoch=epoch, index=index)
        frame.index = index
        if frame.frame_id is None:
            frame.frame_id = index
        if self.backend is not None:
            await self.backend.accept(self.store.sessions[sid], index)  # the frame, then its acceptance
        return index

    async def take_worker(self, sid: str) -> dict:
        """Fence out any earlier worker and hand over what the new one needs: the snapshot taken after the last
        committed window, the accepted frames no window has committed yet (by index), and the session info."""
        if sid not in self.store.sessions:
            self.store.get(sid, None)  # raises SESSION_NOT_FOUND / SESSION_EXPIRED
        epoch = self.store.take_worker(sid)
        await self._save(sid)
        s = self.store.sessions[sid]
        return {"epoch": epoch, "stream_state": s.stream_state, "info": s.info(),
                "pending": [s.pending[i] for i in sorted(s.pending)]}

    async def complete(self, sid: str, epoch: int) -> bool:
        """Mark the session complete (the client finalized it), only from the current worker and with nothing left
        pending. The state may still read "streaming": the worker can get here before set_state("finalizing")."""
        s = self.store.sessions.get(sid)
        if s is None or s.worker_epoch != epoch or s.pending or s.state == "failed":
            return False
        if s.state == "complete":
            return True
        self.store.set_state(sid, "complete", time.time())
        await self._save(sid)
        await self._notify(sid)
        return True

    async def touch(self, sid: str) -> None:
        self.store.touch(sid, time.time())

    async def set_state(self, sid: str, state: str, error: dict | None = None) -> dict:
        if sid not in self.store.sessions:
            return {}
        s = self.store.set_state(sid, state, time.time(), error)
        await self._save(sid)
        await self._notify(sid)
        return s.info()

    async def commit_window(self, sid: str, window: dict, frames: list[dict], points, colors,
                            stream_state: Any = None, failed: bool = False, epoch: int | None = None
                            ) -> tuple[int, int]:
        """(seq, points kept) of the stored record: the session's point budget may drop the oldest of its points.
        seq is -1 if the session is gone, -2 if the caller is a stale (fenced) worker."""
        if sid not in self.store.sessions:
            return -1, 0  # deleted or expired while the window was in flight
        if epoch is not None and not self.store.is_current_worker(sid, epoch):
            return -2, 0
        rec = self.store.commit_window(sid, window, frames, points, colors, stream_state, time.time(), failed,
                                       epoch)
        if self.backend is not None and not await self.backend.commit(
                self.store.sessions[sid], rec, [f.get("index") for f in frames], stream_state is not None, epoch):
            return -2, 0  # the store's server fenced it: another actor instance took the session over
        await self._notify(sid)
        return rec.seq, len(rec.points)

    async def commit_correction(self, sid: str, message: dict, epoch: int | None = None) -> tuple[int, int]:
        """Store a `correction` message (serve_app/corrections.py) as the session's next record: (seq, version
        as stored). seq is -1 if the session is gone, -2 if the caller is a stale (fenced) worker."""
        if sid not in self.store.sessions:
            return -1, 0
        if epoch is not None and not self.store.is_current_worker(sid, epoch):
            return -2, 0
        rec = self.store.commit_correction(sid, message, time.time(), epoch)
        if self.backend is not None and not await self.backend.commit_correction(self.store.sessions[sid], epoch):
            return -2, 0  # fenced in the store's server, like a window
        await self._notify(sid)
        return rec.seq, rec.message["version"]

    async def attach(self, sid: str, owner: str | None, connection_id: str) -> dict:
        self.store.get(sid, owner)
        displaced = self.store.attach(sid, connection_id)
        if displaced:
            await self._notify(sid)
        return {"info": self.store.sessions[sid].info(), "displaced": displaced}

    async def detach(self, sid: str, connection_id: str) -> None:
        self.store.detach(sid, connection_id)

    async def wait_records(self, sid: str, after_seq: int, connection_id: str, timeout: float,
                           skip_epoch: int | None = None) -> dict:
        """Long-poll: records after `after_seq`, or a status change (gone, displaced, finished). Records committed
        by the worker of epoch `skip_epoch` are left out: that worker hands them to the caller directly."""
        c = self._cond(sid)

        def status() -> dict | None:
            s = self.store.sessions.get(sid)
            if s is None:
                return {"gone": self.store.gone_reason(sid)}
            if s.connection_id is None and self.backend is not None:
                s.connection_id = connection_id  # reloaded after a restart: the live stream that asks holds it
            if s.connection_id != connection_id:
                return {"displaced": True}
            recs = self.store.records_after(sid, after_seq, skip_epoch)  # window and correction records
            if recs or s.state in ("complete", "failed"):
                return {"records": recs, "info": s.info()}
            return None

        st = status()
        if st is not None:
            return st
        async with c:
            try:
                await asyncio.wait_for(c.wait_for(lambda: status() is not None), timeout)
            except TimeoutError:
                pass
        return status() or {"records": [], "info": self.store.sessions[sid].info()}

    async def wait_finished(self, sid: str, timeout: float) -> dict:
        """Wait until the session is complete or failed (or gone); returns its info or {"gone": ...}."""
        c = self._cond(sid)

        def done() -> bool:
            s = self.store.sessions.get(sid)
            return s is None or s.state in ("complete", "failed")

        if not done():
            async with c:
                try:
                    await asyncio.wait_for(c.wait_for(done), timeout)
                except TimeoutError:
                    pass
        s = self.store.sessions.get(sid)
        return {"gone": True} if s is None else s.info()

    async def point_cloud(self, sid: str, owner: str | None, corrected: bool = True):
        # Joining (and correcting) a map of millions of points would stall every other session's calls: take
        # the parts here (consistent at this instant), join them in a thread.
        parts = self.store.point_cloud_parts(sid, owner, corrected)
        return await asyncio.to_thread(concat_parts, parts)

    async def trajectory(self, sid: str, owner: str | None, corrected: bool = True) -> list[dict]:
        return self.store.trajectory(sid, owner, corrected)

    async def stream_state(self, sid: str) -> Any:
        s = self.store.sessions.get(sid)
        return None if s is None else s.stream_state


def get_session_actor(cfg: SessionActorConfig, limits: LimitsConfig):
    """Get or create the detached session actor (explicit namespace, survives ingress restarts)."""
    cls = ray.remote(SessionActor)
    return cls.options(
        name=cfg.name, namespace=cfg.namespace, lifetime="detached", get_if_exists=True,
        max_restarts=cfg.max_restarts, max_task_retries=cfg.max_task_retries, num_cpus=0,
        max_concurrency=1000,
        # the creating ingress's values (its app's runtime_env), so the records it returns travel the same way
        runtime_env={"env_vars": {k: v for k, v in in_effect().items() if v is not None}},
    ).remote(limits.model_dump(), cfg.state_dir, cfg.model_dump())


async def call(actor_method, *args, **kwargs):
    """Await an actor call, re-raising ServiceError as itself (Ray wraps remote exceptions)."""
    try:
        return await actor_method.remote(*args, **kwargs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ServiceError):
            raise ServiceError(cause.code, cause.message, fatal=cause.fatal, details=cause.details) from None
        raise
