"""Loop closure and global consistency in the session reconstructor (no Ray): retrieval rules, verification with
the oracle's realistic errors, the look-alike scene, corrections, occupancy and snapshot."""

import copy

import numpy as np
import pytest

from serve_app.config import OracleErrors, SessionParams
from serve_app.evaluation.metrics import trajectory_metrics
from serve_app.evaluation.synthetic import SceneSpec
from serve_app.model.oracle import OracleModel
from serve_app.prediction import WindowRequest
from serve_app.recon.alignment import trajectory_length, umeyama_sim3
from serve_app.recon.consistency import Consistency
from serve_app.recon.geometry import Sim3, invert_pose, unproject_pixels
from serve_app.recon.graph_step import GraphStepLog, run_graph_step
from serve_app.recon.loops import Keyframe, LoopDetector, depth_scale, verify_loop
from serve_app.recon.reconstruction import FrameInput, StreamReconstructor, voxel_centres, voxel_keys


def _kf(index: int, desc) -> Keyframe:
    d = np.asarray(desc, np.float32)
    return Keyframe(index, index, d / np.linalg.norm(d), None, np.zeros(0, np.int32), np.zeros((0, 3)), np.eye(4))


def test_retrieval_needs_similarity_a_temporal_gap_and_keeps_the_best_candidate():
    det = LoopDetector(min_similarity=0.9, min_gap=10, query_interval=1, max_keyframes=100)
    assert det.add(_kf(0, [1, 0.04, 0])) is None
    assert det.add(_kf(5, [1, 0.2, 0])) is None  # similar, but only 5 frames later
    assert det.add(_kf(12, [0, 1, 0])) is None  # old enough, not similar
    q = det.add(_kf(20, [1, 0.05, 0]))
    assert q is not None and q[:2] == (20, 0)  # 0 beats 5 (more similar); 12 is too different
    assert det.pending == [(20, 0)]
    det2 = LoopDetector(min_similarity=0.9, min_gap=1, query_interval=3, max_keyframes=2)
    hits = [det2.add(_kf(i, [1, 0, 0])) for i in range(1, 8)]
    assert [h is not None for h in hits] == [False, False, True, False, False, True, False]  # every 3rd keyframe
    assert len(det2.keyframes) == 2  # the oldest are forgotten


def drive(oracle: OracleModel, params: SessionParams):
    """The session worker's order of steps, in process: windows, then graph work and loop windows."""
    seq = oracle.seq
    rec = StreamReconstructor(params)
    n = len(seq.images)
    emitted, points, corr = {}, [], {}
    steps = drive.steps = GraphStepLog()  # solve kinds in order, loop windows per model call, loop reports
    for i in range(n):
        rec.add_frame(FrameInput(index=i, frame_id=i, image=seq.images[i], original_size=(0, 0)))
        while (plan := rec.next_window(force=i == n - 1)) is not None:
            out = rec.integrate(plan, oracle.forward_windows([plan.request()])[0])
            assert out.ok, out.reason
            for fr in out.frames:
                emitted[fr["index"]] = (plan.window, np.array(fr["pose"]))
            points.append((plan.window, out.points))
            if rec.maintenance_due:  # the worker maintains after each window's results are out
                rec.maintain()
            if rec.consistency is None:
                continue
            seen = len(steps.corrections)
            run_graph_step(rec, oracle.forward_windows, steps)
            for c in steps.corrections[seen:]:
                corr.update(c.transforms)
    reports, corrections = steps.reports, steps.corrections
    est = np.array([corr.get(emitted[i][0], Sim3.identity()).transform_c2w(emitted[i][1]) for i in range(n)],
                   np.float64)
    gt = seq.c2w.astype(np.float64)
    drive.est = est  # the trajectory a client ends with (corrections applied)
    sim = umeyama_sim3(est[:, :3, 3], gt[:, :3, 3])
    err = np.linalg.norm(sim.s * est[:, :3, 3] @ sim.R.T + sim.t - gt[:, :3, 3], axis=1)
    ate = float(np.sqrt(np.mean(err ** 2)) / trajectory_length(gt))
    return rec, ate, reports, corrections, points, corr


SIZE = {"width": 112, "height": 84}


def params(on: bool) -> SessionParams:
    return SessionParams(process_res=140, window_size=6, overlap=2, global_consistency=on)


@pytest.fixture(scope="module")
def loop_oracle():
    return OracleModel(SceneSpec(num_frames=80, trajectory="loop", **SIZE), errors="realistic", seed=1)


