"""The session actor's state backends (serve_app/sessions/state_backends.py) against a real redis-server (conftest's
`redis_url`) and the local journal: round trips, server-side epoch fencing, TTLs, compaction, and an actor
restart that reloads everything. No Ray: SessionActor is driven as a plain object on an event loop."""

from __future__ import annotations

import asyncio
import time
import uuid

import numpy as np
import pytest
import redis

from serve_app.config import LimitsConfig, SessionActorConfig, SessionParams
from serve_app.deployments.session_actor import SessionActor
from serve_app.recon import corrections as C
from serve_app.recon.geometry import Sim3
from serve_app.recon.reconstruction import FrameInput
from serve_app.sessions.replies import CommitStatus
from serve_app.sessions.session_store import SessionStore
from serve_app.sessions.state_backends import RedisBackend, make_backend
from serve_app.sessions.stream_state import INCREMENTAL
from serve_app.sessions.stream_state import items as stream_items

LIMITS = LimitsConfig(max_in_flight=64).model_dump()


def _frame(i: int) -> FrameInput:
    return FrameInput(index=i, frame_id=f"f{i}", image=None, original_size=(28, 14), timestamp=0.5 * i,
                      intrinsics=np.eye(3, dtype=np.float32), pose=None, encoded=b"\xff\xd8jpeg%d" % i)


def _points(i: int, n: int):
    return np.full((n, 3), i, np.float32), np.full((n, 3), i % 255, np.uint8)


def _item(i: int) -> dict:  # like a carried loop keyframe: large, made once
    return {"jpeg": bytes([i % 251]) * 20_000, "pose": np.eye(4) * i}


def _snapshot(i: int) -> dict:
    """A worker snapshot; it carries the last three windows' items incrementally (only window i's is new)."""
    return {"windows_integrated": i, "last_keyframe": (np.eye(4) * i, np.float32(0.5)), "keyframes": [i],
            INCREMENTAL: {"keep": list(range(max(0, i - 2), i + 1)), "new": {i: _item(i)}}}


def _correction(windows, version: int) -> dict:
    rng = np.random.default_rng(version)
    tf = {w: Sim3(float(1 + 0.01 * rng.random()), np.eye(3), rng.normal(size=3)) for w in windows}
    return C.to_message(C.Correction(version, tf))


def _backend_cfg(kind: str, redis_url: str, tmp_path) -> dict:
    name = f"t_{uuid.uuid4().hex[:8]}"  # own key prefix per test: one Redis serves them all
    if kind == "redis":
        return {"backend": "redis", "redis_url": redis_url, "name": name, "namespace": "tests"}
    return {"backend": "journal", "state_dir": str(tmp_path / name)}


async def _stream(actor: SessionActor, n_windows: int, per_window: int = 2, points: int = 50,
                  params: dict | None = None):
    """Create a session, take it as a worker, then accept/commit windows; leaves 3 frames accepted but
    uncommitted and one correction committed."""
    info = await actor.create(params or {}, "alice")
    sid = info["session_id"]
    epoch = (await actor.take_worker(sid)).epoch
    idx = 0
    for w in range(n_windows):
        frames = []
        for _ in range(per_window):
            i = await actor.accept_frame(sid, "alice", epoch, _frame(idx))
            frames.append({"index": i, "frame_id": f"f{i}", "pose": np.eye(4).tolist()})
            idx += 1
        pts, cols = _points(w, points)
        seq = (await actor.commit_window(sid, {"window": w}, frames, pts, cols, _snapshot(w), epoch=epoch)).seq
        assert seq > 0
    seq = (await actor.commit_correction(sid, _correction(range(n_windows), 1), epoch=epoch)).seq
    assert seq > 0
    for _ in range(3):
        await actor.accept_frame(sid, "alice", epoch, _frame(idx))
        idx += 1
    return sid, epoch


def _same_session(a, b) -> None:
    for k in ("session_id", "owner", "state", "frames_received", "frames_processed", "windows", "last_seq",
              "points_total", "worker_epoch", "correction_version", "created_at"):
        assert getattr(a, k) == getattr(b, k), k
    assert a.params == b.params
    assert [r.seq for r in a.records] == [r.seq for r in b.records]
    for ra, rb in zip(a.records, b.records, strict=True):
        np.testing.assert_array_equal(ra.points, rb.points)
        np.testing.assert_array_equal(ra.colors, rb.colors)
        assert ra.window == rb.window and ra.frames == rb.frames and ra.epoch == rb.epoch
    assert a.frames == b.frames
    assert sorted(a.pending) == sorted(b.pending)
    for i, f in a.pending.items():
        g = b.pending[i]
        assert (f.index, f.frame_id, f.encoded, f.original_size) == (g.index, g.frame_id, g.encoded, g.original_size)
    assert [c.message for c in a.corrections] == [c.message for c in b.corrections]
    assert sorted(a.transforms) == sorted(b.transforms)
    sa, sb = a.stream_state, b.stream_state
    assert sa["windows_integrated"] == sb["windows_integrated"] and sa["keyframes"] == sb["keyframes"]
    np.testing.assert_array_equal(sa["last_keyframe"][0], sb["last_keyframe"][0])
    ia, ib = stream_items(sa), stream_items(sb)
    assert list(ia) == list(ib) and ia
    for k in ia:
        assert ia[k]["jpeg"] == ib[k]["jpeg"]
        np.testing.assert_array_equal(ia[k]["pose"], ib[k]["pose"])


