"""The typed server -> client messages (serve_app/protocol/messages.py) put the same keys and values on the wire
as the dicts the server built before them, and the docs' examples are valid messages."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from serve_app import ray_env
from serve_app.config import LimitsConfig, SessionParams
from serve_app.deployments.session_worker import window_timings
from serve_app.evaluation.synthetic import SceneSpec, render_sequence
from serve_app.model.oracle import OracleModel
from serve_app.protocol import messages as M
from serve_app.recon import corrections
from serve_app.recon.geometry import Sim3, orthonormalize
from serve_app.recon.reconstruction import FrameInput, StreamReconstructor
from serve_app.sessions.session_store import SessionStore
from serve_app.sessions.shards import merge_lists

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
DOC = (ROOT / "docs/WEBSOCKET_API.md").read_text()
BY_TYPE = {m.TYPE: m for m in M.SERVER_MESSAGES}


def _old(obj: dict) -> str:
    """How the server serialised its dicts before the models."""
    return json.dumps(obj, separators=(",", ":"))


def _doc_messages() -> list[dict]:
    """Every JSON object with a server message `type` that the docs show in full (examples with `...` are skipped
    by the JSON parser, not by hand)."""
    found = []
    for m in re.finditer(r'\{"type":\s*"(\w+)"', DOC):
        if m.group(1) not in BY_TYPE:
            continue
        try:
            obj, _ = json.JSONDecoder().raw_decode(DOC, m.start())
        except ValueError:
            continue
        found.append(obj)
    return found


def test_the_docs_examples_are_valid_messages_and_keep_their_keys():
    examples = _doc_messages()
    assert {e["type"] for e in examples} >= {"ack", "error", "pong", "window", "correction"}
    for obj in examples:
        msg = BY_TYPE[obj["type"]].model_validate(obj)
        assert msg.wire() == obj  # same keys, same values
        assert json.loads(msg.json_text()) == obj


def test_built_messages_equal_the_dicts_they_replace():
    params = {"window_size": 4, "point_encoding": "float16"}
    ready = M.Ready(session_id="s1", params=params, state="created", frames_received=0, frames_processed=0,
                    points_total=0, last_seq=0, max_in_flight=32, in_flight=0)
    assert ready.json_text() == _old({
        "type": "ready", "protocol": 1, "session_id": "s1", "params": params, "state": "created",
        "frames_received": 0, "frames_processed": 0, "points_total": 0, "last_seq": 0, "max_in_flight": 32,
        "in_flight": 0})
    assert M.Ack.of("f", 3, in_flight=2, max_in_flight=8).json_text() == _old(
        {"type": "ack", "frame_id": "f", "index": 3, "frames_received": 4, "in_flight": 2, "max_in_flight": 8})
    assert M.Error.of("QUEUE_FULL", "full", frame_id=0).json_text() == _old(
        {"type": "error", "code": "QUEUE_FULL", "message": "full", "fatal": False, "frame_id": 0})
    assert M.Error.of("RATE_LIMITED", "slow", True, details={"retry_after_s": 1.5}).wire() == {
        "type": "error", "code": "RATE_LIMITED", "message": "slow", "fatal": True, "details": {"retry_after_s": 1.5}}
    assert "details" not in M.Error.of("INVALID_IMAGE", "bad", details={}).wire()
    with pytest.raises(ValueError):
        M.Error.of("NOT_A_CODE", "x")
    assert M.Progress(stage="inference", window=2, frames_received=8, frames_processed=4, in_flight=4,
                      windows_pending=1).json_text() == _old(
        {"type": "progress", "stage": "inference", "window": 2, "frames_received": 8, "frames_processed": 4,
         "in_flight": 4, "windows_pending": 1})
    pong = M.Pong.of(None).wire()
    assert list(pong) == ["type", "t", "server_time"] and pong["t"] is None  # a null token is echoed
    summary = M.Summary(state="complete", frames_received=7, frames_processed=7, frames_failed=0, points_total=5,
                        windows=3, duration_s=8.25, exports=M.ExportPaths.of("s1"))
    assert summary.json_text() == _old(
        {"type": "summary", "state": "complete", "frames_received": 7, "frames_processed": 7, "frames_failed": 0,
         "points_total": 5, "windows": 3, "duration_s": 8.25,
         "exports": {"ply": "/ws/session/s1/reconstruction.ply", "glb": "/ws/session/s1/reconstruction.glb",
                     "trajectory": "/ws/session/s1/trajectory.json", "tum": "/ws/session/s1/trajectory.txt"}})


def test_numbers_keep_their_type_and_wrong_types_are_refused():
    fr = M.FrameResult.of({"frame_id": 0, "index": 0, "timestamp": 3, "pose": [[1, 0.5]]}, seq=2)
    assert fr.json_text() == '{"type":"frame_result","frame_id":0,"index":0,"timestamp":3,"pose":[[1,0.5]],"seq":2}'
    with pytest.raises(ValueError):
        M.Ack(frame_id=0, index="3", frames_received=4, in_flight=0, max_in_flight=1)  # str for int
    with pytest.raises(ValueError):
        M.Ready(session_id="s", params={}, state="created", frames_received=0, frames_processed=0,
                points_total=0, last_seq=0, max_in_flight=1, in_flight=0, surprise=1)  # no undeclared keys


SPEC = SceneSpec(seed=3, num_frames=10, width=64, height=48, trajectory="orbit")


@pytest.fixture(scope="module")
def sequence():
    return render_sequence(SPEC)


def _records(seq, global_consistency: bool, corrupt: int | None) -> list:
    """Window outputs of a real streaming reconstruction, finished as the session worker finishes them."""
    oracle = OracleModel(SPEC, seed=2)
    rec = StreamReconstructor(SessionParams(process_res=140, window_size=4, overlap=2,
                                            global_consistency=global_consistency))
    outs = []
    for i in range(len(seq.images)):
        ts = float(i) / 5 if i % 2 else None
        rec.add_frame(FrameInput(index=i, frame_id=i if i % 3 else f"f{i}", image=seq.images[i],
                                 original_size=(64, 48), timestamp=ts))
        while (plan := rec.next_window(force=i == len(seq.images) - 1)) is not None:
            started = time.time()
            pred = oracle.forward_windows([plan.request()])[0]
            if plan.window == corrupt:
                pred.depth[:] = np.nan
            out = rec.integrate(plan, pred)
            res = {"ok": out.ok, "sent_at": started, "returned_at": time.time(), "batch_size": 1}
            out.window["timings_ms"] = window_timings(plan, res, started, out.window.pop("geometry_ms", 0.0),
                                                      time.time())
            out.window["server_time"] = round(time.time(), 4)
            out.window["batch_size"] = res.get("batch_size") if plan.window % 2 else None
            outs.append(out)
    return outs


@pytest.mark.parametrize(("global_consistency", "corrupt"), [(False, 1), (True, None)])
def test_result_records_keep_their_bytes(sequence, global_consistency, corrupt):
    outs = _records(sequence, global_consistency, corrupt)
    assert any(not o.ok for o in outs) == (corrupt is not None)
    for seq, out in enumerate(outs, 1):
        window = {**out.window, "seq": seq}  # as the session store keeps it
        assert M.Window.model_validate(window).json_text() == _old({"type": "window", **window})
        for f in out.frames:
            fr = {**f, "seq": seq}
            assert M.FrameResult.model_validate(fr).json_text() == _old({"type": "frame_result", **fr})


def test_a_correction_keeps_its_bytes():
    rng = np.random.default_rng(0)
    transforms = {}
    for w in range(50):
        R = orthonormalize(np.eye(3) + rng.normal(scale=0.2, size=(3, 3)))
        transforms[w] = Sim3(float(rng.uniform(0.9, 1.1)), R, rng.normal(size=3))
    msg = {**corrections.to_message(corrections.Correction(3, transforms)), "seq": 12, "version": 3}
    assert M.correction_text(msg) == _old(msg)


def test_the_session_list_reply_is_documented_key_by_key():
    row = next(line for line in DOC.splitlines() if line.startswith("| `GET /ws/sessions`"))
    documented = set(re.findall(r'"(\w+)": ', row)) | set(re.findall(r"`(\w+)`", row))
    for key in M.SessionList.model_fields:
        assert key in documented, key
    user = M.SessionList(sessions=[], counts={"total": 0}, limits={"max_sessions": 4}).wire()
    assert list(user) == ["sessions", "counts", "limits"]


def test_the_session_list_model_takes_what_the_shards_answer():
    """The reply's parts as the session actor builds them (session_actor.list), merged over two shards."""
    parts = []
    for _ in range(2):
        store = SessionStore(LimitsConfig())
        found = [store.create(SessionParams(), None, 0.0) for _ in range(2)]
        parts.append({"sessions": [s.info() for s in found], "counts": store.counts(),
                      "limits": {"max_sessions": store.limits.max_sessions}, "ray_env": ray_env.in_effect()})
    merged = M.SessionList.model_validate(merge_lists(parts)).wire()
    assert list(merged) == ["sessions", "counts", "limits", "ray_env", "shards"]
    assert merged["counts"]["total"] == 4 and merged["shards"] == [2, 2]
    one = M.SessionList.model_validate(merge_lists(parts[:1])).wire()
    assert "shards" not in one and one["counts"]["total"] == 2
