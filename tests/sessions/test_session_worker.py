"""Pure helpers of the streaming path (no Ray): the latency split of each window, the local record queue, the
record a worker hands to its streams."""

import numpy as np
import pytest

from serve_app.deployments.session_worker import window_timings
from serve_app.recon.reconstruction import FrameInput, WindowPlan


def frame(i: int, received_at: float) -> FrameInput:
    return FrameInput(index=i, frame_id=i, image=np.zeros((14, 14, 3), np.uint8), original_size=(14, 14),
                      received_at=received_at)


def test_window_timings_split_the_latency_on_one_clock_each():
    plan = WindowPlan(window=3, context=[frame(0, 50.0)], new=[frame(1, 100.0), frame(2, 100.5)])
    # ingress clock: sent 100.52, back 101.02 (500 ms round trip); the replica reports 430 ms forward, 20 ms wait
    res = {"sent_at": 100.52, "returned_at": 101.02, "model_ms": 430.0, "batch_wait_ms": 20.0}
    t = window_timings(plan, res, geometry_started=101.03, geometry_ms=25.0, now=101.06)
    assert t["queue"] == pytest.approx(520.0)  # first new frame (the context frame is not counted)
    assert t["ingest"] == pytest.approx(20.0)  # last new frame -> sent
    assert t["model_roundtrip"] == pytest.approx(500.0)
    assert (t["model"], t["batch_wait"]) == (430.0, 20.0)
    assert t["transfer"] == pytest.approx(50.0)  # the rest of the round trip
    assert t["geometry_wait"] == pytest.approx(10.0) and t["geometry"] == 25.0
    assert t["last_frame"] == pytest.approx(560.0) and t["total"] == pytest.approx(1060.0)


def test_window_timings_of_a_failed_model_call():
    plan = WindowPlan(window=0, context=[], new=[frame(0, 10.0)])
    res = {"ok": False, "error": "replica died", "sent_at": 10.0, "returned_at": 12.0}  # no replica timings
    t = window_timings(plan, res, geometry_started=12.0, geometry_ms=0.0, now=12.0)
    assert t["model"] == pytest.approx(2000.0) and t["batch_wait"] == 0.0 and t["transfer"] == 0.0


def test_local_records_are_bounded_by_bytes_and_flag_what_they_drop():
    from serve_app.ingress.connection import LocalRecords
    from serve_app.sessions.session_store import ResultRecord

    def rec(seq: int, n: int) -> ResultRecord:  # n points = 15 n bytes
        return ResultRecord(seq=seq, window={}, frames=[], points=np.zeros((n, 3), np.float32),
                            colors=np.zeros((n, 3), np.uint8))

    q = LocalRecords(max_bytes=1000)
    q.put(rec(1, 100))  # 1500 bytes: one record is always queued, however large
    assert q.queue.qsize() == 1 and not q.missed
    q.put(rec(2, 10))  # the stream is behind: left to the session actor, and the sender is told
    assert q.queue.qsize() == 1 and q.missed
    assert q.get_nowait().seq == 1 and q.nbytes == 0
    q.missed = False
    q.put(rec(3, 30))
    q.put(rec(4, 30))  # 900 bytes together
    assert [q.get_nowait().seq for _ in range(2)] == [3, 4] and not q.missed


def test_a_delivered_record_carries_its_encoded_points_unless_the_budget_trimmed_it():
    """The worker encodes the points message body during the commit; the stream frames it with the record's seq.
    A record the point budget trimmed at commit is sent trimmed, so its body must not be reused."""
    from serve_app.deployments.session_worker import SessionWorker
    from serve_app.protocol import decode_points, encode_point_body, frame_points
    from serve_app.recon.reconstruction import WindowOutput

    got = []
    w = SessionWorker.__new__(SessionWorker)  # only _deliver's state: no event loop, actor or model needed
    w.record_listeners, w.epoch = [got.append], 3
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(40, 3)).astype(np.float32)
    cols = rng.integers(0, 256, size=(40, 3), dtype=np.uint8)
    out = WindowOutput(window={"window": 2, "frame_ids": [7]}, frames=[{"frame_id": 7}], points=pts, colors=cols,
                       ok=True)
    body = encode_point_body(pts, cols, "float16")
    w._deliver(5, 40, out, body)
    w._deliver(6, 10, out, body)  # the budget kept only the newest 10 points
    full, trimmed = got
    assert full.body is body and full.epoch == 3 and full.nbytes == pts.nbytes + cols.nbytes + len(body.data)
    chunk = decode_points(frame_points(full.body, seq=full.seq, window=2, frame_ids=[7]))
    assert chunk.seq == 5 and np.allclose(chunk.points, pts, atol=0.01) and np.array_equal(chunk.colors, cols)
    assert trimmed.body is None and np.array_equal(trimmed.points, pts[30:]) and trimmed.window["seq"] == 6