@pytest.mark.parametrize("kind", ["redis", "journal"])
def test_actor_restart_reloads_every_stored_kind(kind, redis_url, tmp_path):
    """Metadata, window records, accepted-but-uncommitted frames, the snapshot and corrections all come back in
    a new actor (a restart, possibly on another node for redis), identical to what the old one held."""
    cfg = _backend_cfg(kind, redis_url, tmp_path)

    async def run():
        actor = SessionActor(LIMITS, None, backend=cfg)
        sid, _ = await _stream(actor, n_windows=5)
        other, _ = await _stream(actor, n_windows=1)
        gone, _ = await _stream(actor, n_windows=1)
        await actor.delete(gone, "alice")
        await actor.set_state(other, "complete")
        return actor, sid, other, gone

    actor, sid, other, _gone = asyncio.run(run())
    assert len(actor.store.sessions[sid].pending) == 3
    again = SessionActor(LIMITS, None, backend=cfg)  # the restarted actor: loads in its constructor
    assert set(again.store.sessions) == {sid, other}
    _same_session(actor.store.sessions[sid], again.store.sessions[sid])
    assert again.store.sessions[other].state == "complete"

    async def resume():  # a new worker takes over with what was stored and carries on
        took = await again.take_worker(sid)
        assert took.epoch == actor.store.sessions[sid].worker_epoch + 1
        assert [f.index for f in took.pending] == sorted(actor.store.sessions[sid].pending)
        assert took.stream_state["windows_integrated"] == 4
        frames = [{"index": f.index, "frame_id": f.frame_id} for f in took.pending]
        reply = await again.commit_window(sid, {"window": 5}, frames, *_points(5, 50), _snapshot(5),
                                          epoch=took.epoch)
        return reply.seq

    seq = asyncio.run(resume())
    assert seq == actor.store.sessions[sid].last_seq + 1
    third = SessionActor(LIMITS, None, backend=cfg)
    s = third.store.sessions[sid]
    assert s.pending == {} and s.frames_processed == 13 and s.last_seq == seq


def test_stale_epoch_is_refused_atomically_in_the_server(redis_url, tmp_path):
    """Two actor instances over one Redis (a split brain: the old one still runs after the restart took the
    session over). The old one's commit passes its own in-memory check but the server refuses it as a whole:
    no record, no dropped pending frame, no snapshot or metadata change."""
    cfg = _backend_cfg("redis", redis_url, tmp_path)

    async def run():
        old = SessionActor(LIMITS, None, backend=cfg)
        sid, epoch = await _stream(old, n_windows=2)
        new = SessionActor(LIMITS, None, backend=cfg)
        await new.take_worker(sid)  # epoch + 1 stored in Redis
        backend: RedisBackend = new.backend
        r = redis.Redis.from_url(redis_url)
        k = backend.keys(sid)
        before = (r.xlen(k[2]), r.hgetall(k[1]), r.get(k[3]), r.hgetall(k[0]), r.get(k[4]))
        pending = sorted(old.store.sessions[sid].pending)
        frames = [{"index": i, "frame_id": f"f{i}"} for i in pending]
        stale = await old.commit_window(sid, {"window": 9}, frames, *_points(9, 10), _snapshot(9), epoch=epoch)
        stale_corr = await old.commit_correction(sid, _correction([0], 7), epoch=epoch)
        after = (r.xlen(k[2]), r.hgetall(k[1]), r.get(k[3]), r.hgetall(k[0]), r.get(k[4]))
        # the old instance also cannot roll the stored epoch back with a plain metadata save
        await old.backend.save_meta(old.store.sessions[sid])
        epoch_after = int(r.hget(k[0], "epoch"))
        fresh = await new.commit_window(sid, {"window": 2}, frames, *_points(2, 10), _snapshot(2),
                                        epoch=epoch + 1)
        r.close()
        return stale, stale_corr, before, after, epoch_after, fresh, epoch

    stale, stale_corr, before, after, epoch_after, fresh, epoch = asyncio.run(run())
    assert stale.status is stale_corr.status is CommitStatus.FENCED
    assert after == before
    assert epoch_after == epoch + 1
    assert fresh.stored and fresh.seq > 0


