"""The detached, named Ray actor that owns every session's state and runs the expiry sweep.

A thin async wrapper over SessionStore (serve_app/sessions/session_store.py holds the rules). Methods that wait
(`wait_records`) use per-session asyncio conditions, so one actor serves many long-polling streams.

Over 400 lines because it also holds the two other small Ray pieces of the store: the admission actor that
checks global limits across shards, and the ingress's handle on the shards (placement, routing by id).
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
from serve_app.recon import corrections
from serve_app.sessions import shards as sharding
from serve_app.sessions.accept_batch import AcceptBatcher
from serve_app.sessions.replies import Attachment, CommitReply, CommitStatus, RecordsReply, Takeover
from serve_app.sessions.session_store import SessionStore, concat_parts
from serve_app.sessions.state_backends import make_backend

log = logging.getLogger("ray.serve.da3.sessions")


def _reconstructed() -> bool:
    """Whether Ray restarted this actor (False outside an actor, e.g. in unit tests)."""
    if not ray.is_initialized():  # a plain object in a unit test or a bench: asking would start Ray
        return False
    try:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not inside an actor
        return False


class SessionActor:
    def __init__(self, limits: dict[str, Any], state_dir: str | None = None, shard: int = 0, shards: int = 1,
                 backend: dict | None = None):
        self.store = SessionStore(LimitsConfig.model_validate(limits))
        self.store.id_prefix = sharding.shard_prefix(shard, shards)  # the shard is read back from the id
        self._conds: dict[str, asyncio.Condition] = {}
        self._sweeper: asyncio.Task | None = None
        # Persistence (serve_app/sessions/state_backends.py): None = memory only; `backend` is the SessionActorConfig.
        # A shard's own journal directory (state_dir) wins over the config's.
        self.backend = make_backend({**(backend or {}), **({"state_dir": state_dir} if state_dir else {})})
        if self.backend is None:
            self.store.restarted_without_state = _reconstructed()
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

    @ray.method(max_task_retries=0)  # a retry after a lost answer would leave a session nobody knows about
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
        index = self._accept(sid, owner, epoch, frame, index)
        if self.backend is not None:
            await self.backend.accept(self.store.sessions[sid], index)  # the frame, then its acceptance
        return index

    async def accept_frames(self, items: list) -> list:
        """Several accept_frame calls in one (serve_app/sessions/accept_batch.py): `items` are their argument
        tuples (sid, owner, epoch, frame, index), taken in order; per item its index, or the exception that
        refused it (a refusal of one frame does not touch the others)."""
        out: list = [None] * len(items)
        saves = []
        for k, (sid, owner, epoch, frame, index) in enumerate(items):
            try:
                out[k] = self._accept(sid, owner, epoch, frame, index)
            except Exception as exc:  # noqa: BLE001 - answered to that frame's caller
                out[k] = exc
                continue
            if self.backend is not None:  # started in order: each backend keeps a session's writes in call order
                saves.append((k, asyncio.ensure_future(self.backend.accept(self.store.sessions[sid], out[k]))))
        for k, fut in saves:
            try:
                await fut
            except Exception as exc:  # noqa: BLE001 - not persisted: not accepted, that caller does not ack
                out[k] = exc
        return out

    def _accept(self, sid: str, owner: str | None, epoch: int, frame: Any, index: int | None) -> int:
        self.store.get(sid, owner)
        index = self.store.accept_frames(sid, 1, time.time(), payloads=[frame], epoch=epoch, index=index)
        frame.index = index
        if frame.frame_id is None:
            frame.frame_id = index
        return index

    async def take_worker(self, sid: str) -> Takeover:
        """Fence out any earlier worker and hand over what the new one needs: the snapshot taken after the last
        committed window, the accepted frames no window has committed yet (by index), and the session info."""
        if sid not in self.store.sessions:
            self.store.get(sid, None)  # raises SESSION_NOT_FOUND / SESSION_EXPIRED
        epoch = self.store.take_worker(sid)
        await self._save(sid)
        s = self.store.sessions[sid]
        return Takeover(epoch=epoch, stream_state=s.stream_state, info=s.info(),
                        pending=[s.pending[i] for i in sorted(s.pending)])

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
                            ) -> CommitReply:
        """The stored record's seq and the points it kept (the session's point budget may drop the oldest of its
        points); GONE if the session was deleted or expired meanwhile, FENCED if the caller is a stale worker."""
        if sid not in self.store.sessions:
            return CommitReply(CommitStatus.GONE)
        if epoch is not None and not self.store.is_current_worker(sid, epoch):
            return CommitReply(CommitStatus.FENCED)
        rec = self.store.commit_window(sid, window, frames, points, colors, stream_state, time.time(), failed,
                                       epoch)
        if self.backend is not None and not await self.backend.commit(
                self.store.sessions[sid], rec, [f.get("index") for f in frames], stream_state is not None, epoch):
            return CommitReply(CommitStatus.FENCED)  # the store's server fenced it: another actor took over
        await self._notify(sid)
        return CommitReply(CommitStatus.STORED, rec.seq, kept=len(rec.points))

    async def commit_correction(self, sid: str, message: dict, epoch: int | None = None) -> CommitReply:
        """Store a `correction` message (serve_app/recon/corrections.py) as the session's next record: its seq and
        version as stored; GONE / FENCED as for a window."""
        if sid not in self.store.sessions:
            return CommitReply(CommitStatus.GONE)
        if epoch is not None and not self.store.is_current_worker(sid, epoch):
            return CommitReply(CommitStatus.FENCED)
        rec = self.store.commit_correction(sid, message, time.time(), epoch)
        if self.backend is not None and not await self.backend.commit_correction(self.store.sessions[sid], epoch):
            return CommitReply(CommitStatus.FENCED)  # fenced in the store's server, like a window
        await self._notify(sid)
        return CommitReply(CommitStatus.STORED, rec.seq, version=rec.message["version"])

    async def attach(self, sid: str, owner: str | None, connection_id: str) -> Attachment:
        self.store.get(sid, owner)
        displaced = self.store.attach(sid, connection_id)
        if displaced:
            await self._notify(sid)
        return Attachment(self.store.sessions[sid].info(), displaced)

    async def detach(self, sid: str, connection_id: str) -> None:
        self.store.detach(sid, connection_id)

    async def wait_records(self, sid: str, after_seq: int, connection_id: str, timeout: float,
                           skip_epoch: int | None = None) -> RecordsReply:
        """Long-poll: records after `after_seq`, or a status change (gone, displaced, finished). Records committed
        by the worker of epoch `skip_epoch` are left out: that worker hands them to the caller directly."""
        c = self._cond(sid)

        def status() -> RecordsReply | None:
            s = self.store.sessions.get(sid)
            if s is None:
                return RecordsReply(gone=self.store.gone_reason(sid))
            if s.connection_id is None and self.backend is not None:
                s.connection_id = connection_id  # reloaded after a restart: the live stream that asks holds it
            if s.connection_id != connection_id:
                return RecordsReply(displaced=True)
            recs = self.store.records_after(sid, after_seq, skip_epoch)  # window and correction records
            if recs or s.state in ("complete", "failed"):
                return RecordsReply(recs, s.info())
            return None

        st = status()
        if st is not None:
            return st
        async with c:
            try:
                await asyncio.wait_for(c.wait_for(lambda: status() is not None), timeout)
            except TimeoutError:
                pass
        return status() or RecordsReply([], self.store.sessions[sid].info())

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
        s = self.store.get(sid, owner)
        if not corrected or not s.transforms:
            return list(s.frames)
        # a pose per frame through its window's correction: thousands of small matrix products, in a thread
        # (on a copy of the frame list; frame dicts and the transforms dict are replaced, never edited)
        return await asyncio.to_thread(corrections.corrected_frames, list(s.frames), s.transforms)

    async def stream_state(self, sid: str) -> Any:
        s = self.store.sessions.get(sid)
        return None if s is None else s.stream_state

    async def census(self, owner: str | None) -> dict:
        """This shard's session count and `owner`'s (the admission actor sums them over the shards)."""
        self._ensure_sweeper()
        mine = sum(1 for s in self.store.sessions.values() if s.owner == owner) if owner is not None else 0
        return {"total": len(self.store.sessions), "mine": mine}


class SessionAdmission:
    """Creates sessions when there are several shards: the global limits (serve_app/shards.Admission) checked
    against every shard's census, then the session made on the least loaded shard. Creations are serialized
    here (they are not on the hot path); deletions and expiry need nothing from it, since counts are always
    taken from the shards themselves."""

    def __init__(self, limits: dict[str, Any], names: list[str], namespace: str):
        self.admission = sharding.Admission(LimitsConfig.model_validate(limits))
        self.names, self.namespace = names, namespace
        self.last: list[int] = [0] * len(names)  # last census of each shard (used while one is unreachable)
        self.handles: list = [None] * len(names)
        self._lock: asyncio.Lock | None = None

    def _shard(self, k: int):
        if self.handles[k] is None:  # looked up once (again after a failure: the actor may have been replaced)
            self.handles[k] = ray.get_actor(self.names[k], namespace=self.namespace)
        return self.handles[k]

    async def _census(self, k: int, owner: str | None) -> dict:
        try:
            return await asyncio.wait_for(self._shard(k).census.remote(owner), 10)
        except BaseException:
            self.handles[k] = None
            raise

    async def create(self, params: dict, owner: str | None) -> dict:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            got = await asyncio.gather(*[self._census(k, owner) for k in range(len(self.names))],
                                       return_exceptions=True)
            totals: list[int | None] = []
            total = mine = 0
            for k, g in enumerate(got):
                if isinstance(g, BaseException):  # restarting or lost: its last count still counts
                    log.warning("session shard %s unreachable at creation: %s", self.names[k], g)
                    totals.append(None)
                    total += self.last[k]
                    continue
                self.last[k] = g["total"]
                totals.append(g["total"])
                total += g["total"]
                mine += g["mine"]
            self.admission.check(total, mine, owner, time.time())
            return await call(self._shard(sharding.pick_shard(totals)).create, params, owner)


class SessionShards:
    """The ingress's view of the session store: the actor of a session (from its id), creation (through the
    admission actor when sharded), and the list / ping over every shard."""

    def __init__(self, actors: list, admission=None, accept_batch: int = 32):
        self.actors, self.admission = actors, admission
        # per shard: the frames this replica sends it while its last accept call is out go together in one
        # call (serve_app/sessions/accept_batch.py); 1: every frame its own accept_frame call
        self.accept_batch = accept_batch
        self._batchers: dict[int, AcceptBatcher] = {}

    def of(self, sid: str):
        return self.actors[sharding.shard_of(sid, len(self.actors))]

    async def accept_frame(self, sid: str, owner: str | None, epoch: int, frame: Any, index: int | None) -> int:
        """Store one accepted frame on its shard (SessionActor.accept_frame); returns its index once stored."""
        k = sharding.shard_of(sid, len(self.actors))
        if self.accept_batch <= 1:
            return await call(self.actors[k].accept_frame, sid, owner, epoch, frame, index)
        b = self._batchers.get(k)
        if b is None:
            b = self._batchers[k] = AcceptBatcher(
                lambda items, actor=self.actors[k]: call(actor.accept_frames, items), self.accept_batch)
        return await b.accept(sid, owner, epoch, frame, index)

    def accept_counts(self) -> dict:
        """Accept calls made and frames sent in them, over the shards (batching at work: frames / calls)."""
        return {"calls": sum(b.calls for b in self._batchers.values()),
                "frames": sum(b.frames for b in self._batchers.values())}

    async def create(self, params: dict, owner: str | None) -> dict:
        if self.admission is None:
            return await call(self.actors[0].create, params, owner)
        return await call(self.admission.create, params, owner)

    async def list(self, owner: str | None, everyone: bool = False) -> dict:
        parts = await asyncio.gather(*[call(a.list, owner, everyone=everyone) for a in self.actors])
        return sharding.merge_lists(parts)

    async def ping(self) -> None:
        await asyncio.gather(*[a.ping.remote() for a in self.actors])


def _node_strategies(cfg: SessionActorConfig) -> list:
    """Ray scheduling strategy per shard: pinned (softly, so a restart after a node loss goes elsewhere) round
    robin over the worker nodes, never the head unless it is the only node (then logged)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not cfg.avoid_head_node:
        return ["SPREAD"] * cfg.shards
    nodes = [{"node_id": n["NodeID"], "alive": n.get("Alive", False),
              "head": "node:__internal_head__" in n.get("Resources", {})} for n in ray.nodes()]
    placement, fell_back = sharding.place_shards(nodes, cfg.shards, avoid_head=True)
    if fell_back:
        log.warning("session store: no node but the head in this cluster; its %d shard(s) run on the head "
                    "node", cfg.shards)
        return ["DEFAULT"] * cfg.shards
    return [NodeAffinitySchedulingStrategy(node_id=n, soft=True) for n in placement]