@pytest.mark.slow
def test_a_closed_loop_under_realistic_errors_is_found_verified_and_removes_the_drift(loop_oracle):
    _, ate_off, _, _, _, _ = drive(loop_oracle, params(False))
    rec, ate_on, reports, corrections, _, corr = drive(loop_oracle, params(True))
    accepted = [r for r in reports if r["accepted"]]
    assert accepted and rec.consistency.loops_accepted == len(accepted)
    assert all(r["query"] - r["candidate"] >= rec.params.loop_min_gap for r in accepted)
    assert ate_on < 0.5 * ate_off, (ate_off, ate_on)
    # Corrections: versions increase, transforms are absolute per window (the last one of a window wins).
    versions = [c.version for c in corrections]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    for w, T in corr.items():
        assert np.allclose(T.matrix(), rec.consistency.correction(w).matrix(), atol=1e-9)
    # The last window's report counts the loops.
    cons = rec.consistency
    assert cons.loops_accepted >= 1 and cons.version == len(corrections)
    # Loops are verified in batches, one global solve per batch (not per loop), and the last correction carries
    # the final count (loops verified after the last window reach clients only there).
    assert 1 <= drive.steps.kinds.count("global") < len(accepted), (drive.steps.kinds.count("global"), len(accepted))
    assert max(drive.steps.loop_batches) >= 2  # several candidates due at once went to the model in one call
    assert corrections[-1].loops_accepted == cons.loops_accepted


@pytest.mark.slow
def test_the_look_alike_scene_gives_no_accepted_loop():
    oracle = OracleModel(SceneSpec(num_frames=80, trajectory="lookalike", **SIZE), errors="realistic", seed=1)
    rec, _, reports, _, _, _ = drive(oracle, params(True))
    assert rec.consistency.loops_accepted == 0
    assert not any(r["accepted"] for r in reports)


def test_off_builds_no_graph_and_reports_no_loop_fields(loop_oracle):
    rec = StreamReconstructor(params(False))
    assert rec.consistency is None and rec.graph_prepare() is None and rec.next_loops() == []
    seq = loop_oracle.seq
    for i in range(6):
        rec.add_frame(FrameInput(index=i, frame_id=i, image=seq.images[i], original_size=(0, 0)))
    out = rec.integrate(rec.next_window(), loop_oracle.forward_windows([rec.outstanding[0].request()])[0])
    assert "loops_accepted" not in out.window["alignment"] and "consistency" not in rec.snapshot()


def test_a_correction_moves_world_frames_and_the_occupancy_and_survives_a_snapshot(loop_oracle):
    rec = StreamReconstructor(params(True))
    seq = loop_oracle.seq
    for i in range(14):
        rec.add_frame(FrameInput(index=i, frame_id=i, image=seq.images[i], original_size=(0, 0)))
    outs = []
    while (plan := rec.next_window()) is not None:
        outs.append(rec.integrate(plan, loop_oracle.forward_windows([plan.request()])[0]))
    last = outs[-1].window["window"]
    # A hand-made solution: the newest window moved by a known Sim(3).
    job = rec.graph_prepare() or rec.consistency.prepare()
    d = Sim3(1.01, Sim3.from_matrix(np.eye(4)).R, np.array([0.05, 0.0, 0.0]))
    poses = {last: d.compose(rec.consistency.graph.nodes[last])}
    before = {i: wf.points.copy() for i, wf in rec.world.items() if wf.window == last}
    keys_before = rec.occupancy.kept()[0].copy()
    corr = rec.graph_apply(job, poses)
    assert corr is not None and set(corr.transforms) == {last}
    assert np.allclose(corr.transforms[last].matrix(), d.matrix(), atol=1e-9)
    for i, pts in before.items():
        assert np.allclose(rec.world[i].points, d.apply(pts), atol=1e-4)
    assert rec.maintenance_due
    rec.maintain()
    keys_after = rec.occupancy.kept()[0]
    moved = voxel_keys(d.apply(voxel_centres(np.array(sorted(set(keys_before))), rec.voxel_size)), rec.voxel_size)
    assert len(set(keys_after) & set(moved)) > 0 and not np.array_equal(np.sort(keys_after), np.sort(keys_before))
    # Snapshot / restore carries the graph and the corrections.
    snap = rec.snapshot()
    rec2 = StreamReconstructor.restore(rec.params, snap)
    assert rec2.consistency is not None and rec2.consistency.version == rec.consistency.version
    assert np.allclose(rec2.consistency.correction(last).matrix(), d.matrix(), atol=1e-9)
    assert set(rec2.consistency.graph.nodes) == set(rec.consistency.graph.nodes)