def test_a_worker_numbers_frames_like_the_store_and_takes_back_a_refused_newest_one():
    """next_index() is the store's next index (acceptance order) and refuses what the store would; retract()
    takes back the newest frame while no window has it, and nothing else."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from serve_app.config import LimitsConfig, SessionParams
    from serve_app.deployments.session_worker import SessionWorker
    from serve_app.errors import ErrorCode, ServiceError

    async def run():
        # Fewer frames than a window: the worker plans nothing, so it needs no model or actor here.
        params = SessionParams(window_size=4, overlap=2, max_frames=3)
        w = SessionWorker("s", params.model_copy(update={"max_frames": 10}), None, None, LimitsConfig(), ThreadPoolExecutor(1), on_gone=lambda *a: None,
                          processed=5)  # a restored worker: the store has 5 frames already
        try:
            frames = []
            for _ in range(2):
                f = frame(w.next_index(), 0.0)
                w.add_frame(f, asyncio.get_running_loop().create_future())
                frames.append(f)
            assert [f.index for f in frames] == [5, 6] and w.accepted == 7 and set(w.storing) == {5, 6}
            assert not await w.retract(frames[0])  # not the newest: frame 6 already has the next index
            assert await w.retract(frames[1]) and w.accepted == 6 and list(w.recon.pending) == [frames[0]]
            assert w.next_index() == 6 and 6 not in w.storing
            w.finalizing = True
            with pytest.raises(ServiceError) as ei:
                w.next_index()
            assert ei.value.code is ErrorCode.SESSION_FINALIZED
        finally:
            w.close()
        w2 = SessionWorker("t", params, None, None, LimitsConfig(), ThreadPoolExecutor(1), on_gone=lambda *a: None)
        try:
            for _ in range(3):
                w2.add_frame(frame(w2.next_index(), 0.0))
            with pytest.raises(ServiceError) as ei:
                w2.next_index()
            assert ei.value.code is ErrorCode.FRAME_LIMIT_EXCEEDED
        finally:
            w2.close()

    asyncio.run(run())


def test_a_window_whose_placement_raises_fails_alone_and_the_session_goes_on():
    """A bug or a malformed model output (here a depth map of the wrong size) raising inside integrate fails that
    window with INTERNAL_ERROR (its frames pose: null), instead of killing the worker's integration loop; the next
    window is placed as usual."""
    import dataclasses

    from serve_app.config import SessionParams
    from serve_app.deployments.session_worker import SessionWorker
    from serve_app.errors import ErrorCode
    from serve_app.evaluation.synthetic import SceneSpec, render_sequence
    from serve_app.model.oracle import OracleModel
    from serve_app.recon.reconstruction import StreamReconstructor

    spec = SceneSpec(seed=2, num_frames=8, width=140, height=98, trajectory="orbit")
    seq = render_sequence(spec)
    oracle = OracleModel(spec, seed=1)
    w = SessionWorker.__new__(SessionWorker)  # only _integrate's state: no event loop, actor or model needed
    w.sid = "s"
    w.recon = StreamReconstructor(SessionParams(process_res=140, window_size=4, overlap=2))
    for i in range(8):
        w.recon.add_frame(FrameInput(index=i, frame_id=i, image=seq.images[i], original_size=(140, 98)))
    def window(corrupt=False):
        plan = w.recon.next_window()
        pred = oracle.forward_windows([plan.request()])[0]
        return w._integrate(plan, dataclasses.replace(pred, depth=pred.depth[:, :-1]) if corrupt else pred)

    out, _, _, code = window()
    assert out.ok and code is ErrorCode.ALIGNMENT_FAILED  # the code a not-placed window would get
    out, snap, _, code = window(corrupt=True)
    assert not out.ok and code is ErrorCode.INTERNAL_ERROR and "internal error" in out.reason
    assert [f["pose"] for f in out.frames] == [None, None] and all(f["failed"] for f in out.frames)
    assert snap is not None
    out, _, _, code = window()
    assert out.ok and len(out.points) > 0 and [f["frame_id"] for f in out.frames] == [6, 7]
