"""Per-window corrections (issue 16 item 6): the wire form, applying and merging them, the session store and
journal that keep them, the worker that publishes them, and the Python client that applies them. No Ray here;
the end-to-end tests against the real app are in tests/recon/test_corrections_e2e.py."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from conftest import InProcess

from serve_app.config import LimitsConfig, SessionParams
from serve_app.recon import corrections as C
from serve_app.recon.geometry import Sim3
from serve_app.sessions.session_store import CorrectionRecord, ResultRecord, SessionStore


def random_sim3(rng, scale_jitter=0.05, angle=0.3, shift=2.0) -> Sim3:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = rng.uniform(-angle, angle)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    R = np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K
    return Sim3(float(np.exp(rng.normal() * scale_jitter)), R, rng.normal(size=3) * shift)


def correction(rng, windows, version=1) -> C.Correction:
    return C.Correction(version, {w: random_sim3(rng) for w in windows})


# --- wire form ----------------------------------------------------------------------------------------------
def test_round_trip_keeps_transforms_to_float32_precision():
    rng = np.random.default_rng(0)
    corr = correction(rng, [0, 3, 7, 1000])
    msg = C.to_message(corr, seq=9)
    assert msg["type"] == "correction" and msg["seq"] == 9 and msg["version"] == 1
    assert [r[0] for r in msg["transforms"]] == [0, 3, 7, 1000]
    back = C.from_message(json.loads(json.dumps(msg)))
    assert back.version == 1 and set(back.transforms) == {0, 3, 7, 1000}
    pts = rng.normal(size=(500, 3)) * 5
    for w, T in corr.transforms.items():
        B = back.transforms[w]
        assert B.s == pytest.approx(T.s, rel=1e-6)
        assert np.abs(B.R - T.R).max() < 1e-6 and np.allclose(B.R @ B.R.T, np.eye(3), atol=1e-12)
        assert np.abs(B.apply(pts) - T.apply(pts)).max() < 1e-5 * (1 + np.abs(T.apply(pts)).max())
    # decoding the same message twice gives the same transforms bit for bit (what the server stores)
    again = C.from_message(json.loads(json.dumps(msg)))
    for w in back.transforms:
        assert np.array_equal(again.transforms[w].matrix(), back.transforms[w].matrix())


def test_rows_are_short_and_quaternions_canonical():
    T = Sim3(1.0, np.eye(3), np.array([0.1, -2.5, 1e-8]))
    row = C.to_row(4, T)
    # t shares one step, 7 significant digits of the largest: 1e-8 is below it
    assert row == [4, 1.0, 0.0, 0.0, 0.0, 1.0, 0.1, -2.5, 0.0]
    assert json.dumps(row, separators=(",", ":")) == "[4,1.0,0.0,0.0,0.0,1.0,0.1,-2.5,0.0]"
    assert C.to_row(0, Sim3(1.0, np.eye(3), np.array([1e-4, -2e-5, 0.0])))[6:] == [1e-4, -2e-5, 0.0]
    flip = Sim3(1.0, np.diag([1.0, -1.0, -1.0]), np.zeros(3))  # 180 degrees about x: w = 0, x = +-1
    assert C.to_row(0, flip)[2:6] in ([1.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0])
    rng = np.random.default_rng(1)
    assert all(C.to_row(0, random_sim3(rng, angle=3.1))[5] >= 0 for _ in range(50))


@pytest.mark.parametrize("kind, kw", [("large", {}), ("small", {"scale_jitter": 0.01, "angle": 0.03, "shift": 0.1})])
def test_a_thousand_windows_fit_in_100_kB(kind, kw):
    """Issue 16: <= 100 kB per optimisation. Measured: the serialised message for 1,000 windows with large
    corrections (scale +-5 %, rotations up to 0.3 rad, shifts of metres) and small ones (+-1 %, 0.03 rad, 0.1)."""
    rng = np.random.default_rng(2)
    msg = C.to_message(C.Correction(9, {w: random_sim3(rng, **kw) for w in range(1000)}), seq=123456)
    text = json.dumps(msg, separators=(",", ":"))
    print(f"correction for 1000 windows ({kind}): {len(text)} bytes ({len(text) / 1000:.1f} per window)")
    assert len(text) <= 100_000


@pytest.mark.parametrize("bad", [
    {"type": "correction", "version": 1, "transforms": [[0, 1, 0, 0, 0, 1, 0, 0]]},  # 8 numbers
    {"type": "correction", "version": 1, "transforms": [[-1, 1, 0, 0, 0, 1, 0, 0, 0]]},  # negative window
    {"type": "correction", "version": 1, "transforms": [[0.5, 1, 0, 0, 0, 1, 0, 0, 0]]},  # float window
    {"type": "correction", "version": 1, "transforms": [[0, 0, 0, 0, 0, 1, 0, 0, 0]]},  # zero scale
    {"type": "correction", "version": 1, "transforms": [[0, 1, 0, 0, 0, 0, 0, 0, 0]]},  # zero quaternion
    {"type": "correction", "version": 1, "transforms": [[0, 1, 0, 0, 0, 1, "x", 0, 0]]},
    {"type": "correction", "version": 1, "transforms": [[0, 1, 0, 0, 0, 1, float("nan"), 0, 0]]},
    {"type": "correction", "version": "1", "transforms": []},
    {"type": "window", "version": 1, "transforms": []},
])
def test_malformed_messages_are_refused(bad):
    with pytest.raises(C.CorrectionError):
        C.from_message(bad)


# --- apply and merge ----------------------------------------------------------------------------------------
def test_apply_points_and_poses_agree():
    """A corrected camera sees the corrected points where the original camera saw the original points."""
    rng = np.random.default_rng(3)
    T = random_sim3(rng)
    c2w = np.eye(4)
    c2w[:3, :3] = random_sim3(rng).R
    c2w[:3, 3] = [1.0, 2.0, 3.0]
    cam_pts = rng.normal(size=(100, 3)) + [0, 0, 5]  # in the camera frame
    world = cam_pts @ c2w[:3, :3].T + c2w[:3, 3]
    new_c2w = C.apply_c2w(T, c2w).astype(np.float64)
    new_world = C.apply_points(T, world).astype(np.float64)
    back = (new_world - new_c2w[:3, 3]) @ new_c2w[:3, :3]  # into the corrected camera: s * cam_pts
    assert np.allclose(back, T.s * cam_pts, atol=1e-4)
    assert C.apply_points(None, world.astype(np.float32)) is not None
    assert np.array_equal(C.apply_points(None, world.astype(np.float32)), world.astype(np.float32))


def test_merge_is_absolute_idempotent_and_order_defines_the_state():
    rng = np.random.default_rng(4)
    a = correction(rng, [0, 1, 2], version=1)
    b = correction(rng, [1, 3], version=2)
    s1 = C.merge({}, a)
    s2 = C.merge(s1, b)
    assert s2[0] is a.transforms[0] and s2[1] is b.transforms[1] and s2[3] is b.transforms[3]
    assert C.merge(s2, b) == s2  # applying the same correction twice changes nothing (a replay)
    assert C.merge(C.merge({}, a), b) == C.merge(C.merge(C.merge({}, a), b), b)
    assert s1 == {0: a.transforms[0], 1: a.transforms[1], 2: a.transforms[2]}  # inputs not mutated


def test_compaction_keeps_the_replayed_state_and_one_row_per_window():
    rng = np.random.default_rng(5)
    msgs = []
    for v in range(1, 30):
        new = C.to_message(correction(rng, rng.choice(50, size=10, replace=False).tolist(), version=v), seq=v)
        msgs = C.compact(msgs, new) + [new]
    full = {}
    for m in msgs:
        full = C.merge(full, C.from_message(m))
    assert sum(len(m["transforms"]) for m in msgs) == len(full) <= 50
    # the same state as merging every message uncompacted
    rng = np.random.default_rng(5)
    plain = {}
    for v in range(1, 30):
        windows = rng.choice(50, size=10, replace=False).tolist()
        plain = C.merge(plain, C.quantize(correction(rng, windows, v)))
    assert set(plain) == set(full)
    assert all(np.array_equal(plain[w].matrix(), full[w].matrix()) for w in plain)


def test_corrected_cloud_and_frames():
    rng = np.random.default_rng(6)
    T = C.quantize(correction(rng, [1])).transforms[1]
    p0, p1 = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(7, 3)).astype(np.float32)
    cloud = C.corrected_cloud([(0, p0), (1, p1)], {1: T})
    assert np.array_equal(cloud[:5], p0) and np.array_equal(cloud[5:], T.apply(p1))
    pose = np.eye(4).tolist()
    frames = [{"window": 0, "pose": pose}, {"window": 1, "pose": pose}, {"window": 1, "pose": None}]
    out = C.corrected_frames(frames, {1: T})
    assert out[0] is frames[0] and out[2] is frames[2] and frames[1]["pose"] == pose
    assert np.allclose(out[1]["pose"], T.matrix() @ np.diag([1 / T.s] * 3 + [1]), atol=1e-6)


# --- session store and journal ------------------------------------------------------------------------------
def _session(store):
    s = store.create(SessionParams(), None, 0.0)
    return s, s.session_id


def _window(store, sid, w, n, rng, pose=None):
    pts = rng.normal(size=(n, 3)).astype(np.float32)
    cols = rng.integers(0, 255, size=(n, 3), dtype=np.uint8)
    c2w = np.eye(4) if pose is None else pose
    frames = [{"frame_id": w, "index": w, "window": w, "pose": c2w.tolist(), "timestamp": float(w)}]
    store.commit_window(sid, {"window": w, "frame_ids": [w]}, frames, pts, cols, None, 1.0)
    return pts


def test_store_applies_corrections_to_exports_and_replays_them_in_order():
    rng = np.random.default_rng(7)
    st = SessionStore(LimitsConfig())
    s, sid = _session(st)
    originals = [_window(st, sid, w, 20, rng) for w in range(3)]
    corr = correction(rng, [0, 2], version=1)
    rec = st.commit_correction(sid, C.to_message(corr), 2.0, epoch=None)
    assert isinstance(rec, CorrectionRecord) and rec.seq == 4 == s.last_seq and s.correction_version == 1
    assert st.get(sid).info()["correction_version"] == 1
    q = C.quantize(corr).transforms
    pts, cols = st.point_cloud(sid, None)
    expect = np.concatenate([q[0].apply(originals[0]), originals[1], q[2].apply(originals[2])])
    assert np.array_equal(pts, expect) and len(cols) == 60
    raw, _ = st.point_cloud(sid, None, corrected=False)
    assert np.array_equal(raw, np.concatenate(originals))
    traj = st.trajectory(sid, None)
    assert np.allclose(traj[2]["pose"], q[2].transform_c2w(np.eye(4)), atol=1e-7)
    assert traj[1]["pose"] == np.eye(4).tolist()
    assert st.trajectory(sid, None, corrected=False)[2]["pose"] == np.eye(4).tolist()
    # records as emitted, then the correction, in seq order; a later window follows it
    _window(st, sid, 3, 5, rng)
    seqs = [(type(r).__name__, r.seq) for r in st.records_after(sid, 0)]
    assert seqs == [("ResultRecord", 1), ("ResultRecord", 2), ("ResultRecord", 3), ("CorrectionRecord", 4),
                    ("ResultRecord", 5)]
    assert [r.seq for r in st.records_after(sid, 3)] == [4, 5]
    assert [r.seq for r in st.records_after(sid, 0, skip_epoch=None)] == [1, 2, 3, 4, 5]


def test_store_compacts_versions_and_skips_the_local_workers_records():
    rng = np.random.default_rng(8)
    st = SessionStore(LimitsConfig())
    s, sid = _session(st)
    for w in range(4):
        _window(st, sid, w, 3, rng)
    st.commit_correction(sid, C.to_message(correction(rng, [0, 1, 2], version=5)), 2.0, epoch=7)
    st.commit_correction(sid, C.to_message(correction(rng, [1, 2, 3], version=1)), 3.0, epoch=None)
    assert [c.message["version"] for c in s.corrections] == [5, 6]  # raised above the last: takeover restarts
    assert [len(c.message["transforms"]) for c in s.corrections] == [1, 3]  # window 0 only in the first
    assert [r.seq for r in st.records_after(sid, 4, skip_epoch=7)] == [6]
    assert set(s.transforms) == {0, 1, 2, 3}
    with pytest.raises(C.CorrectionError):
        st.commit_correction(sid, {"type": "correction", "version": 1, "transforms": [[0]]}, 4.0)
    assert s.last_seq == 6  # a refused message takes no seq


def test_journal_restores_corrections(tmp_path):
    from serve_app.sessions.session_journal import SessionJournal

    rng = np.random.default_rng(9)
    st = SessionStore(LimitsConfig())
    s, sid = _session(st)
    j = SessionJournal(tmp_path)
    for w in range(3):
        _window(st, sid, w, 10, rng)
        j.append_record(s, s.records[-1])
    for v, ws in ((1, [0, 1]), (2, [1, 2])):
        st.commit_correction(sid, C.to_message(correction(rng, ws, version=v)), 2.0)
        j.save_corrections(s)
        j.save_meta(s)
    before, _ = st.point_cloud(sid, None)
    (restored,) = j.load_all()
    st2 = SessionStore(LimitsConfig())
    st2.restore([restored])
    after, _ = st2.point_cloud(sid, None)
    assert np.array_equal(before, after) and restored.last_seq == 5 and restored.correction_version == 2
    assert [r.seq for r in st2.records_after(sid, 0)] == [1, 2, 3, 4, 5]
    # crash after the corrections file, before the metadata: the correction is kept, seq continues after it
    st.commit_correction(sid, C.to_message(correction(rng, [0], version=3)), 3.0)
    j.save_corrections(s)
    (torn,) = j.load_all()
    assert torn.last_seq == 6 and torn.correction_version == 3
    j.delete(sid)
    assert not list(tmp_path.iterdir())


# --- the worker publishes, its streams get it ---------------------------------------------------------------
@pytest.mark.slow
def test_publish_correction_commits_fenced_and_hands_the_record_to_local_streams():
    from serve_app.deployments.session_actor import SessionActor
    from serve_app.deployments.session_worker import SessionWorker

    async def run():
        actor = SessionActor(LimitsConfig().model_dump())
        info = await actor.create(SessionParams().model_dump(), None)
        sid = info["session_id"]
        epoch = (await actor.take_worker(sid)).epoch
        got: list = []
        w = SessionWorker.__new__(SessionWorker)  # publish_correction's state only: no loop tasks or model
        w.sid, w.actor, w.epoch, w.record_listeners = sid, InProcess(actor), epoch, [got.append]
        w.pool = None  # the loop's default executor
        rng = np.random.default_rng(10)
        await w.publish_correction(correction(rng, [0, 4], version=1))
        (rec,) = got
        msg = json.loads(rec.text)
        assert rec.seq == msg["seq"] == 1 and rec.epoch == epoch and msg["version"] == 1
        stored = actor.store.sessions[sid].corrections[0].message
        assert msg == stored  # the stream sends exactly what a resume replays
        # a stream on another replica gets it from the long-poll; this replica's stream skips it there
        res = await actor.wait_records(sid, 0, None, 0.1)
        assert res.displaced or [r.seq for r in res.records] == [1]
        await actor.attach(sid, None, "c1")
        res = await actor.wait_records(sid, 0, "c1", 0.1)
        assert [type(r) for r in res.records] == [CorrectionRecord]
        res = await actor.wait_records(sid, 0, "c1", 0.05, skip_epoch=epoch)
        assert res.records == []
        # a superseded worker's correction is refused and reaches nobody
        await actor.take_worker(sid)
        await w.publish_correction(correction(rng, [0], version=2))
        assert len(got) == 1 and len(actor.store.sessions[sid].corrections) == 1

    asyncio.run(run())


# --- the Python client --------------------------------------------------------------------------------------
def test_client_transform_maths_equals_the_servers():
    from da3_client.corrections import parse_correction

    rng = np.random.default_rng(11)
    corr = correction(rng, range(20))
    msg = json.loads(json.dumps(C.to_message(corr, seq=3)))
    server = C.from_message(msg).transforms
    client = parse_correction(msg)
    pts = (rng.normal(size=(300, 3)) * 4).astype(np.float32)
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = random_sim3(rng).R, [0.5, -1, 2]
    for w in server:
        assert np.array_equal(client[w].apply(pts), server[w].apply(pts))  # the same float64 operations
        assert np.allclose(client[w].matrix(), server[w].matrix(), atol=1e-12)
        assert np.abs(client[w].apply_c2w(pose) - server[w].transform_c2w(pose)).max() < 1e-6


def test_client_reconstruction_applies_corrections_like_the_server_store():
    """The same records and corrections through the session store (export) and the client's Reconstruction:
    the same corrected cloud and trajectory, also when the client resumes mid-way and gets a replay."""
    from da3_client import Reconstruction

    from serve_app.protocol import decode_points, encode_point_body, frame_points

    rng = np.random.default_rng(12)
    st = SessionStore(LimitsConfig())
    s, sid = _session(st)

    def pose(i):
        P = np.eye(4)
        P[:3, :3], P[:3, 3] = random_sim3(rng).R, rng.normal(size=3)
        return P

    for w in range(4):
        _window(st, sid, w, 30, rng, pose(w))
        if w in (1, 3):
            st.commit_correction(sid, C.to_message(correction(rng, range(w + 1), version=w)), 2.0)

    def messages(recs):
        for r in recs:
            if isinstance(r, CorrectionRecord):
                yield json.loads(json.dumps(r.message))
                continue
            assert isinstance(r, ResultRecord)
            yield {"type": "window", **r.window}
            for f in r.frames:
                yield {"type": "frame_result", **f}
            yield frame_points(encode_point_body(r.points, r.colors, "float32"), seq=r.seq,
                               window=r.window["window"], frame_ids=r.window["frame_ids"])

    live = Reconstruction()
    for m in messages(st.records_after(sid, 0)):
        live.apply(m)
    assert live.corrections == 2 and live.last_seq == s.last_seq == 6 and live.correction_version == 3
    server_pts, server_cols = st.point_cloud(sid, None)
    tol = 1e-5 * (1 + np.abs(server_pts).max())  # the points message stores origin + float32 offsets
    assert np.abs(live.points() - server_pts).max() < tol and np.array_equal(live.colors(), server_cols)
    assert np.abs(live.points(corrected=False) - server_pts).max() > 0.1
    traj = {f["frame_id"]: f["pose"] for f in st.trajectory(sid, None)}
    assert {f["frame_id"] for f in live.trajectory()} == set(traj)
    for f in live.trajectory():
        assert np.abs(np.asarray(f["pose"]) - np.asarray(traj[f["frame_id"]])).max() < 1e-6

    # resume after seq 2 (window 1's record): the replay repeats nothing, and ends in the same state
    resumed = Reconstruction()
    all_msgs = list(messages(st.records_after(sid, 0)))
    for m in all_msgs[:6]:  # records 1 and 2
        resumed.apply(m)
    assert resumed.last_seq == 2
    for m in messages(st.records_after(sid, 0)):  # a client that asked for too much gets duplicates: ignored
        resumed.apply(m)
    assert np.array_equal(resumed.points(), live.points()) and resumed.corrections == 2
    assert decode_points(all_msgs[5]).seq == 2


def test_the_loop_count_travels_in_the_correction_and_the_client_keeps_the_latest():
    """After the last window, loops verified later reach the client only in a correction (issue 16): the count
    survives the wire, the store (and its compaction), malformed counts are refused, and the client's
    Reconstruction keeps the largest count of window and correction messages."""
    from da3_client import Reconstruction

    rng = np.random.default_rng(3)
    corr = C.Correction(2, {0: random_sim3(rng)}, loops_accepted=5)
    msg = C.to_message(corr)
    assert msg["loops_accepted"] == 5 and C.from_message(json.loads(json.dumps(msg))).loops_accepted == 5
    assert "loops_accepted" not in C.to_message(C.Correction(1, {0: random_sim3(rng)}))  # not reported
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(C.CorrectionError):
            C.from_message({**msg, "loops_accepted": bad})
    st = SessionStore(LimitsConfig())
    _, sid = _session(st)
    st.commit_correction(sid, C.to_message(C.Correction(1, {0: random_sim3(rng)}, loops_accepted=1)), 1.0)
    st.commit_correction(sid, msg, 2.0)
    stored = [r.message for r in st.records_after(sid, 0) if isinstance(r, CorrectionRecord)]
    assert [m["loops_accepted"] for m in stored] == [1, 5]
    rec = Reconstruction()
    assert rec.loops_accepted is None
    rec.apply({"type": "window", "seq": 1, "window": 0, "alignment": {"ok": True, "loops_accepted": 3}})
    assert rec.loops_accepted == 3
    for m in stored:
        rec.apply(m)
    assert rec.loops_accepted == 5
