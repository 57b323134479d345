import numpy as np
import pytest

from serve_app.config import LimitsConfig, SessionParams
from serve_app.errors import ErrorCode, ServiceError
from serve_app.sessions.session_store import SessionStore, owner_of


def _store(**limits):
    return SessionStore(LimitsConfig(**limits))


def _commit(store, sid, n_points, now, frames=1):
    pts = np.random.default_rng(0).normal(size=(n_points, 3)).astype(np.float32)
    cols = np.zeros((n_points, 3), np.uint8)
    fr = [{"frame_id": i, "index": i, "pose": np.eye(4).tolist()} for i in range(frames)]
    return store.commit_window(sid, {"window": 0}, fr, pts, cols, None, now)


def test_ids_are_unguessable_and_unique():
    st = _store(max_sessions_per_key=100, sessions_per_minute=1000)
    ids = {st.create(SessionParams(), None, 0.0).session_id for _ in range(50)}
    assert len(ids) == 50 and all(len(i) >= 24 for i in ids)


def test_session_limit():
    st = _store(max_sessions=2)
    st.create(SessionParams(), None, 0)
    st.create(SessionParams(), None, 0)
    with pytest.raises(ServiceError) as ei:
        st.create(SessionParams(), None, 0)
    assert ei.value.code is ErrorCode.SESSION_LIMIT


def test_owner_isolation_looks_like_not_found():
    st = _store()
    s = st.create(SessionParams(), owner_of("alice"), 0)
    assert st.get(s.session_id, owner_of("alice")) is s
    with pytest.raises(ServiceError) as ei:
        st.get(s.session_id, owner_of("bob"))
    assert ei.value.code is ErrorCode.SESSION_NOT_FOUND
    with pytest.raises(ServiceError):
        st.get(s.session_id, None)
    assert st.list(owner_of("bob")) == [] and st.list(owner_of("alice")) == [s]
    assert owner_of("alice") != "alice"


def test_frame_acceptance_rules_and_states():
    st = _store()
    s = st.create(SessionParams(max_frames=3), None, 0)
    assert s.state == "created"
    assert st.accept_frames(s.session_id, 2, 1.0) == 0
    assert s.state == "streaming" and s.frames_received == 2
    with pytest.raises(ServiceError) as ei:
        st.accept_frames(s.session_id, 2, 1.0)
    assert ei.value.code is ErrorCode.FRAME_LIMIT_EXCEEDED and s.frames_received == 2
    st.set_state(s.session_id, "finalizing", 2.0)
    with pytest.raises(ServiceError) as ei:
        st.accept_frames(s.session_id, 1, 2.0)
    assert ei.value.code is ErrorCode.SESSION_FINALIZED
    st.set_state(s.session_id, "complete", 3.0)
    with pytest.raises(ServiceError):
        st.set_state(s.session_id, "streaming", 4.0)


def test_records_sequence_and_replay():
    st = _store()
    s = st.create(SessionParams(), None, 0)
    seqs = [_commit(st, s.session_id, 10, 1.0, frames=2).seq for _ in range(3)]
    assert seqs == [1, 2, 3]
    assert [r.seq for r in st.records_after(s.session_id, 1)] == [2, 3]
    assert s.frames_processed == 6 and s.points_total == 30
    assert all(f["seq"] in (1, 2, 3) for f in s.frames)
    pts, cols = st.point_cloud(s.session_id, None)
    assert pts.shape == (30, 3) and cols.dtype == np.uint8


def test_point_budget_evicts_oldest_first():
    st = _store()
    s = st.create(SessionParams(max_points=1000), None, 0)
    first = _commit(st, s.session_id, 800, 1.0)
    kept_tail = first.points[-300:].copy()
    _commit(st, s.session_id, 700, 2.0)
    assert s.points_total == 1000
    pts, _ = st.point_cloud(s.session_id, None)
    assert len(pts) == 1000
    np.testing.assert_array_equal(pts[:300], kept_tail)  # the oldest 500 went first
    assert s.memory_bytes() == 1000 * 15


def test_idle_and_absolute_expiry_with_tombstone():
    st = _store(expired_tombstone_s=100)
    idle = st.create(SessionParams(idle_ttl_s=10, ttl_s=1000), None, 0)
    old = st.create(SessionParams(idle_ttl_s=1000, ttl_s=50), None, 0)
    busy = st.create(SessionParams(idle_ttl_s=10, ttl_s=1000), None, 0)
    st.touch(busy.session_id, 5)
    assert st.sweep(9.9) == []
    assert st.sweep(10.0) == [idle.session_id]
    for t in range(15, 50, 5):  # activity keeps a session alive past its idle TTL
        st.touch(busy.session_id, t)
        assert st.sweep(t + 0.5) == []
    assert st.sweep(50.0) == [old.session_id]
    with pytest.raises(ServiceError) as ei:
        st.get(idle.session_id)
    assert ei.value.code is ErrorCode.SESSION_EXPIRED
    assert st.get(busy.session_id) is busy
    st.sweep(200.0)  # tombstones age out; busy expired too by now
    with pytest.raises(ServiceError) as ei:
        st.get(idle.session_id)
    assert ei.value.code is ErrorCode.SESSION_NOT_FOUND