def test_keys_expire_with_the_session(redis_url, tmp_path):
    """Every key of a session expires at the session's expiry plus the grace; the sweep deletes them all."""
    cfg = {**_backend_cfg("redis", redis_url, tmp_path), "redis_expiry_grace_s": 30}
    r = redis.Redis.from_url(redis_url)

    async def run():
        actor = SessionActor(LIMITS, None, backend=cfg)
        sid, _ = await _stream(actor, n_windows=2, params={"ttl_s": 600, "idle_ttl_s": 120})
        s = actor.store.sessions[sid]
        expected = s.expires_at() + 30 - time.time()
        ttls = {key: r.ttl(key) for key in actor.backend.keys(sid)}
        s.updated_at -= 10_000  # idle long ago: the next sweep expires it
        gone = await actor.sweep()
        return actor, sid, expected, ttls, gone

    actor, sid, expected, ttls, gone = asyncio.run(run())
    for key, ttl in ttls.items():
        assert abs(ttl - expected) <= 3, (key, ttl, expected)
    assert gone == [sid]
    assert r.exists(*actor.backend.keys(sid)) == 0
    r.close()


def test_redis_records_are_compacted_to_the_point_budget(redis_url, tmp_path):
    """60 windows of 500 points with a budget of 1000: the stream stays near twice what is live, and a reload
    gives exactly the map in memory."""
    cfg = _backend_cfg("redis", redis_url, tmp_path)

    async def run():
        backend = make_backend(cfg)
        backend.compact_slack_bytes = 0
        store = SessionStore(LimitsConfig())
        s = store.create(SessionParams(max_points=1000), None, time.time())
        await backend.save_meta(s)
        r = redis.Redis.from_url(redis_url)
        sizes = []
        for i in range(60):
            pts, cols = _points(i, 500)
            rec = store.commit_window(s.session_id, {"window": i}, [{"index": i, "frame_id": i}], pts, cols,
                                      {"windows_integrated": i + 1}, time.time())
            assert await backend.commit(s, rec, [i], True, None)
            sizes.append(int(r.hget(backend.keys(s.session_id)[0], "rec_bytes")))
        r.close()
        await backend.close()
        return backend, store, s, sizes

    backend, store, s, sizes = asyncio.run(run())
    assert s.points_total == 1000 and backend.compactions > 0
    live = sum(r.points.nbytes + r.colors.nbytes + 2048 for r in s.records)
    assert max(sizes) <= 2 * live + sizes[0]
    assert sizes[-1] < 60 * 500 * 15 / 4
    restored = SessionStore(LimitsConfig())
    restored.restore(make_backend(cfg).load_all())
    r = restored.sessions[s.session_id]
    assert r.points_total == 1000 and r.last_seq == 60 and len(r.frames) == 60
    assert r.stream_state == {"windows_integrated": 60}
    for a, b in zip(restored.point_cloud(s.session_id, None), store.point_cloud(s.session_id, None), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["redis", "journal"])
def test_retried_calls_are_not_applied_twice(kind, redis_url, tmp_path):
    """Ray retries an actor call (max_task_retries) when the actor died before answering, possibly after it had
    stored the result: a retried accept or commit returns what is stored and writes nothing new."""
    cfg = _backend_cfg(kind, redis_url, tmp_path)

    async def run():
        actor = SessionActor(LIMITS, None, backend=cfg)
        sid = (await actor.create({}, None))["session_id"]
        epoch = (await actor.take_worker(sid)).epoch
        a = await actor.accept_frame(sid, None, epoch, _frame(0), index=0)
        again = await actor.accept_frame(sid, None, epoch, _frame(0), index=0)
        frames = [{"index": 0, "frame_id": "f0"}]
        first = await actor.commit_window(sid, {"window": 0}, frames, *_points(0, 20), _snapshot(0), epoch=epoch)
        retry = await actor.commit_window(sid, {"window": 0}, frames, *_points(0, 20), _snapshot(0), epoch=epoch)
        return actor, sid, (a, again), (first, retry)

    actor, sid, accepts, commits = asyncio.run(run())
    assert accepts == (0, 0) and commits[0] == commits[1]
    s = actor.store.sessions[sid]
    assert (s.frames_received, s.frames_processed, s.windows, len(s.records)) == (1, 1, 1, 1)
    reloaded = SessionActor(LIMITS, None, backend=cfg).store.sessions[sid]
    assert [r.seq for r in reloaded.records] == [commits[0].seq] and reloaded.frames_processed == 1


