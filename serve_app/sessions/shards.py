"""Session-store shards: which actor holds a session, where shards run, and the cluster-wide creation limits.

Plain Python, no Ray (deployments/session_actor.py is the Ray layer). With `session_actor.shards: N > 1` a
session's shard is chosen once, at creation, and written into its id (`s<k>.<token>`), so every later call
finds its actor from the id alone: no lookup on the hot path. Ids without a prefix (every id of a one-shard
server) belong to shard 0, so turning sharding on keeps today's sessions reachable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from serve_app.config import LimitsConfig
from serve_app.errors import ErrorCode, ServiceError
from serve_app.limits import TokenBucket

MAX_SHARDS = 256  # the prefix is at most 3 digits


def shard_prefix(shard: int, shards: int) -> str:
    """The id prefix of `shard`'s sessions: none on a one-shard server (ids stay as they always were)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} out of range for {shards} shards")
    return "" if shards == 1 else f"s{shard}."


def shard_of(session_id: str, shards: int) -> int:
    """The shard holding `session_id`, from the id alone. An id naming a shard this server does not have
    (tampered with, or from a server with more shards) is SESSION_NOT_FOUND, like any unknown id."""
    head, dot, _ = session_id.partition(".")
    if not dot:
        return 0
    if len(head) < 2 or len(head) > 4 or head[0] != "s" or not head[1:].isdigit():
        raise ServiceError(ErrorCode.SESSION_NOT_FOUND, f"session {session_id} not found", fatal=True)
    k = int(head[1:])
    if k >= shards:
        raise ServiceError(ErrorCode.SESSION_NOT_FOUND, f"session {session_id} not found", fatal=True)
    return k


def actor_name(base: str, shard: int) -> str:
    """Shard 0 keeps the one-shard name, so a server that grows to N shards finds its existing sessions."""
    return base if shard == 0 else f"{base}-{shard}"


def admission_name(base: str) -> str:
    return f"{base}-admission"


def pick_shard(totals: Sequence[int | None]) -> int:
    """The shard a new session goes to: the least loaded that answered (None: unreachable), lowest first."""
    live = [(n, k) for k, n in enumerate(totals) if n is not None]
    if not live:
        raise ServiceError(ErrorCode.INTERNAL_ERROR, "no session store shard is reachable; retry later")
    return min(live)[1]


def place_shards(nodes: list[dict[str, Any]], shards: int, avoid_head: bool) -> tuple[list[str | None], bool]:
    """Node per shard (None: let Ray choose), round robin over the alive nodes, the head left out when
    `avoid_head`. `nodes`: [{"node_id", "alive", "head"}]. Returns (placement, fell_back): fell_back is True
    when the head should be avoided but is the only node (a local cluster), so the shards run there."""
    alive = sorted((n for n in nodes if n.get("alive")), key=lambda n: n["node_id"])
    workers = [n["node_id"] for n in alive if not n.get("head")]
    if not avoid_head:
        return [None] * shards, False  # the caller spreads them (Ray's SPREAD strategy)
    if not workers:
        return [None] * shards, True
    return [workers[k % len(workers)] for k in range(shards)], False


class Admission:
    """Cluster-wide creation limits over all shards: max_sessions, the per-key cap and the per-key creation
    rate, from the shards' own counts at the moment of the creation (so nothing leaks when a shard loses its
    sessions or this object is rebuilt: only the rate buckets start afresh then). Same codes and messages as a
    one-shard store (SessionStore.create)."""

    def __init__(self, limits: LimitsConfig):
        self.limits = limits
        self.buckets: dict[str | None, TokenBucket] = {}

    def check(self, total: int, mine: int, owner: str | None, now: float) -> None:
        lim = self.limits
        if total >= lim.max_sessions:
            raise ServiceError(ErrorCode.SESSION_LIMIT,
                               f"server is at its limit of {lim.max_sessions} sessions; retry later")
        cap = lim.sessions_per_key
        if owner is not None and mine >= cap:
            raise ServiceError(ErrorCode.KEY_SESSION_LIMIT,
                               f"this key has {mine} open sessions (limit {cap}); delete or finish one first")
        per_min = lim.sessions_per_minute
        bucket = self.buckets.setdefault(owner, TokenBucket(rate=per_min / 60.0, burst=max(per_min, 1.0),
                                                            stamp=now))
        wait = bucket.take(1, now)
        if wait:
            raise ServiceError(ErrorCode.RATE_LIMITED,
                               f"too many sessions created (limit {per_min:g}/min); retry in {wait:.1f}s",
                               details={"retry_after_s": round(wait, 2)})


def merge_lists(parts: Sequence[dict]) -> dict:
    """One `list` answer from every shard's: sessions oldest first, counts summed (`shards`: per shard)."""
    sessions = sorted((s for p in parts for s in p["sessions"]), key=lambda s: s.get("created_at", 0.0))
    counts: dict[str, int] = {}
    for p in parts:
        for k, v in p["counts"].items():
            counts[k] = counts.get(k, 0) + v
    out = {**parts[0], "sessions": sessions, "counts": counts}
    if len(parts) > 1:
        out["shards"] = [p["counts"].get("total", 0) for p in parts]
    return out