def shard_state_dir(state_dir: str | None, shard: int) -> str | None:
    """Shard 0 keeps the configured journal directory; shard k a sibling `<dir>-shard<k>`."""
    if state_dir is None or shard == 0:
        return state_dir
    return f"{state_dir.rstrip('/')}-shard{shard}"


def get_session_actor(cfg: SessionActorConfig, limits: LimitsConfig, shard: int = 0,
                      strategy: Any = "DEFAULT"):
    """Get or create one detached session-store actor (explicit namespace, survives ingress restarts)."""
    cls = ray.remote(SessionActor)
    return cls.options(
        name=sharding.actor_name(cfg.name, shard), namespace=cfg.namespace, lifetime="detached",
        get_if_exists=True,
        max_restarts=cfg.max_restarts, max_task_retries=cfg.max_task_retries, num_cpus=0,
        max_concurrency=1000, scheduling_strategy=strategy,
        # the creating ingress's values (its app's runtime_env), so the records it returns travel the same way
        runtime_env={"env_vars": {k: v for k, v in in_effect().items() if v is not None}},
    ).remote(limits.model_dump(), shard_state_dir(cfg.state_dir, shard), shard, cfg.shards,
             shard_backend(cfg, shard))


def shard_backend(cfg: SessionActorConfig, shard: int) -> dict:
    """One shard's persistence settings: its own name (the default Redis key prefix is made from it) and, with
    an explicit prefix, its own sub-prefix, so a restarted shard reloads only its own sessions."""
    out = {**cfg.model_dump(), "name": sharding.actor_name(cfg.name, shard)}
    if cfg.redis_prefix and shard:
        out["redis_prefix"] = f"{cfg.redis_prefix}shard{shard}:"
    return out