@pytest.mark.parametrize("kind", ["redis", "journal"])
def test_snapshot_items_are_written_once_not_with_every_commit(kind, redis_url, tmp_path):
    """A snapshot's incremental items (the carried loop keyframes) are stored apart, each written by the commit
    that first carries it and removed when no snapshot keeps it: 12 commits write 12 items (not the 33 kept
    copies), the stored snapshot stays small, and a restart restores exactly the kept items."""
    cfg = _backend_cfg(kind, redis_url, tmp_path)

    async def run():
        actor = SessionActor(LIMITS, None, backend=cfg)
        sid, _ = await _stream(actor, n_windows=12)
        return actor, sid

    actor, sid = asyncio.run(run())
    assert actor.backend.journal.items_written == 12 if kind == "journal" else actor.backend.items_written == 12
    if kind == "redis":
        r = redis.Redis.from_url(redis_url)
        keys = actor.backend.keys(sid)
        state_bytes, fields = r.strlen(keys[3]), sorted(int(f) for f in r.hkeys(keys[5]))
        r.close()
    else:
        state_bytes = (tmp_path / cfg["state_dir"] / f"{sid}.state").stat().st_size
        fields = sorted(int(bytes.fromhex(p.stem).decode())
                        for p in (tmp_path / cfg["state_dir"] / f"{sid}.items").glob("*.bin"))
    assert fields == [9, 10, 11]  # the kept ones only
    assert state_bytes < 5_000  # the three kept items are 60 kB
    again = SessionActor(LIMITS, None, backend=cfg)
    _same_session(actor.store.sessions[sid], again.store.sessions[sid])
    assert list(stream_items(again.store.sessions[sid].stream_state)) == [9, 10, 11]


def test_backend_config():
    assert SessionActorConfig().effective_backend == "memory"
    assert SessionActorConfig(state_dir="/tmp/x").effective_backend == "journal"
    assert SessionActorConfig(backend="redis", redis_url="redis://h:1").effective_backend == "redis"
    with pytest.raises(ValueError, match="state_dir"):
        SessionActorConfig(backend="journal")
    assert make_backend(SessionActorConfig().model_dump()) is None
    with pytest.raises(ValueError, match="redis_url"):
        make_backend({**SessionActorConfig(backend="redis").model_dump(), "redis_url_env": "DA3_NO_SUCH_VAR"})


# --- the app on a real Ray Serve with backend redis -----------------------------------------------------------

async def _stream_frames(client, sid, seq, ids, sent_half: asyncio.Event, go_on: asyncio.Event):
    async with client.stream(sid, backoff_s=0.2, max_reconnects=20) as s:
        half = len(ids) // 2
        for i in ids[:half]:
            await s.send_frame(seq.images[i], frame_id=i)
        await s.flush()
        sent_half.set()
        await go_on.wait()
        for i in ids[half:]:
            await s.send_frame(seq.images[i], frame_id=i)
        summary = await s.finalize(timeout=240)
        return s, summary


@pytest.mark.ray
async def test_session_actor_killed_mid_stream_with_redis_loses_nothing(redis_app, synthetic_seq):
    """Two live streams; the session actor is killed while frames are in flight (Ray restarts it, it reloads
    from Redis). Every frame is processed exactly once, the streams resume, nothing is SESSION_LOST, and the
    maps equal an undisturbed run of the same frames."""
    import ray
    from da3_client import Da3Client

    url, args = redis_app
    ids = list(range(12))
    async with Da3Client(url) as client:
        base_sid = (await client.create_session())["session_id"]
        ev_a, ev_b = asyncio.Event(), asyncio.Event()
        ev_b.set()
        base, base_summary = await _stream_frames(client, base_sid, synthetic_seq, ids, ev_a, ev_b)

        sids = [(await client.create_session())["session_id"] for _ in range(2)]
        halves = [asyncio.Event() for _ in sids]
        go_on = asyncio.Event()
        tasks = [asyncio.create_task(_stream_frames(client, sid, synthetic_seq, ids, h, go_on))
                 for sid, h in zip(sids, halves, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(h.wait() for h in halves)), 120)
        actor = ray.get_actor(args["session_actor"]["name"], namespace=args["session_actor"]["namespace"])
        ray.kill(actor, no_restart=False)  # frames of the first half may still be in flight
        go_on.set()
        done = await asyncio.wait_for(asyncio.gather(*tasks), 300)

    assert base_summary["frames_processed"] == len(ids)
    for s, summary in done:
        assert summary["frames_processed"] == len(ids) and summary["state"] == "complete"
        assert not [e for e in s.errors if e.get("code") == "SESSION_LOST"], s.errors
        assert s.frames_acked == len(ids)
        rec = s.reconstruction
        assert sorted(rec.frames) == ids
        assert len(rec.points()) == len(base.reconstruction.points())
        np.testing.assert_allclose(np.sort(rec.points(), axis=0), np.sort(base.reconstruction.points(), axis=0),
                                   atol=1e-3)