@pytest.mark.slow
def test_a_restored_session_with_pipelined_windows_keeps_placing(loop_oracle):
    """A takeover restores the graph without the newest window's edges (they are fitted after the snapshot):
    that part of the graph has no fixed node, and must move rigidly or not at all, never drift off (it once
    did, to scales of 1e7). Windows planned one ahead, as the worker pipelines them, give two-owner contexts."""
    import pickle

    seq = loop_oracle.seq
    p = params(True)

    def feed(rec, ids):
        for i in ids:
            rec.add_frame(FrameInput(index=i, frame_id=i, image=seq.images[i], original_size=(0, 0)))
        plans = []
        while (plan := rec.next_window(force=True)) is not None:
            plans.append(plan)
        snap = None
        for plan in plans:
            out = rec.integrate(plan, loop_oracle.forward_windows([plan.request()])[0])
            assert out.ok, out.reason
            snap = rec.snapshot()
            job = rec.graph_prepare()
            if job is not None:
                corr = rec.graph_apply(job, Consistency.run_job(job, rec.graph_params))
                for T in (corr.transforms.values() if corr else []):
                    assert 0.8 < T.s < 1.25 and np.abs(T.t).max() < 1.0
        return snap

    snap = feed(StreamReconstructor(p), list(range(16)))
    rec = StreamReconstructor.restore(p, pickle.loads(pickle.dumps(snap)))
    feed(rec, list(range(16, 40)))


def test_a_frame_that_looks_like_an_old_keyframe_becomes_a_keyframe():
    det = LoopDetector(min_similarity=0.9, min_gap=10, query_interval=1, max_keyframes=100)
    det.add(_kf(0, [1, 0, 0]))
    assert det.matches(_kf(20, [1, 0.05, 0]).descriptor, 20)
    assert not det.matches(_kf(5, [1, 0.05, 0]).descriptor, 5)  # too recent
    assert not det.matches(_kf(20, [0, 1, 0]).descriptor, 20)  # not alike
    assert not LoopDetector(0.9, 10, 1, 100).matches(np.array([1.0, 0, 0]), 20)  # no keyframes yet


def test_a_loop_recognisable_only_between_keyframes_is_still_closed(loop_oracle):
    """Sparse keyframes (one every ~9 frames of this 80-frame loop): the only frames alike enough to the start are
    the last few, which the spacing alone would not make keyframes (the loop then depended on where the spacing
    happened to fall, i.e. on the poses: one served run in five closed none). A frame that matches an old keyframe
    is made one, so the loop is queried, verified and closed."""
    p = params(True).model_copy(update={"keyframe_rotation_deg": 40.0, "keyframe_translation": 10.0})
    rec, _, reports, _, _, _ = drive(loop_oracle, p)
    kfs = rec.keyframes
    assert len(kfs) < 20, len(kfs)  # sparse indeed
    assert any(r["accepted"] for r in reports), reports
    assert rec.consistency.loops_accepted >= 1



def _stored_keyframe(oracle: OracleModel, frames: list[int], frame: int, rng) -> tuple[Keyframe, Sim3]:
    """A keyframe as a window on `frames` stores it (points and camera in the window's normalised gauge), and
    that gauge's map from the world (fitted on the window's cameras: the oracle answers exactly here)."""
    seq = oracle.seq
    pred = oracle.forward_windows([WindowRequest(images=seq.images[frames])])[0]
    c2w = invert_pose(pred.extrinsics).astype(np.float64)
    norm = Sim3(1.0 / depth_scale(pred.depth), np.eye(3), np.zeros(3))
    j = frames.index(frame)
    pix = np.sort(rng.choice(pred.depth[j].size, 1500, replace=False)).astype(np.int32)
    kf = Keyframe(frame, frames[0], None, None, pix,
                  norm.apply(unproject_pixels(pred.depth[j], pred.intrinsics[j], c2w[j], pix)),
                  norm.transform_c2w(c2w[j]).astype(np.float64))
    true, est = seq.c2w[frames].astype(np.float64), norm.transform_c2w(c2w).astype(np.float64)
    R = est[0, :3, :3] @ true[0, :3, :3].T
    spread = [np.linalg.norm(x[:, :3, 3] - x[:, :3, 3].mean(0)) for x in (true, est)]
    s = spread[1] / spread[0]
    return kf, Sim3(s, R, est[0, :3, 3] - s * R @ true[0, :3, 3])


