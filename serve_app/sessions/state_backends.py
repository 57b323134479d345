"""Where the session actor persists sessions: `memory` (nothing; lost with the actor), `journal` (files on the
actor's node, serve_app/sessions/session_journal.py; survives an actor restart on the same node) and `redis` (Redis or
Valkey; survives the node).

The actor keeps every session in memory (SessionStore) and calls a backend after each change; what the backend
holds is enough to rebuild the store (`load_all`) in a restarted actor on any node. The composite calls
(`accept`, `commit`, `commit_correction`) are what the actor uses: the journal runs them as ordered file writes,
Redis as one server-side script each, so a commit (record, dropped pending frames, snapshot, metadata) is
all-or-nothing and fenced by the worker epoch in the server.

Redis layout, per session (the `{sid}` hash tag keeps a session's keys in one Redis Cluster slot):
  <prefix>{sid}:meta     hash: json (meta_dict), epoch (the current worker's), rec_bytes (size of the stream)
  <prefix>{sid}:recs     stream: one entry per window record, id "<seq>-1", field r = journal_codec bytes
  <prefix>{sid}:pending  hash: frame index -> journal_codec bytes of an accepted, uncommitted frame
  <prefix>{sid}:state    string: journal_codec bytes of the latest snapshot (stream_state) without its items
  <prefix>{sid}:items    hash: the snapshot's incremental items (stream_state.split), field -> journal_codec
                         bytes, each written once by the commit that first carries it
  <prefix>{sid}:corr     string: the compacted correction messages (JSON)
Every key expires at the session's expiry plus a grace, refreshed on each write. Records are trimmed by the point
budget in memory; the stream is rewritten from memory once it holds more than twice what is live (like the
journal's compaction), so it stays bounded by about twice the session's point budget. No pickle anywhere.

Over 400 lines because the three backends share one interface and are easiest to compare side by side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from serve_app.sessions import journal_codec, stream_state
from serve_app.sessions import session_journal as sj
from serve_app.sessions.serial_io import SerialRunner
from serve_app.sessions.session_journal import SessionJournal
from serve_app.sessions.session_store import ResultRecord, Session

log = logging.getLogger("ray.serve.da3.sessions")

FENCED = -2  # a commit refused: the caller's epoch is not the session's current worker epoch


class StateBackend:
    """The persistence seam. Fine-grained writes plus the composite calls the actor makes (default: the
    fine-grained ones in a crash-safe order). Returns of commit calls: True stored, False fenced."""

    name = "base"

    def load_all(self) -> list[Session]:  # sync: called once in the actor's constructor, before any call
        raise NotImplementedError

    async def save_meta(self, s: Session) -> None:
        raise NotImplementedError

    async def save_pending(self, s: Session, index: int) -> None:
        raise NotImplementedError

    async def drop_pending(self, session_id: str, indices) -> None:
        raise NotImplementedError

    async def append_record(self, s: Session, rec: ResultRecord) -> None:
        raise NotImplementedError

    async def save_stream_state(self, s: Session) -> None:
        raise NotImplementedError

    async def save_corrections(self, s: Session) -> None:
        raise NotImplementedError

    async def delete(self, session_id: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    async def accept(self, s: Session, index: int) -> None:
        await self.save_pending(s, index)  # before the metadata: an unsaved acceptance ignores the frame
        await self.save_meta(s)

    async def commit(self, s: Session, rec: ResultRecord, indices, snapshot: bool, epoch: int | None) -> bool:
        await self.append_record(s, rec)  # first: a crash in between keeps (and then skips) the frames
        await self.drop_pending(s.session_id, indices)
        if snapshot:
            await self.save_stream_state(s)
        return True

    async def commit_correction(self, s: Session, epoch: int | None) -> bool:
        await self.save_corrections(s)  # first, like a window record: a crash in between keeps it
        await self.save_meta(s)
        return True


class JournalBackend(StateBackend):
    """Today's local files (session_actor.state_dir). What to write is taken on the actor's loop (metadata,
    references to the frame, record and snapshot, which the store never changes in place); encoding and file
    I/O run in `io_threads` threads, one call at a time per session and in call order (serial_io), so a slow
    disk stalls only that session's own writes, never the loop that answers every other call."""

    name = "journal"

    def __init__(self, state_dir: str, io_threads: int = 4):
        self.journal = SessionJournal(state_dir)
        self.io = SerialRunner(io_threads, "da3-journal")
        self._written: dict[str, int] = {}  # last record seq in each .rec file: a retried commit is not rewritten

    @property
    def compactions(self) -> int:
        return self.journal.compactions

    def load_all(self) -> list[Session]:
        out = self.journal.load_all()
        self._written = {s.session_id: s.records[-1].seq for s in out if s.records}
        return out

    async def accept(self, s: Session, index: int) -> None:
        sid = s.session_id
        await self.io.run(sid, self._accept_sync, sid, index, s.pending[index], sj.meta_dict(s))

    def _accept_sync(self, sid: str, index: int, payload, meta: dict) -> None:
        self.journal.write_pending(sid, index, payload)  # before the metadata: an unsaved acceptance ignores it
        self.journal.write_meta(sid, meta)

    async def commit(self, s: Session, rec: ResultRecord, indices, snapshot: bool, epoch: int | None) -> bool:
        sid = s.session_id
        if rec.seq <= self._written.get(sid, 0):
            return True
        self._written[sid] = rec.seq
        rec = ResultRecord(rec.seq, rec.window, rec.frames, rec.points, rec.colors, rec.epoch)  # as of now
        size = await self.io.run(sid, self._commit_sync, sid, rec, sj.meta_dict(s), list(indices), snapshot,
                                 s.stream_state if snapshot else None)
        if size > 2 * SessionJournal.live_bytes(s) + self.journal.compact_slack_bytes and sid in self._written:
            # Queued behind every write already asked for, from the records as they are now (which include
            # those writes' records): the rewritten file holds each live record once.
            live = [ResultRecord(r.seq, r.window, r.frames, r.points, r.colors, r.epoch) for r in s.records]
            await self.io.run(sid, self.journal.rewrite_records, sid, live)
        return True

    def _commit_sync(self, sid: str, rec: ResultRecord, meta: dict, indices: list, snapshot: bool, state) -> int:
        size = self.journal.write_record(sid, rec)  # first: a crash in between keeps (and then skips) the frames
        self.journal.write_meta(sid, meta)
        self.journal.drop_pending(sid, indices)
        if snapshot:
            self.journal.write_stream_state(sid, state)
        return size

    async def commit_correction(self, s: Session, epoch: int | None) -> bool:
        sid = s.session_id
        await self.io.run(sid, self._correction_sync, sid, sj.corrections_rows(s), sj.meta_dict(s))
        return True

    def _correction_sync(self, sid: str, rows: list, meta: dict) -> None:
        self.journal.write_corrections(sid, sj.corrections_json_of(rows))  # first, like a window record
        self.journal.write_meta(sid, meta)

    async def save_meta(self, s: Session) -> None:
        await self.io.run(s.session_id, self.journal.write_meta, s.session_id, sj.meta_dict(s))

    async def save_pending(self, s: Session, index: int) -> None:
        await self.io.run(s.session_id, self.journal.write_pending, s.session_id, index, s.pending[index])

    async def drop_pending(self, session_id: str, indices) -> None:
        await self.io.run(session_id, self.journal.drop_pending, session_id, list(indices))

    async def append_record(self, s: Session, rec: ResultRecord) -> None:
        rec = ResultRecord(rec.seq, rec.window, rec.frames, rec.points, rec.colors, rec.epoch)
        await self.io.run(s.session_id, self.journal.write_record, s.session_id, rec)

    async def save_stream_state(self, s: Session) -> None:
        await self.io.run(s.session_id, self.journal.write_stream_state, s.session_id, s.stream_state)

    async def save_corrections(self, s: Session) -> None:
        await self.io.run(s.session_id, self._write_corrections, s.session_id, sj.corrections_rows(s))

    def _write_corrections(self, sid: str, rows: list) -> None:
        self.journal.write_corrections(sid, sj.corrections_json_of(rows))

    async def delete(self, session_id: str) -> None:
        self._written.pop(session_id, None)
        await self.io.run(session_id, self.journal.delete, session_id)

    async def close(self) -> None:
        await asyncio.to_thread(self.io.close)