def test_newest_connection_takes_over():
    st = _store()
    s = st.create(SessionParams(), None, 0)
    assert st.attach(s.session_id, "a") is None
    assert st.attach(s.session_id, "b") == "a"
    st.detach(s.session_id, "a")  # stale detach must not drop the new holder
    assert s.connection_id == "b"
    st.detach(s.session_id, "b")
    assert s.connection_id is None


def test_per_key_session_cap_and_creation_rate():
    st = _store(max_sessions_per_key=2, sessions_per_minute=3)
    a, b = owner_of("a"), owner_of("b")
    st.create(SessionParams(), a, 0)
    st.create(SessionParams(), a, 0)
    with pytest.raises(ServiceError) as ei:
        st.create(SessionParams(), a, 0)
    assert ei.value.code is ErrorCode.KEY_SESSION_LIMIT
    st.create(SessionParams(), b, 0)  # another key is unaffected
    for sid in [s.session_id for s in st.list(a)]:
        st.delete(sid, a)
    st.create(SessionParams(), a, 1)  # third creation within the minute: still in the burst of 3
    st.delete(st.list(a)[0].session_id, a)
    with pytest.raises(ServiceError) as ei:
        st.create(SessionParams(), a, 2)
    assert ei.value.code is ErrorCode.RATE_LIMITED and ei.value.details["retry_after_s"] > 0
    st.create(SessionParams(), a, 2 + 20.5)  # one token refills every 20 s at 3/min


def test_token_bucket():
    from serve_app.limits import TokenBucket

    tb = TokenBucket(rate=10, burst=20)
    assert tb.take(20, 0) == 0
    assert tb.take(5, 0) == pytest.approx(0.5)
    assert tb.take(5, 0.5) == 0
    assert tb.take(1000, 0.5) > 90


def test_accepted_frames_are_kept_until_a_window_commits_them():
    st = _store(max_in_flight=3)
    sid = st.create(SessionParams(), None, 0).session_id
    epoch = st.take_worker(sid)
    assert [st.accept_frames(sid, 1, 1.0, payloads=[f"frame{i}"], epoch=epoch) for i in range(3)] == [0, 1, 2]
    with pytest.raises(ServiceError) as ei:  # the store enforces the in-flight cap itself
        st.accept_frames(sid, 1, 1.0, payloads=["frame3"], epoch=epoch)
    assert ei.value.code is ErrorCode.QUEUE_FULL and st.sessions[sid].frames_received == 3
    _commit(st, sid, 5, 2.0, frames=2)  # frames 0 and 1
    assert st.sessions[sid].pending == {2: "frame2"}
    assert st.sessions[sid].info()["pending_frames"] == 1


def test_takeover_fences_the_previous_worker():
    st = _store()
    sid = st.create(SessionParams(), None, 0).session_id
    old = st.take_worker(sid)
    st.accept_frames(sid, 1, 1.0, payloads=["a"], epoch=old)
    new = st.take_worker(sid)
    assert new == old + 1 and st.is_current_worker(sid, new) and not st.is_current_worker(sid, old)
    with pytest.raises(ServiceError) as ei:
        st.accept_frames(sid, 1, 1.0, payloads=["b"], epoch=old)
    assert ei.value.code is ErrorCode.SESSION_BUSY and ei.value.fatal
    assert st.accept_frames(sid, 1, 1.0, payloads=["b"], epoch=new) == 1
    assert st.sessions[sid].pending == {0: "a", 1: "b"}  # the new worker inherits everything accepted


def test_a_worker_numbered_frame_must_be_the_next_index():
    """The worker numbers frames itself (so it can plan before the store answers); the store checks the number,
    and a state or limit refusal is reported as itself, not as an index mismatch."""
    st = _store()
    sid = st.create(SessionParams(max_frames=3), None, 0).session_id
    epoch = st.take_worker(sid)
    assert st.accept_frames(sid, 1, 1.0, payloads=["a"], epoch=epoch, index=0) == 0
    with pytest.raises(ServiceError) as ei:  # another writer got there first
        st.accept_frames(sid, 1, 1.0, payloads=["b"], epoch=epoch, index=0)
    assert ei.value.code is ErrorCode.SESSION_BUSY and ei.value.fatal and "out of step" in ei.value.message
    assert st.sessions[sid].frames_received == 1 and st.sessions[sid].pending == {0: "a"}
    assert st.accept_frames(sid, 1, 1.0, payloads=["b"], epoch=epoch, index=1) == 1
    st.accept_frames(sid, 1, 1.0, payloads=["c"], epoch=epoch, index=2)
    with pytest.raises(ServiceError) as ei:
        st.accept_frames(sid, 1, 1.0, payloads=["d"], epoch=epoch, index=7)
    assert ei.value.code is ErrorCode.FRAME_LIMIT_EXCEEDED