def get_session_shards(cfg: SessionActorConfig, limits: LimitsConfig) -> SessionShards:
    """Every shard's actor (created where missing, placed by `_node_strategies`) and, with several, the
    admission actor that creates sessions."""
    strategies = _node_strategies(cfg)
    actors = [get_session_actor(cfg, limits, k, strategies[k]) for k in range(cfg.shards)]
    if cfg.shards == 1:
        return SessionShards(actors, accept_batch=cfg.accept_batch)
    admission = ray.remote(SessionAdmission).options(
        name=sharding.admission_name(cfg.name), namespace=cfg.namespace, lifetime="detached",
        get_if_exists=True,
        max_restarts=-1, max_task_retries=cfg.max_task_retries, num_cpus=0, max_concurrency=1000,
        runtime_env={"env_vars": {k: v for k, v in in_effect().items() if v is not None}},
    ).remote(limits.model_dump(), [sharding.actor_name(cfg.name, k) for k in range(cfg.shards)],
             cfg.namespace)
    return SessionShards(actors, admission, accept_batch=cfg.accept_batch)


def store_unavailable(exc: BaseException) -> bool:
    """A store call failed because its actor died or cannot be reached (restarting, its node lost, retries
    spent): not the session's fault, and worth a reconnect once the store is back (close 1012)."""
    return isinstance(exc, ray.exceptions.RayActorError)


async def call(actor_method, *args, **kwargs):
    """Await an actor call, re-raising ServiceError as itself (Ray wraps remote exceptions)."""
    try:
        return await actor_method.remote(*args, **kwargs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, ServiceError):
            raise ServiceError(cause.code, cause.message, fatal=cause.fatal, details=cause.details) from None
        raise