def _loop_edge_errors(exact: OracleModel, oracle_seed: int, cand: int, query: int) -> tuple[float, float]:
    """Error (normalised depth units) at the query camera of the loop edge verify_loop gives for a 2-view loop
    window whose depth has the realistic low-frequency warp (3 %), the stored keyframes exact: with
    loop_edge_at_cameras, and with the translation from the points (the edge before)."""
    warped = copy.copy(exact)  # the same rendered scene, another error model
    warped.errors, warped.seed = OracleErrors(depth_warp=0.03), oracle_seed
    rng = np.random.default_rng(0)
    kc, gc = _stored_keyframe(exact, list(range(6)), cand, rng)
    kq, gq = _stored_keyframe(exact, list(range(74, 80)), query, rng)
    pred = warped.forward_windows([WindowRequest(images=exact.seq.images[[cand, query]])])[0]
    keep = np.isfinite(pred.depth) & (pred.depth > 0)
    truth = gc.compose(gq.inverse())  # query gauge -> candidate gauge
    cq = kq.c2w[:3, 3][None]
    out = []
    for pin in (True, False):
        chk = verify_loop(kq, kc, pred.depth, pred.intrinsics, invert_pose(pred.extrinsics), keep, min_inliers=0.7,
                          max_rmse=0.05, min_overlap=0.3, seed=query, pin_cameras=pin)
        assert chk.ok, chk.reason
        out.append(float(np.linalg.norm(chk.z.apply(cq) - truth.apply(cq))))
    return out[0], out[1]


@pytest.fixture(scope="module")
def exact_loop():
    return OracleModel(SceneSpec(num_frames=80, trajectory="loop", **SIZE), errors="none")


@pytest.mark.parametrize("oracle_seed", [1, 2, 3])
def test_a_loop_edge_maps_the_query_camera_where_the_loop_window_puts_it_despite_a_depth_warp(exact_loop,
                                                                                              oracle_seed):
    """Two keyframes either side of the loop's closing point, a loop window whose depth is warped: the edge
    (loop_edge_at_cameras) puts the query camera where the loop window's cameras say, within 0.2 % of the depth;
    a translation fitted to the warped points (the edge before) is off by 1-2.5 %, an error every loop edge of a
    closure shares, which was most of the loop gap left after a closure (bench/README.md)."""
    pinned, free = _loop_edge_errors(exact_loop, oracle_seed, 1, 78)
    assert pinned < 0.002, pinned
    assert free > 0.005, free  # what this removes


@pytest.mark.slow
def test_a_closed_loop_leaves_a_small_gap_under_realistic_errors():
    """The loop gap (last camera against the first, % of the path) after a closure on the realistic error model:
    under 0.3 % with the defaults; the loop edges before (translation from the loop window's warped points, weight
    1 against an odometry edge) left 0.55 % on this draw."""
    oracle = OracleModel(SceneSpec(num_frames=80, trajectory="loop", **SIZE), errors="realistic", seed=4)
    gt = oracle.seq.c2w.astype(np.float64)
    gaps = {}
    for name, extra in (("now", {}), ("before", {"loop_edge_at_cameras": False, "loop_edge_weight": 1.0})):
        p = SessionParams(process_res=140, window_size=6, overlap=2, global_consistency=True, **extra)
        rec, *_ = drive(oracle, p)
        assert rec.consistency.loops_accepted >= 1
        gaps[name] = trajectory_metrics(drive.est, gt)[0].loop_gap_pct
    assert gaps["now"] < 0.3 < gaps["before"], gaps
    assert gaps["now"] < 0.5 * gaps["before"], gaps


def test_a_loop_edge_carries_the_session_s_loop_weight():
    params = SessionParams(global_consistency=True, loop_edge_weight=3.0)
    cons = Consistency(params)
    for k in range(3):
        cons.record_window(k, Sim3(1.0, np.eye(3), np.array([k, 0.0, 0.0])), 1.0, [])
    ok, _, _ = cons.accept_loop(2, 0, Sim3(1.0, np.eye(3), np.array([2.0, 0.0, 0.0])))
    assert ok and [e.weight for e in cons.graph.edges if e.kind == "loop"] == [3.0]