# KEYS: meta, pending, recs, state, corr. ARGV: meta json, meta epoch, expire-at, [pending index, frame bytes].
# A save never lowers the stored epoch: a stale actor instance (split brain) cannot undo a takeover.
_SAVE = """
local cur = redis.call('HGET', KEYS[1], 'epoch')
if cur and tonumber(ARGV[2]) < tonumber(cur) then return -2 end
redis.call('HSET', KEYS[1], 'json', ARGV[1], 'epoch', ARGV[2])
if ARGV[4] then redis.call('HSET', KEYS[2], ARGV[4], ARGV[5]) end
for i = 1, 6 do redis.call('EXPIREAT', KEYS[i], ARGV[3]) end
return 1
"""

# KEYS: meta, pending, recs, state, corr, items. ARGV: meta json, expire-at, fence epoch or '', record id or '',
# record bytes, '1' to set the snapshot, snapshot bytes, corrections JSON or '', live bytes, slack, then n and
# the n pending indices the record commits, then m and m (field, bytes) snapshot items to add, then the item
# fields to drop. Refused as a whole (-2) unless the fence epoch is the stored one;
# returns 2 when the stream holds more than twice what is live (the caller rewrites it), else 1.
_COMMIT = """
local cur = redis.call('HGET', KEYS[1], 'epoch')
if cur and ARGV[3] ~= '' and tonumber(ARGV[3]) ~= tonumber(cur) then return -2 end
if ARGV[4] ~= '' then
  -- an id at or below the stream's last: a retried commit whose record is stored already
  local added = redis.pcall('XADD', KEYS[3], ARGV[4], 'r', ARGV[5])
  if type(added) ~= 'table' or not added.err then
    redis.call('HINCRBY', KEYS[1], 'rec_bytes', string.len(ARGV[5]))
  end
end
local n = tonumber(ARGV[11])
for i = 12, 11 + n do redis.call('HDEL', KEYS[2], ARGV[i]) end
local j = 12 + n
local m = tonumber(ARGV[j])
for i = j + 1, j + 2 * m, 2 do redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1]) end
for i = j + 1 + 2 * m, #ARGV do redis.call('HDEL', KEYS[6], ARGV[i]) end
if ARGV[6] == '1' then redis.call('SET', KEYS[4], ARGV[7]) end
if ARGV[8] ~= '' then redis.call('SET', KEYS[5], ARGV[8]) end
redis.call('HSET', KEYS[1], 'json', ARGV[1])
if not cur and ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'epoch', ARGV[3]) end
for i = 1, 6 do redis.call('EXPIREAT', KEYS[i], ARGV[2]) end
local stored = tonumber(redis.call('HGET', KEYS[1], 'rec_bytes') or '0')
if stored > 2 * tonumber(ARGV[9]) + tonumber(ARGV[10]) then return 2 end
return 1
"""