def test_journal_keeps_pending_frames_and_epoch(tmp_path):
    from serve_app.sessions.session_journal import SessionJournal

    st = _store()
    j = SessionJournal(tmp_path)
    s = st.create(SessionParams(), None, 0)
    epoch = st.take_worker(s.session_id)
    for i in range(3):
        index = st.accept_frames(s.session_id, 1, 1.0, payloads=[{"frame": i}], epoch=epoch)
        j.save_pending(s, index)
        j.save_meta(s)
    rec = _commit(st, s.session_id, 5, 2.0, frames=2)
    j.append_record(s, rec)
    j.drop_pending(s.session_id, [0, 1])
    # a pending file whose acceptance never reached the metadata (crash in between) is ignored
    s.pending[3] = {"frame": 3}
    j.save_pending(s, 3)
    (loaded,) = j.load_all()
    assert loaded.pending == {2: {"frame": 2}} and loaded.worker_epoch == epoch
    assert loaded.frames_processed == 2 and loaded.frames_received == 3
    j.delete(s.session_id)
    assert list(tmp_path.iterdir()) == []


def test_frame_rate_limiter_frames_and_bytes():
    from serve_app.limits import FrameRateLimiter

    rl = FrameRateLimiter(frames_per_s=2, bytes_per_s=1000, now=0.0)
    rl.check(100, 0.0)
    rl.check(100, 0.0)
    rl.check(100, 0.0)
    rl.check(100, 0.0)  # burst: 2 x 2 frames/s
    with pytest.raises(ServiceError) as ei:
        rl.check(100, 0.0)
    assert ei.value.code is ErrorCode.FRAME_RATE_LIMITED and not ei.value.fatal
    assert ei.value.details["retry_after_s"] == pytest.approx(0.5)
    rl.check(100, 0.5)  # one frame token back after 1/2 s
    # bytes: 2000-byte burst, 400 used; a 1700-byte frame waits (1700 - 1600) / 1000 s ...
    rl2 = FrameRateLimiter(frames_per_s=100, bytes_per_s=1000, now=0.0)
    rl2.check(400, 0.0)
    frames_before = rl2.frames.tokens
    with pytest.raises(ServiceError) as ei:
        rl2.check(1700, 0.0)
    assert ei.value.code is ErrorCode.BYTE_RATE_LIMITED
    assert ei.value.details["retry_after_s"] == pytest.approx(0.1)
    assert rl2.frames.tokens == frames_before  # ... and its frame token is refunded
    rl2.check(1700, 0.1)


# --- security limits (docs/SECURITY.md, "Sessions, protocol and state") ----------------------------------------
def test_per_key_cap_defaults_to_a_fraction_of_the_server():
    """A few keys cannot fill max_sessions for everyone: by default one key gets max_sessions // 8."""
    st = _store(max_sessions=16, sessions_per_minute=1000)
    assert st.limits.sessions_per_key == 2
    for _ in range(2):
        st.create(SessionParams(), owner_of("a"), 0)
    with pytest.raises(ServiceError) as ei:
        st.create(SessionParams(), owner_of("a"), 0)
    assert ei.value.code is ErrorCode.KEY_SESSION_LIMIT
    st.create(SessionParams(), owner_of("b"), 0)
    assert _store(max_sessions=4).limits.sessions_per_key == 1
    assert _store(max_sessions=4, max_sessions_per_key=10).limits.sessions_per_key == 4
    # Without keys (auth none) there is one tenant: max_sessions is the limit.
    free = _store(max_sessions=16, sessions_per_minute=1000)
    for _ in range(16):
        free.create(SessionParams(), None, 0)
    with pytest.raises(ServiceError) as ei:
        free.create(SessionParams(), None, 0)
    assert ei.value.code is ErrorCode.SESSION_LIMIT


