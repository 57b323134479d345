"""The session journal's on-disk format (no pickle) and its compaction to the point budget. No Ray."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from serve_app.config import LimitsConfig, SessionParams
from serve_app.recon.reconstruction import FrameInput, WorldFrame
from serve_app.sessions import journal_codec
from serve_app.sessions.session_journal import SessionJournal
from serve_app.sessions.session_store import ResultRecord, SessionStore


def _frame(i: int, encoded: bool) -> FrameInput:
    img = np.full((14, 28, 3), i, np.uint8)
    return FrameInput(index=i, frame_id=f"f{i}", image=None if encoded else img, original_size=(28, 14),
                      timestamp=0.5 * i, intrinsics=np.eye(3, dtype=np.float32), pose=np.eye(4, dtype=np.float32),
                      encoded=b"\xff\xd8jpeg" if encoded else None)


def test_codec_round_trips_what_the_journal_stores():
    rng = np.random.default_rng(1)
    world = WorldFrame(index=3, frame_id=3, image=None, pix=np.arange(5, dtype=np.int32),
                       points=rng.normal(size=(5, 3)).astype(np.float32), conf=np.ones(5, np.float32),
                       c2w=np.eye(4), source=None, keyframe=False, encoded=b"abc")
    snap = {"voxel_size": 0.01, "windows_planned": 4, "lost": False, "input_size": (28, 14),
            "last_keyframe": (np.eye(4), np.float32(2.5)), "world": [world], "keyframes": [1, 3],
            "nested": {1: "int key", "s": [None, 1.5, float("nan")]}}
    back = journal_codec.loads(journal_codec.dumps(snap))
    assert back["input_size"] == (28, 14) and back["keyframes"] == [1, 3] and back["nested"][1] == "int key"
    assert np.isnan(back["nested"]["s"][2]) and back["last_keyframe"][1] == 2.5
    w = back["world"][0]
    assert isinstance(w, WorldFrame) and w.encoded == b"abc" and not w.keyframe and w.image is None
    np.testing.assert_array_equal(w.points, world.points)
    for enc in (True, False):
        f = journal_codec.loads(journal_codec.dumps(_frame(2, enc)))
        assert isinstance(f, FrameInput) and f.frame_id == "f2" and f.original_size == (28, 14)
        assert (f.encoded == b"\xff\xd8jpeg") if enc else (f.image == 2).all()
    with pytest.raises(TypeError):
        journal_codec.dumps({"x": object()})
    with pytest.raises(TypeError):
        journal_codec.dumps(np.array([object()]))


class _Planted:
    """A pickle that, when loaded, writes a file: what a planted journal file could do if pickles were read."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickles_are_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    j = SessionJournal(tmp_path / "state")
    store = SessionStore(LimitsConfig())
    s = store.create(SessionParams(), None, 0.0)
    store.accept_frames(s.session_id, 1, 0.0, payloads=[_frame(0, True)])
    j.save_meta(s)
    j.save_pending(s, 0)
    evil = pickle.dumps(_Planted(marker))
    sid = s.session_id
    (tmp_path / "state" / f"{sid}.state").write_bytes(evil)
    (tmp_path / "state" / f"{sid}.rec").write_bytes(len(evil).to_bytes(8, "little") + evil)
    (tmp_path / "state" / f"{sid}.pending" / "0.npz").write_bytes(evil)
    (tmp_path / "state" / f"{sid}.pending" / "0.pkl").write_bytes(evil)  # the old format's name
    with pytest.raises(journal_codec.CodecError):
        journal_codec.loads(evil)
    (loaded,) = j.load_all()
    assert not marker.exists()
    assert loaded.session_id == sid and loaded.records == [] and loaded.pending == {} and loaded.stream_state is None
    # An archive that names a class outside the allowed few builds nothing either.
    fake = journal_codec.dumps({"x": 1}).replace(b'{"m":[["x",1]]}', b'{"dc":"Popen","f":{"x":1}}')
    with pytest.raises(journal_codec.CodecError):
        journal_codec.loads(fake)


def _commit(store, sid, i, n):
    pts = np.full((n, 3), i, np.float32)
    return store.commit_window(sid, {"window": i}, [{"index": i, "frame_id": i, "pose": np.eye(4).tolist()}],
                               pts, np.full((n, 3), i % 255, np.uint8), {"windows_integrated": i + 1}, float(i))


def test_journal_is_compacted_to_the_point_budget_and_reloads_it(tmp_path):
    """60 windows of 500 points with a budget of 1000: the record file stays near the budget (it used to keep
    all 30000 points and a restart loaded every one), and a reload gives exactly the map in memory."""
    j = SessionJournal(tmp_path, compact_slack_bytes=0)
    store = SessionStore(LimitsConfig())
    s = store.create(SessionParams(max_points=1000), None, 0.0)
    sizes = []
    for i in range(60):
        rec = _commit(store, s.session_id, i, 500)
        j.append_record(s, rec)
        j.save_stream_state(s)
        sizes.append((tmp_path / f"{s.session_id}.rec").stat().st_size)
    assert s.points_total == 1000 and j.compactions > 0
    live = j.live_bytes(s)
    assert max(sizes) <= 2 * live + max(sizes[0], 1)  # bounded: never more than ~2x what is live (+ one record)
    assert sizes[-1] < 60 * 500 * 15 / 4  # far below every point ever written
    restored = SessionStore(LimitsConfig())
    restored.restore(j.load_all())
    r = restored.sessions[s.session_id]
    assert r.points_total == 1000 and r.last_seq == 60 and len(r.frames) == 60
    assert r.stream_state == {"windows_integrated": 60}
    for a, b in zip(restored.point_cloud(s.session_id, None), store.point_cloud(s.session_id, None), strict=True):
        np.testing.assert_array_equal(a, b)


def test_torn_record_is_dropped_and_the_rest_kept(tmp_path):
    j = SessionJournal(tmp_path)
    store = SessionStore(LimitsConfig())
    s = store.create(SessionParams(), None, 0.0)
    for i in range(3):
        j.append_record(s, _commit(store, s.session_id, i, 10))
    path = tmp_path / f"{s.session_id}.rec"
    path.write_bytes(path.read_bytes()[:-7])  # a crash in the middle of the last write
    (loaded,) = j.load_all()
    assert [r.seq for r in loaded.records] == [1, 2]
    assert all(isinstance(r, ResultRecord) and r.points.dtype == np.float32 for r in loaded.records)
