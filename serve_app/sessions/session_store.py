"""Session rules: lifecycle, limits, expiry, ownership, result records. Plain Python, no Ray.

The detached session actor (deployments/session_actor.py) wraps one SessionStore; tests drive it directly with
an explicit clock. All times are UNIX seconds passed in by the caller.

Over 400 lines because every session rule (lifecycle, limits, ownership, fencing, results, the point budget)
is kept in this one class, so the memory, journal and Redis backends all apply the same rules.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.config import LimitsConfig, SessionParams
from serve_app.errors import ErrorCode, ServiceError
from serve_app.recon import corrections
from serve_app.sessions.shards import Admission
from serve_app.sessions.stream_state import merge as stream_state_merge

# created -> streaming -> finalizing -> complete; any live state -> failed; expiry removes the session.
LIVE_STATES = ("created", "streaming", "finalizing")
TRANSITIONS = {
    "created": {"streaming", "finalizing", "complete", "failed"},
    "streaming": {"finalizing", "complete", "failed"},
    "finalizing": {"complete", "failed", "streaming"},
    "complete": set(),
    "failed": set(),
}


def owner_of(api_key: str | None) -> str | None:
    """Sessions are owned by a fingerprint of the key, never the key itself."""
    if not api_key:
        return None
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


def new_session_id() -> str:
    return secrets.token_urlsafe(18)  # 144 random bits


@dataclass
class ResultRecord:
    """One processed window as the client receives it (see docs/WEBSOCKET_API.md, 'Result record')."""

    seq: int
    window: dict[str, Any]
    frames: list[dict[str, Any]]
    points: np.ndarray  # (M, 3) float32 world
    colors: np.ndarray  # (M, 3) uint8
    epoch: int | None = None  # the committing worker's fencing epoch (its replica's streams got it directly)
    body: Any = None  # protocol.PointBody of points/colors, encoded by that worker during the commit (never stored)

    @property
    def nbytes(self) -> int:
        return int(self.points.nbytes + self.colors.nbytes + (len(self.body.data) if self.body is not None else 0))


@dataclass
class CorrectionRecord:
    """A seq-numbered `correction` message (docs/WEBSOCKET_API.md): per-window absolute transforms, no points.
    Kept apart from the window records (Session.corrections); the stream interleaves them by seq."""

    seq: int
    message: dict[str, Any]  # the wire message, seq included; compaction may drop superseded rows later
    epoch: int | None = None
    text: str | None = None  # the message as sent, when the committing worker hands it to its streams

    @property
    def nbytes(self) -> int:
        return len(self.text) if self.text is not None else 70 * len(self.message["transforms"]) + 64


@dataclass
class Session:
    session_id: str
    owner: str | None
    params: SessionParams
    created_at: float
    updated_at: float
    state: str = "created"
    frames_received: int = 0
    frames_processed: int = 0
    frames_failed: int = 0
    windows: int = 0
    last_seq: int = 0
    points_total: int = 0
    error: dict[str, Any] | None = None
    finished_at: float | None = None
    records: list[ResultRecord] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)  # per processed frame, for trajectory export
    # Opaque state the ingress needs to continue the stream (context frames etc.), replaced after each window.
    stream_state: Any = None
    connection_id: str | None = None  # the WebSocket that currently holds the session
    # Accepted frames not yet in a committed window (opaque payloads by index), so any ingress replica can
    # process them: an ack means the frame is stored here, and a drained or dead replica loses nothing.
    pending: dict[int, Any] = field(default_factory=dict)
    # Fencing token of the worker that processes the session; a takeover bumps it and the old worker's
    # commits and frames are refused from then on.
    worker_epoch: int = 0
    # Global consistency: correction records (compacted: one row per window overall) and the state they build,
    # window -> absolute Sim3 (corrections.py); the records above stay as first emitted.
    corrections: list[CorrectionRecord] = field(default_factory=list)
    transforms: dict[int, Any] = field(default_factory=dict)
    correction_version: int = 0
    # records[:live_from] hold no points any more (the budget dropped them): the budget skips them, so a
    # commit costs the same in a session's 10,000th window as in its first
    live_from: int = 0

    def expires_at(self) -> float:
        return min(self.created_at + self.params.ttl_s, self.updated_at + self.params.idle_ttl_s)

    def memory_bytes(self) -> int:
        return sum(r.nbytes for r in self.records)

    def info(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "state": self.state,
            "params": self.params.model_dump(),
            "frames_received": self.frames_received,
            "frames_processed": self.frames_processed,
            "frames_failed": self.frames_failed,
            "windows": self.windows,
            "points_total": self.points_total,
            "last_seq": self.last_seq,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "expires_at": self.expires_at(),
            "memory_bytes": self.memory_bytes(),
            "connected": self.connection_id is not None,
            "pending_frames": len(self.pending),
            "worker_epoch": self.worker_epoch,
            "correction_version": self.correction_version,
            "error": self.error,
        }


def finalized_error(state: str) -> ServiceError:
    """A frame for a session that takes no more (the store's check, and the worker's own before it asks)."""
    return ServiceError(ErrorCode.SESSION_FINALIZED, f"session is {state}; no more frames accepted")


def frame_limit_error(max_frames: int) -> ServiceError:
    return ServiceError(ErrorCode.FRAME_LIMIT_EXCEEDED, f"session frame limit of {max_frames} reached")


def concat_parts(parts: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """One (N, 3) float32 / (N, 3) uint8 map from `point_cloud_parts`, each part's correction applied (the
    heavy part: the actor runs it off its loop)."""
    if not parts:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
    pts = np.concatenate([corrections.apply_points(T, p) for p, _, T in parts]).astype(np.float32, copy=False)
    return pts, np.concatenate([c for _, c, _ in parts])


class SessionStore:
    id_prefix = ""

    def __init__(self, limits: LimitsConfig | None = None):
        self.limits = limits or LimitsConfig()
        self.sessions: dict[str, Session] = {}
        self.expired: dict[str, float] = {}  # tombstones: id -> expired at
        self.expired_owner: dict[str, str | None] = {}  # whose tombstone: only its owner learns "expired"
        # Set by an actor that Ray restarted with nothing to reload: an unknown id is then most likely a session
        # it lost, and clients are told so (SESSION_LOST) rather than "not found".
        self.restarted_without_state = False
        self.admission = Admission(self.limits)  # the same creation rules a sharded server applies to all shards
        self.deleted: dict[str, float] = {}  # tombstones, so streams can tell "deleted" from "lost"

    # --- lookup -------------------------------------------------------------------------------------
    def _get(self, session_id: str, owner: str | None) -> Session:
        s = self.sessions.get(session_id)
        # Another key's session answers exactly like a missing one: no existence oracle.
        if s is None or (s.owner is not None and not hmac.compare_digest(s.owner, owner or "")):
            if session_id in self.expired and s is None and self._owns_tombstone(session_id, owner):
                raise ServiceError(ErrorCode.SESSION_EXPIRED, f"session {session_id} has expired", fatal=True)
            if s is None and self.restarted_without_state and session_id not in self.deleted:
                raise ServiceError(ErrorCode.SESSION_LOST, f"session {session_id} is unknown to the session store, "
                                   "which restarted without stored state (backend memory)", fatal=True)
            raise ServiceError(ErrorCode.SESSION_NOT_FOUND, f"session {session_id} not found", fatal=True)
        return s

    def _owns_tombstone(self, session_id: str, owner: str | None) -> bool:
        tomb = self.expired_owner.get(session_id)
        return tomb is None or hmac.compare_digest(tomb, owner or "")

    def get(self, session_id: str, owner: str | None = None) -> Session:
        return self._get(session_id, owner)

    # --- lifecycle ----------------------------------------------------------------------------------
    def create(self, params: SessionParams, owner: str | None, now: float) -> Session:
        # Without keys (auth none) max_sessions is the only limit.
        mine = sum(1 for s in self.sessions.values() if s.owner == owner) if owner is not None else 0
        self.admission.check(len(self.sessions), mine, owner, now)
        sid = self.id_prefix + new_session_id()  # the shard's prefix (serve_app/sessions/shards.py), "" with one shard
        s = Session(session_id=sid, owner=owner, params=params, created_at=now, updated_at=now)
        self.sessions[sid] = s
        return s

    def delete(self, session_id: str, owner: str | None) -> Session:
        s = self._get(session_id, owner)
        del self.sessions[session_id]
        self.deleted[session_id] = s.updated_at
        return s

    def list(self, owner: str | None) -> list[Session]:
        return [s for s in self.sessions.values() if s.owner is None or s.owner == owner]

    def set_state(self, session_id: str, state: str, now: float, error: dict | None = None) -> Session:
        s = self.sessions[session_id]
        if state == s.state:
            return s
        if state not in TRANSITIONS[s.state]:
            raise ServiceError(ErrorCode.INTERNAL_ERROR, f"illegal session transition {s.state} -> {state}")
        s.state = state
        s.updated_at = now
        if error is not None:
            s.error = error
        if state in ("complete", "failed"):
            s.finished_at = now
        return s

    def touch(self, session_id: str, now: float) -> None:
        s = self.sessions.get(session_id)
        if s is not None:
            s.updated_at = now

    # --- frames -------------------------------------------------------------------------------------
    def accept_frames(self, session_id: str, count: int, now: float, payloads: list[Any] | None = None,
                      epoch: int | None = None, index: int | None = None) -> int:
        """Reserve `count` frame indices and keep their payloads until a window commits them; returns the first
        index. Rejections carry their own codes; `epoch` (when given) must be the current worker's, and `index`
        (when given: the worker numbered the frames itself) must be the next one."""
        s = self.sessions[session_id]
        self._check_epoch(s, epoch)
        if (index is not None and count == 1 and index < s.frames_received and index in s.pending
                and payloads is not None and self._same_frame(s.pending[index], payloads[0])):
            return index  # Ray retried a call whose answer was lost (the store restarted after saving it)
        if s.state in ("complete", "failed", "finalizing"):
            raise finalized_error(s.state)
        if s.frames_received + count > s.params.max_frames:
            raise frame_limit_error(s.params.max_frames)
        if payloads is not None and len(s.pending) + count > self.limits.max_in_flight:
            raise ServiceError(ErrorCode.QUEUE_FULL,
                               f"{len(s.pending)} frames in flight (max {self.limits.max_in_flight}); "
                               "wait for results before sending more")
        if index is not None and index != s.frames_received:
            raise ServiceError(ErrorCode.SESSION_BUSY, f"frame index {index} is out of step with the session "
                               f"({s.frames_received} frames received): another writer; reconnect to continue",
                               fatal=True)
        first = s.frames_received
        s.frames_received += count
        if payloads is not None:
            for i, payload in enumerate(payloads):
                s.pending[first + i] = payload
        if s.state == "created":
            s.state = "streaming"
        s.updated_at = now
        return first

    @staticmethod
    def _same_frame(a: Any, b: Any) -> bool:
        return getattr(a, "frame_id", a) == getattr(b, "frame_id", b) and \
            getattr(a, "encoded", None) == getattr(b, "encoded", None)

    @staticmethod
    def _check_epoch(s: Session, epoch: int | None) -> None:
        if epoch is not None and epoch != s.worker_epoch:
            raise ServiceError(ErrorCode.SESSION_BUSY, "another server replica has taken this session over; "
                               "reconnect to continue", fatal=True, details={"stale_worker": True})

    def take_worker(self, session_id: str) -> int:
        """A new worker takes the session over: returns its fencing epoch (older workers become stale)."""
        s = self.sessions[session_id]
        s.worker_epoch += 1
        return s.worker_epoch

    def is_current_worker(self, session_id: str, epoch: int) -> bool:
        s = self.sessions.get(session_id)
        return s is not None and s.worker_epoch == epoch

    def commit_window(self, session_id: str, window: dict, frames: list[dict], points: np.ndarray,
                      colors: np.ndarray, stream_state: Any, now: float, failed: bool = False,
                      epoch: int | None = None) -> ResultRecord:
        """Store one processed window; enforces the session point budget by evicting the oldest points."""
        s = self.sessions[session_id]
        indices = [f.get("index") for f in frames if f.get("index") is not None]
        if indices and s.records and s.records[-1].epoch == epoch and max(indices) < s.frames_received and \
                not any(i in s.pending for i in indices) and set(indices) <= {f.get("index") for f in s.records[-1].frames}:
            return s.records[-1]  # Ray retried a commit whose answer was lost: it is stored already
        s.last_seq += 1
        for f in frames:
            s.pending.pop(f.get("index"), None)
        window = {**window, "seq": s.last_seq}
        frames = [{**f, "seq": s.last_seq} for f in frames]
        rec = ResultRecord(seq=s.last_seq, window=window, frames=frames,
                           points=np.ascontiguousarray(points, np.float32),
                           colors=np.ascontiguousarray(colors, np.uint8), epoch=epoch)
        s.records.append(rec)
        s.frames.extend(frames)
        s.windows += 1
        s.frames_processed += len(frames)
        if failed:
            s.frames_failed += len(frames)
        s.points_total += len(rec.points)
        s.stream_state = stream_state_merge(s.stream_state, stream_state)  # large unchanged parts travel once
        s.updated_at = now
        self._enforce_budget(s)
        return rec

    def _enforce_budget(self, s: Session) -> None:
        excess = s.points_total - s.params.max_points
        for k in range(s.live_from, len(s.records)):
            if excess <= 0:
                break
            rec = s.records[k]
            n = len(rec.points)
            if n == 0:
                continue
            drop = min(n, excess)
            rec.points, rec.colors = rec.points[drop:], rec.colors[drop:]
            s.points_total -= drop
            excess -= drop
        while s.live_from < len(s.records) - 1 and not len(s.records[s.live_from].points):
            s.live_from += 1

    def restore(self, sessions: list[Session]) -> None:
        """Sessions reloaded after a crash: no connection or worker holds them any more."""
        for s in sessions:
            s.connection_id = None
            # What was reloaded, not the count saved: a journal may hold points the budget had already dropped.
            s.points_total = sum(len(r.points) for r in s.records)
            self.sessions[s.session_id] = s
            self._enforce_budget(s)

    def gone_reason(self, session_id: str) -> str:
        if session_id in self.expired:
            return ErrorCode.SESSION_EXPIRED.value
        if session_id in self.deleted:
            return "SESSION_DELETED"
        return ErrorCode.SESSION_LOST.value

    def records_after(self, session_id: str, seq: int, skip_epoch: int | None = None) -> list:
        """Window and correction records after `seq`, in seq order (those of worker `skip_epoch` left out)."""
        s = self.sessions[session_id]
        start = bisect.bisect_right(s.records, seq, key=lambda r: r.seq)  # records are in seq order
        recs = [r for r in s.records[start:] if skip_epoch is None or r.epoch != skip_epoch]
        if s.corrections and s.corrections[-1].seq > seq:
            recs += [c for c in s.corrections
                     if c.seq > seq and (skip_epoch is None or c.epoch != skip_epoch)]
            recs.sort(key=lambda r: r.seq)
        return recs

    def commit_correction(self, session_id: str, message: dict, now: float, epoch: int | None = None
                          ) -> CorrectionRecord:
        """Store a correction message (corrections.to_message) as the next record. The transforms kept are
        the ones decoded from the message, so the server's exports equal what a client computes from it. Its
        version is raised above the session's last if needed (a takeover worker may count from scratch)."""
        s = self.sessions[session_id]
        corr = corrections.from_message(message)
        s.last_seq += 1
        s.correction_version = max(corr.version, s.correction_version + 1)
        message = {**message, "seq": s.last_seq, "version": s.correction_version}
        s.corrections = corrections_compacted(s.corrections, message)
        rec = CorrectionRecord(seq=s.last_seq, message=message, epoch=epoch)
        s.corrections.append(rec)
        s.transforms = corrections.merge(s.transforms, corr)
        s.updated_at = now
        return rec

    def point_cloud(self, session_id: str, owner: str | None, corrected: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
        """The stored map; `corrected`: each window's points mapped by its current correction (exports)."""
        return concat_parts(self.point_cloud_parts(session_id, owner, corrected))

    def point_cloud_parts(self, session_id: str, owner: str | None, corrected: bool = True) -> list[tuple]:
        """(points, colors, correction or None) per record, as they are now (no copy; the correction is
        applied by `concat_parts`, which can run in another thread)."""
        s = self._get(session_id, owner)
        state = s.transforms if corrected else {}
        return [(r.points, r.colors, state.get(r.window.get("window", -1))) for r in s.records]

    def trajectory(self, session_id: str, owner: str | None, corrected: bool = True) -> list[dict]:
        """Every processed frame's frame_result, poses corrected unless `corrected` is False."""
        s = self._get(session_id, owner)
        return corrections.corrected_frames(s.frames, s.transforms) if corrected else list(s.frames)

    # --- connections and workers --------------------------------------------------------------------
    def attach(self, session_id: str, connection_id: str) -> str | None:
        """The newest connection takes the session over; returns the connection it displaced (if any)."""
        s = self.sessions[session_id]
        previous = s.connection_id
        s.connection_id = connection_id
        return previous if previous != connection_id else None

    def detach(self, session_id: str, connection_id: str) -> None:
        s = self.sessions.get(session_id)
        if s is not None and s.connection_id == connection_id:
            s.connection_id = None

    # --- expiry -------------------------------------------------------------------------------------
    def sweep(self, now: float) -> list[str]:
        """Remove sessions past their idle or absolute TTL; returns their ids."""
        gone = [sid for sid, s in self.sessions.items() if now >= s.expires_at()]
        for sid in gone:
            self.expired_owner[sid] = self.sessions.pop(sid).owner
            self.expired[sid] = now
        keep = self.limits.expired_tombstone_s
        self.expired = {k: t for k, t in self.expired.items() if now - t < keep}
        self.expired_owner = {k: o for k, o in self.expired_owner.items() if k in self.expired}
        self.deleted = {k: t for k, t in self.deleted.items() if now - t < keep}
        return gone

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {"total": len(self.sessions)}
        for s in self.sessions.values():
            out[s.state] = out.get(s.state, 0) + 1
        return out


def corrections_compacted(stored: list[CorrectionRecord], newer: dict) -> list[CorrectionRecord]:
    """Stored correction records with the rows `newer` supersedes dropped (see corrections.compact)."""
    msgs = corrections.compact([c.message for c in stored], newer)
    return [c if m is c.message else CorrectionRecord(seq=c.seq, message=m, epoch=c.epoch)
            for c, m in zip(stored, msgs)]