def test_server_caps_on_session_params_clients_may_only_lower():
    from serve_app.config import AppArgs, merge_session_params

    lim = LimitsConfig(max_session_points=100_000, max_session_ttl_s=600, max_session_idle_ttl_s=60)
    defaults = SessionParams(max_points=50_000, ttl_s=300, idle_ttl_s=30)
    for field, value in (("max_points", 50_000_000), ("ttl_s", 30 * 86400), ("idle_ttl_s", 7 * 86400),
                         ("max_points", 100_001)):
        with pytest.raises(ServiceError) as ei:
            merge_session_params(defaults, {field: value}, limits=lim)
        assert ei.value.code is ErrorCode.INVALID_PARAMS and ei.value.details["field"] == field
    p = merge_session_params(defaults, {"max_points": 2000, "ttl_s": 600, "idle_ttl_s": 10}, limits=lim)
    assert (p.max_points, p.ttl_s, p.idle_ttl_s) == (2000, 600, 10)
    with pytest.raises(ValueError, match="above the server's cap"):
        AppArgs.model_validate({"session_defaults": {"max_points": 10_000_000}})
    assert LimitsConfig().max_session_ttl_s <= 86400 and LimitsConfig().max_session_idle_ttl_s <= 3600


@pytest.mark.parametrize("body", [{"voxel_size": float("inf")}, {"voxel_size": float("nan")},
                                  {"voxel_size": 1e5}, {"conf_percentile": float("nan")},
                                  {"keyframe_translation": float("inf")}])
def test_every_numeric_param_is_finite_and_bounded(body):
    from serve_app.config import merge_session_params

    with pytest.raises(ServiceError) as ei:
        merge_session_params(SessionParams(), body)
    assert ei.value.code is ErrorCode.INVALID_PARAMS
    assert ei.value.details["field"] == next(iter(body))


def test_point_cloud_parts_stay_valid_while_the_budget_trims():
    """The actor joins the parts in a thread while commits go on: trimming replaces arrays, never writes them."""
    from serve_app.sessions.session_store import concat_parts

    st = _store()
    s = st.create(SessionParams(max_points=1000), None, 0)
    for i in range(3):
        _commit(st, s.session_id, 400, float(i))
    parts = st.point_cloud_parts(s.session_id, None)
    before = [p.copy() for p, _, _ in parts]  # (points, colours, correction)
    _commit(st, s.session_id, 400, 5.0)  # trims the oldest records
    pts, cols = concat_parts(parts)
    np.testing.assert_array_equal(pts, np.concatenate(before))
    assert len(st.point_cloud(s.session_id, None)[0]) == 1000 and cols.dtype == np.uint8


def test_restore_trims_to_the_budget_from_what_was_reloaded():
    """A journal may hold points the budget had dropped: the reloaded session is trimmed again."""
    from serve_app.sessions.session_store import ResultRecord

    st = _store()
    s = st.create(SessionParams(max_points=1000), None, 0)
    s.records = [ResultRecord(i + 1, {}, [], np.zeros((600, 3), np.float32), np.zeros((600, 3), np.uint8))
                 for i in range(4)]
    s.points_total = 1000  # what was saved
    other = _store()
    other.restore([s])
    assert s.points_total == 1000 and sum(len(r.points) for r in s.records) == 1000


def test_a_session_whose_create_fails_after_creation_is_removed(tmp_path):
    """The session actor (as a plain object, no Ray): when saving a new session fails, it is not left behind
    counting against the limits with an id nobody was given."""
    import asyncio
    import shutil

    from serve_app.deployments.session_actor import SessionActor

    state = tmp_path / "state"
    actor = SessionActor(LimitsConfig(max_sessions=1).model_dump(), str(state))
    shutil.rmtree(state)  # the journal's directory is gone: the first save raises
    with pytest.raises(OSError):
        asyncio.run(actor.create(SessionParams().model_dump(), None))
    assert actor.store.sessions == {}
    state.mkdir()
    info = asyncio.run(actor.create(SessionParams().model_dump(), None))  # the one slot is still free
    assert list(actor.store.sessions) == [info["session_id"]]


def test_a_store_restarted_without_state_answers_session_lost_for_unknown_ids():
    """After Ray restarted a memory-only store, a client coming back is told its session was lost, not that it
    never existed; a session deleted since, or another key's, still answers like any missing one."""
    st = _store()
    st.restarted_without_state = True
    with pytest.raises(ServiceError) as ei:
        st.get("gone-with-the-node", "alice")
    assert ei.value.code is ErrorCode.SESSION_LOST and ei.value.fatal
    s = st.create(SessionParams(), "alice", 0)
    with pytest.raises(ServiceError) as ei:
        st.get(s.session_id, "bob")
    assert ei.value.code is ErrorCode.SESSION_NOT_FOUND
    st.delete(s.session_id, "alice")
    with pytest.raises(ServiceError) as ei:
        st.get(s.session_id, "alice")
    assert ei.value.code is ErrorCode.SESSION_NOT_FOUND