# KEYS: meta, recs. ARGV: fence epoch or '', expire-at, then (id, bytes) pairs: the live records, in seq order.
_REWRITE = """
local cur = redis.call('HGET', KEYS[1], 'epoch')
if cur and ARGV[1] ~= '' and tonumber(ARGV[1]) ~= tonumber(cur) then return -2 end
redis.call('DEL', KEYS[2])
local total = 0
for i = 3, #ARGV, 2 do
  redis.call('XADD', KEYS[2], ARGV[i], 'r', ARGV[i + 1])
  total = total + string.len(ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'rec_bytes', total)
redis.call('EXPIREAT', KEYS[2], ARGV[2])
return 1
"""

_KINDS = ("meta", "pending", "recs", "state", "corr", "items")


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def record_bytes(rec: ResultRecord) -> bytes:
    return journal_codec.dumps(ResultRecord(rec.seq, rec.window, rec.frames, rec.points, rec.colors, rec.epoch))


def _commit_blobs(rec: ResultRecord | None, snapshot: bool, state, new_items: dict) -> tuple[bytes, bytes, list]:
    pairs: list[Any] = []
    for f, item in new_items.items():
        pairs += [f, journal_codec.dumps(item)]
    return (record_bytes(rec) if rec is not None else b"",
            journal_codec.dumps(state) if snapshot else b"", pairs)


def _stream_pairs(records: list[ResultRecord]) -> list:
    pairs: list[Any] = []
    for r in records:
        pairs += [f"{r.seq}-1", record_bytes(r)]
    return pairs


class RedisBackend(StateBackend):
    """Sessions in Redis/Valkey through the asyncio client: the actor's loop never waits on a socket."""

    name = "redis"

    def __init__(self, url: str, prefix: str, expiry_grace_s: float = 3600.0, timeout_s: float = 5.0,
                 compact_slack_bytes: int = 1 << 20, max_connections: int = 32, io_threads: int = 4):
        import redis.asyncio as aioredis  # only a redis deployment needs the client

        # Encoding frames, records and snapshots (journal_codec: ~1 ms per 100 kB) runs here, off the loop.
        self.pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="da3-redis-codec")

        self.url, self.prefix = url, prefix
        self.grace, self.timeout_s = expiry_grace_s, timeout_s
        self.compact_slack_bytes = compact_slack_bytes
        self.compactions = 0
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                                         socket_timeout=timeout_s,
                                                         socket_connect_timeout=timeout_s)
        self.client = aioredis.Redis(connection_pool=pool)
        self._save = self.client.register_script(_SAVE)
        self._commit = self.client.register_script(_COMMIT)
        self._rewrite = self.client.register_script(_REWRITE)
        self._items: dict[str, set[str]] = {}  # per session, the snapshot item fields the server holds
        self.items_written = 0
        # Writes of one session run one at a time, in call order: a later metadata write never lands first.
        self._locks: dict[str, asyncio.Lock] = {}

    def keys(self, session_id: str) -> list[str]:
        return [f"{self.prefix}{{{session_id}}}:{k}" for k in _KINDS]

    async def _encode(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _lock(self, session_id: str) -> asyncio.Lock:
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = asyncio.Lock()
        return lock

    def _expire_at(self, s: Session) -> int:
        return math.ceil(s.expires_at() + self.grace)

    @staticmethod
    def _meta_json(s: Session) -> str:
        return json.dumps(sj.meta_dict(s), separators=(",", ":"))

    # Fine-grained calls (each one script or command; the composite ones below are what the actor uses).
    async def save_meta(self, s: Session) -> None:
        async with self._lock(s.session_id):
            await self._save(keys=self.keys(s.session_id),
                             args=[self._meta_json(s), s.worker_epoch, self._expire_at(s)])

    async def save_pending(self, s: Session, index: int) -> None:
        await self.accept(s, index)

    async def accept(self, s: Session, index: int) -> None:
        # Taken now, on the loop; the lock (FIFO) is asked for before the first await, so the session's writes
        # reach the server in call order whatever the encoding takes.
        args = [self._meta_json(s), s.worker_epoch, self._expire_at(s), index]
        payload = s.pending[index]
        async with self._lock(s.session_id):
            blob = await self._encode(journal_codec.dumps, payload)
            await self._save(keys=self.keys(s.session_id), args=[*args, blob])

    async def drop_pending(self, session_id: str, indices) -> None:
        indices = [i for i in indices if i is not None]
        if indices:
            async with self._lock(session_id):
                await self.client.hdel(self.keys(session_id)[1], *indices)

    async def append_record(self, s: Session, rec: ResultRecord) -> None:
        await self._run_commit(s, rec, [], False, None, None)

    async def save_stream_state(self, s: Session) -> None:
        await self._run_commit(s, None, [], True, None, None)

    async def save_corrections(self, s: Session) -> None:
        await self._run_commit(s, None, [], False, None, sj.corrections_json(s))

    async def commit(self, s: Session, rec: ResultRecord, indices, snapshot: bool, epoch: int | None) -> bool:
        return await self._run_commit(s, rec, indices, snapshot, epoch, None)

    async def commit_correction(self, s: Session, epoch: int | None) -> bool:
        return await self._run_commit(s, None, [], False, epoch, sj.corrections_json(s))

    async def _run_commit(self, s: Session, rec: ResultRecord | None, indices, snapshot: bool,
                          epoch: int | None, corr: str | None) -> bool:
        sid = s.session_id
        if rec is not None:
            rec = ResultRecord(rec.seq, rec.window, rec.frames, rec.points, rec.colors, rec.epoch)  # as of now
        state_obj, kept = stream_state.split(s.stream_state) if snapshot else (None, {})
        live = SessionJournal.live_bytes(s)
        fence = "" if epoch is None else epoch
        meta, expire = self._meta_json(s), self._expire_at(s)
        pend = [i for i in indices if i is not None]
        rest = [corr or "", live, self.compact_slack_bytes, len(pend), *pend]
        async with self._lock(sid):
            have = self._items.get(sid, set())
            want = {stream_state.item_field(k): v for k, v in kept.items()} if snapshot else {}
            new = {f: v for f, v in want.items() if f not in have}
            drop = sorted(have - want.keys()) if snapshot else []
            blob, state, pairs = await self._encode(_commit_blobs, rec, snapshot, state_obj, new)
            args = [meta, expire, fence, f"{rec.seq}-1" if rec is not None else "", blob,
                    "1" if snapshot else "0", state, *rest, len(new), *pairs, *drop]
            try:
                res = int(await self._commit(keys=self.keys(sid), args=args))
            except Exception:
                self._items.pop(sid, None)  # unknown whether it ran: the next snapshot sends every item again
                raise
            if res != FENCED and snapshot:
                self._items[sid] = set(want)
                self.items_written += len(new)
            if res == FENCED:
                log.warning("commit refused by the store: stale epoch %s", epoch, extra={"session_id": sid})
                return False
            if res == 2:
                await self._compact(s, fence)
        return True

    async def _compact(self, s: Session, fence) -> None:
        """Rewrite the session's stream from the records in memory (already trimmed by the point budget)."""
        pairs: list[Any] = await self._encode(
            _stream_pairs, [ResultRecord(r.seq, r.window, r.frames, r.points, r.colors, r.epoch) for r in s.records])
        k = self.keys(s.session_id)
        if int(await self._rewrite(keys=[k[0], k[2]], args=[fence, self._expire_at(s), *pairs])) == 1:
            self.compactions += 1

    async def delete(self, session_id: str) -> None:
        async with self._lock(session_id):
            await self.client.delete(*self.keys(session_id))
        self._locks.pop(session_id, None)
        self._items.pop(session_id, None)

    async def close(self) -> None:
        await self.client.aclose()
        self.pool.shutdown(wait=False)

    def load_all(self) -> list[Session]:
        """Every session under the prefix, with a blocking client: the actor's constructor runs before its loop
        serves anything. Unreadable parts are skipped like the journal's torn files."""
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=max(self.timeout_s, 30.0),
                                      socket_connect_timeout=self.timeout_s)
        out = []
        try:
            for key in client.scan_iter(match=_glob_escape(self.prefix) + "{*}:meta", count=500):
                key = key.decode()
                sid = key[len(self.prefix) + 1:-len("}:meta")]
                s = self._load_one(client, sid)
                if s is not None:
                    out.append(s)
        finally:
            client.close()
        return out

    def _load_one(self, client, sid: str) -> Session | None:
        k_meta, k_pending, k_recs, k_state, k_corr, k_items = self.keys(sid)
        raw = client.hget(k_meta, "json")
        try:
            s = sj.session_from_meta(json.loads(raw))
        except Exception:  # noqa: BLE001 - torn or foreign: skipped, its session is SESSION_LOST
            return None
        if s.session_id != sid:
            return None
        for _id, fields in client.xrange(k_recs):
            try:
                rec = journal_codec.loads(fields[b"r"])
            except (journal_codec.CodecError, KeyError):
                continue
            if isinstance(rec, ResultRecord) and rec.seq <= s.last_seq:
                s.records.append(rec)
                s.frames.extend(rec.frames)
        committed = {f.get("index") for f in s.frames}
        for idx, blob in client.hgetall(k_pending).items():
            try:
                index = int(idx)
            except ValueError:
                continue
            if index in committed or index >= s.frames_received:
                continue
            try:
                s.pending[index] = journal_codec.loads(blob)
            except journal_codec.CodecError:
                continue
        corr = client.get(k_corr)
        if corr:
            sj.apply_corrections(s, corr)
        state = client.get(k_state)
        if state:
            try:
                base = journal_codec.loads(state)
            except journal_codec.CodecError:
                base = None
            held = {}
            for f, blob in client.hgetall(k_items).items():
                try:
                    held[stream_state.item_key(f)] = journal_codec.loads(blob)
                except (journal_codec.CodecError, ValueError):  # a torn item: that keyframe is missing
                    continue
            s.stream_state = stream_state.join(base, held)
            self._items[sid] = {stream_state.item_field(k) for k in held}
        return s


def redis_url(cfg: dict) -> str:
    url = cfg.get("redis_url") or os.environ.get(cfg.get("redis_url_env") or "DA3_REDIS_URL")
    if not url:
        raise ValueError(f"session_actor.backend redis needs session_actor.redis_url or ${cfg.get('redis_url_env')}")
    return url


def make_backend(cfg: dict) -> StateBackend | None:
    """The backend a SessionActorConfig (as a dict) asks for; None for memory."""
    kind = cfg.get("backend") or ("journal" if cfg.get("state_dir") else "memory")
    if kind == "memory":
        return None
    threads = cfg.get("io_threads", 4)
    if kind == "journal":
        return JournalBackend(cfg["state_dir"], io_threads=threads)
    if kind == "redis":
        prefix = cfg.get("redis_prefix") or f"da3:{cfg.get('namespace', 'da3-serve')}/{cfg.get('name', 'sessions')}:"
        return RedisBackend(redis_url(cfg), prefix, expiry_grace_s=cfg.get("redis_expiry_grace_s", 3600.0),
                            timeout_s=cfg.get("redis_timeout_s", 5.0), io_threads=threads)
    raise ValueError(f"unknown session_actor.backend {kind!r}")
