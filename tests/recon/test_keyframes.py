"""Keyframes, map dedupe, client pose priors and bounded memory of the streaming reconstructor (oracle windows)."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.config import SessionParams
from serve_app.evaluation.synthetic import SceneSpec, render_sequence
from serve_app.model.oracle import OracleModel
from serve_app.recon.alignment import ate_rmse, trajectory_length
from serve_app.recon.geometry import invert_pose
from serve_app.recon.reconstruction import (
    FrameInput,
    StreamReconstructor,
    VoxelOccupancy,
    is_keyframe,
    prior_sim3,
    voxel_keys,
)

W, H = 112, 84  # small frames keep the oracle's re-rendering cheap
ORBIT = SceneSpec(seed=5, num_frames=30, width=W, height=H, trajectory="orbit")
SLOW = SceneSpec(seed=5, num_frames=60, width=W, height=H, trajectory="orbit")  # ~1 in 7 frames not a keyframe
STATIC = SceneSpec(seed=5, num_frames=16, width=W, height=H, trajectory="static")


@pytest.fixture(scope="module")
def orbit():
    return render_sequence(ORBIT)


@pytest.fixture(scope="module")
def slow():
    return render_sequence(SLOW)


def params(**kw) -> SessionParams:
    return SessionParams(**{"process_res": 140, "window_size": 5, "overlap": 2, **kw})


def stream(seq, p, oracle, order=None, depth=1, priors=False, each=None, prior_c2w=None):
    """Feed frames seq[order] (repeats allowed) with `depth` windows in flight, like the ingress does.
    `priors`: every frame carries its true pose and intrinsics as client priors (or `prior_c2w[i]` as its pose)."""
    prior_c2w = seq.c2w if prior_c2w is None else prior_c2w
    rec = StreamReconstructor(p)
    order = list(range(len(seq.images))) if order is None else list(order)
    outs, queue = [], []

    def integrate(plan):
        outs.append(rec.integrate(plan, oracle.forward_windows([plan.request()])[0]))

    for n, i in enumerate(order):
        rec.add_frame(FrameInput(index=n, frame_id=i, image=seq.images[i], original_size=(W, H),
                                 pose=prior_c2w[i] if priors else None, intrinsics=seq.K if priors else None))
        while (plan := rec.next_window(force=n == len(order) - 1)) is not None:
            queue.append(plan)
            while len(queue) >= depth:
                integrate(queue.pop(0))
        if each is not None:
            each(n, rec)
    for plan in queue:
        integrate(plan)
    return rec, outs


def results(outs):
    return sorted((f for o in outs for f in o.frames), key=lambda f: f["index"])


def surface_error(pts, seq, n=3000, seed=0):
    """Per map point (a sample of n): the smallest relative gap, over the sequence's cameras, between its depth
    and the true depth at the pixel it projects to; ~0 for points on the true surface."""
    p = np.asarray(pts, np.float64)
    p = p[np.random.default_rng(seed).choice(len(p), size=min(n, len(p)), replace=False)]
    w2c = invert_pose(seq.c2w).astype(np.float64)
    cam = np.einsum("nij,mj->nmi", w2c[:, :3, :3], p) + w2c[:, None, :3, 3]
    z = cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.rint(seq.K[0, 0] * cam[..., 0] / z + seq.K[0, 2])
        v = np.rint(seq.K[1, 1] * cam[..., 1] / z + seq.K[1, 2])
    ok = (z > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    frame = np.broadcast_to(np.arange(len(w2c))[:, None], z.shape)
    d = np.full(z.shape, np.nan)
    d[ok] = seq.depths[frame[ok], v[ok].astype(int), u[ok].astype(int)]
    return np.where(ok, np.abs(z - d) / d, np.inf).min(0)


def poses(outs):
    fr = [f for f in results(outs) if f["pose"] is not None]
    return [f["frame_id"] for f in fr], np.stack([np.array(f["pose"]) for f in fr])


# --- keyframes ----------------------------------------------------------------------------------------------

def test_keyframe_rule():
    ref = np.eye(4)
    moved, turned = np.eye(4), np.eye(4)
    moved[:3, 3] = [0.0, 0.0, 0.2]
    c, s = np.cos(np.radians(6)), np.sin(np.radians(6))
    turned[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    assert is_keyframe(ref, None, 0.0, 0.05, 5.0)  # the first frame always is
    assert not is_keyframe(ref, ref, 3.0, 0.05, 5.0)
    assert not is_keyframe(moved, ref, 5.0, 0.05, 5.0)  # 0.2 < 0.05 x 5
    assert is_keyframe(moved, ref, 3.0, 0.05, 5.0)  # 0.2 >= 0.05 x 3
    assert is_keyframe(turned, ref, 3.0, 0.05, 5.0) and not is_keyframe(turned, ref, 3.0, 0.05, 7.0)


@pytest.mark.parametrize("depth", [1, 3])
def test_static_camera_adds_points_only_in_the_first_window(depth):
    seq = render_sequence(STATIC)
    rec, outs = stream(seq, params(), OracleModel(STATIC, seed=1), depth=depth)
    fr = results(outs)
    assert [f["index"] for f in fr] == list(range(STATIC.num_frames)) and all(o.ok for o in outs)
    assert [f["keyframe"] for f in fr] == [True] + [False] * (STATIC.num_frames - 1)
    assert len(outs[0].points) > 0 and outs[0].frames[0]["points_added"] == len(outs[0].points)
    assert all(len(o.points) == 0 for o in outs[1:]) and all(f["points_added"] == 0 for f in fr[1:])
    for f in fr:  # world = first window's gauge = frame 0's camera: every pose is the identity
        np.testing.assert_allclose(np.array(f["pose"]), np.eye(4), atol=1e-4)
    # the keyframe stays in the context through the static stretch (once integration has reported it)
    assert all(0 in [c for c in o.window["context_frame_ids"]] for o in outs[depth:])
    assert len(rec.world) <= params().overlap + params().window_size


@pytest.mark.parametrize("noise,limit", [(0.0, 1e-3), (0.02, 1e-2)])
@pytest.mark.slow
def test_moving_camera_keeps_accuracy(slow, noise, limit):
    length = trajectory_length(slow.c2w)
    p = params(window_size=6, overlap=3)
    _rec, outs = stream(slow, p, OracleModel(SLOW, depth_noise=noise, seed=3), depth=2)
    ids, est = poses(outs)
    assert ids == list(range(SLOW.num_frames))
    rmse, _ = ate_rmse(est, slow.c2w[ids])
    assert rmse / length < limit
    fr = results(outs)
    skipped = [f for f in fr if not f["keyframe"]]
    assert 0 < len(skipped) < len(fr) / 2 and all(f["points_added"] == 0 for f in skipped)
    if noise:
        # Keyframe context under pipelining is no worse than the plain "last overlap frames" rule
        # (every frame a keyframe, no pipelining).
        plain = params(window_size=6, overlap=3, keyframe_translation=0.0, keyframe_rotation_deg=0.0)
        _, base = stream(slow, plain, OracleModel(SLOW, depth_noise=noise, seed=3), depth=1)
        ids_b, est_b = poses(base)
        assert all(f["keyframe"] for f in results(base))
        assert rmse <= 1.25 * ate_rmse(est_b, slow.c2w[ids_b])[0]


# --- dedupe -------------------------------------------------------------------------------------------------

def test_voxel_occupancy_keeps_the_newest_within_capacity():
    occ = VoxelOccupancy(capacity=5)
    occ.add(np.array([30, 10, 20]))
    assert occ.contains(np.array([10, 20, 30, 40])).tolist() == [True, True, True, False]
    occ.add(np.array([5, 50, 40]))  # six keys: the oldest (30) is forgotten
    assert len(occ) == 5 and occ.contains(np.array([30, 10, 5, 40])).tolist() == [False, True, True, True]
    keys, order = occ.kept()
    assert keys.tolist() == [5, 10, 20, 40, 50] and order.tolist() == [3, 1, 2, 5, 4]
    # add_sorted (keys in key order + their insertion rank) is add() without the sort: same state
    other = VoxelOccupancy(capacity=5)
    other.add_sorted(np.array([10, 20, 30]), np.array([1, 2, 0]))
    other.add_sorted(np.array([5, 40, 50]), np.array([0, 2, 1]))
    assert [a.tolist() for a in other.kept()] == [keys.tolist(), order.tolist()]
    k = voxel_keys(np.array([[0.05, 0.05, 0.05], [0.09, 0.01, 0.0], [-0.01, 0.0, 0.0], [0.0, 0.1, 0.0]]), 0.1)
    assert k[0] == k[1] and len(set(k.tolist())) == 3


@pytest.mark.parametrize("capacity", [40, 700, 100_000])
def test_voxel_occupancy_levels_match_a_plain_newest_n_set(capacity):
    """Recent/main levels, compaction at any time, forgetting and re-adding forgotten keys: always the same set
    as 'the newest `capacity` keys inserted', and the arrays stay bounded."""
    rng = np.random.default_rng(capacity)
    occ = VoxelOccupancy(capacity)
    occ.RECENT_MIN = 32  # levels and compactions at test sizes
    history: list[int] = []  # keys in insertion order
    for step in range(400):
        keys = np.unique(rng.integers(0, 2000, size=int(rng.integers(1, 120))))
        newest = set(history[-capacity:])
        got = occ.contains(keys)
        assert got.tolist() == [int(k) in newest for k in keys], step
        new = keys[~got]
        rank = rng.permutation(len(new))
        occ.add_sorted(new, rank)
        history += new[np.argsort(rank)].tolist()
        assert len(occ) == min(len(history), capacity)
        if step % 7 == 0 and occ.compaction_due:
            occ.compact()
        held = len(occ.main_keys) + len(occ.recent_keys)
        assert held <= len(occ) + occ.HARD_FACTOR * max(occ.RECENT_MIN, len(occ.main_keys) // 8) + len(new)
    keys, order = occ.kept()
    newest = history[-capacity:]
    assert keys.tolist() == sorted(newest) and len(occ.recent_keys) == 0
    assert keys[np.argsort(order)].tolist() == newest  # counters give the insertion order back


@pytest.mark.slow
def test_integrate_leaves_the_occupancy_merge_to_maintain(orbit):
    """integrate() inserts into the small recent level only; maintain() (run by the session worker after a
    window is delivered) merges it into the map-sized level, with the same voxel set either way."""
    p = params()
    lazy, outs = stream(orbit, p, OracleModel(ORBIT, seed=2))
    eager, outs2 = stream(orbit, p, OracleModel(ORBIT, seed=2), each=lambda n, rec: rec.maintain())
    assert len(lazy.occupancy.main_keys) == 0 < len(lazy.occupancy.recent_keys)  # below RECENT_MIN
    assert len(eager.occupancy.recent_keys) == 0 < len(eager.occupancy.main_keys)
    assert [a.tolist() for a in lazy.occupancy.kept()] == [a.tolist() for a in eager.occupancy.kept()]
    assert all(np.array_equal(a.points, b.points) for a, b in zip(outs, outs2))


@pytest.mark.slow
def test_revisiting_the_orbit_does_not_duplicate_points(orbit):
    n = ORBIT.num_frames
    order = list(range(n)) * 2
    rec, outs = stream(orbit, params(), OracleModel(ORBIT, seed=2), order=order)
    fr = results(outs)
    assert len(fr) == 2 * n and all(o.ok for o in outs)
    lap1 = sum(f["points_added"] for f in fr[:n])
    total = sum(len(o.points) for o in outs)
    assert total == sum(f["points_added"] for f in fr)  # per-frame attribution is exact
    assert lap1 > 0 and total < 1.3 * lap1
    # one point per voxel over the whole map
    pts = np.concatenate([o.points for o in outs])
    assert len(np.unique(voxel_keys(pts, rec.voxel_size))) == len(pts)
    # and the merged points are still on the surface
    ids, est = poses(outs)
    _, sim = ate_rmse(est, orbit.c2w[ids])
    err = surface_error(sim.apply(pts), orbit)
    assert np.median(err) < 1e-3 and np.percentile(err, 90) < 0.01


# --- client priors ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pose_priors_put_the_stream_in_the_client_world(orbit):
    _rec, outs = stream(orbit, params(), OracleModel(ORBIT, scale_range=(0.3, 3.0), seed=4), priors=True, depth=2)
    assert all(o.ok and o.window["alignment"]["mode"] == "priors" for o in outs)
    ids, est = poses(outs)
    assert ids == list(range(ORBIT.num_frames))
    gt = orbit.c2w[ids].astype(np.float64)
    length = trajectory_length(gt)
    # no Sim(3) fit: the poses are in the ground-truth world, metric
    assert np.abs(est[:, :3, 3] - gt[:, :3, 3]).max() / length < 1e-3
    np.testing.assert_allclose(est[:, :3, :3], gt[:, :3, :3], atol=1e-3)
    err = surface_error(np.concatenate([o.points for o in outs]), orbit)  # the map too, as it is
    assert np.median(err) < 1e-3 and np.percentile(err, 90) < 0.01


def test_window_request_carries_priors_only_when_every_frame_has_them(orbit):
    rec = StreamReconstructor(params())
    for i in range(5):
        rec.add_frame(FrameInput(index=i, frame_id=i, image=orbit.images[i], original_size=(W, H),
                                 pose=orbit.c2w[i], intrinsics=orbit.K))
    req = rec.next_window().request()
    np.testing.assert_allclose(req.extrinsics, invert_pose(orbit.c2w[:5]), atol=1e-5)
    assert req.extrinsics.shape == (5, 4, 4) and req.intrinsics.shape == (5, 3, 3)
    for i in range(5, 8):
        rec.add_frame(FrameInput(index=i, frame_id=i, image=orbit.images[i], original_size=(W, H),
                                 pose=orbit.c2w[i] if i != 6 else None, intrinsics=orbit.K))
    req = rec.next_window().request()
    assert req.extrinsics is None and req.intrinsics.shape == (5, 3, 3)


@pytest.mark.slow
def test_priors_without_baseline_fall_back(orbit):
    seq = render_sequence(STATIC)
    _, outs = stream(seq, params(), OracleModel(STATIC, seed=1), priors=True)
    modes = [o.window["alignment"]["mode"] for o in outs]
    assert modes[0] == "priors_rigid" and set(modes[1:]) == {"dense"}
    assert all("prior_fallback" in o.window["alignment"] for o in outs)
    for f in results(outs):  # rotation and position still come from the priors
        np.testing.assert_allclose(np.array(f["pose"]), seq.c2w[0], atol=1e-4)
    # the pure fit: collinear but distinct centres are enough; priors that contradict the cameras are refused
    pred = orbit.c2w[:5].astype(np.float64)
    sim, _info = prior_sim3(pred, pred * 1.0, depth=3.0)
    assert sim is not None and abs(sim.s - 1.0) < 1e-9
    bad = pred.copy()
    bad[:, :3, 3] = bad[::-1, :3, 3]
    assert prior_sim3(pred, bad, depth=3.0)[0] is None


@pytest.mark.parametrize("corrupt", ["reversed", "scattered"])
@pytest.mark.slow
def test_priors_the_fit_refuses_on_the_first_window_place_it_rigidly(orbit, corrupt):
    """Priors the fit refuses on the very first window (a negative scale, or centres that disagree with the
    cameras): there is no world to align to, so the window goes into the client's world at the model's scale and
    the stream goes on (this raised a KeyError before)."""
    p = params()
    wrong = orbit.c2w.astype(np.float64).copy()
    first = wrong[:p.window_size, :3, 3]
    if corrupt == "reversed":
        first[:] = first[::-1]
    else:
        first += np.random.default_rng(0).normal(scale=2.0, size=first.shape)
    _, outs = stream(orbit, p, OracleModel(ORBIT, seed=3), priors=True, prior_c2w=wrong)
    align = outs[0].window["alignment"]
    assert align["mode"] == "priors_rigid" and align["prior_fallback"].startswith("pose priors")
    assert "baseline" not in align["prior_fallback"]
    assert all(o.ok for o in outs) and len(results(outs)) == ORBIT.num_frames
    assert {o.window["alignment"]["mode"] for o in outs[1:]} <= {"priors", "dense"}


# --- context choice -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("reach", [0, 2])
def test_the_keyframe_context_reaches_back_the_configured_windows(orbit, reach):
    """Planned one window ahead (a real-time client), the keyframe context view comes from at least
    `context_reach_windows` windows' worth of new frames before the newest context view; with 0 it is the newest
    keyframe, in the previous window."""
    p = params(context_reach_windows=reach)
    _, outs = stream(orbit, p, OracleModel(ORBIT, seed=6))
    gaps = [ids[-1] - ids[0] for o in outs if len(ids := o.window["context_frame_ids"]) == 2]
    assert len(gaps) >= 4 and all(o.ok for o in outs)
    late = gaps[3:]  # once enough keyframes are placed
    if reach:
        assert min(late) >= reach * (p.window_size - p.overlap)
    else:
        assert max(late) < p.window_size - p.overlap


@pytest.mark.parametrize("window_size,overlap", [(5, 2), (6, 3)])
def test_only_the_keyframes_a_later_window_can_reach_are_kept_and_the_choice_is_unchanged(orbit, window_size,
                                                                                          overlap):
    """Every frame a keyframe (the worst case for memory and the snapshot): the context is still the newest
    overlap-1 keyframes at least the reach behind the newest context view, as if every keyframe were kept, while
    the world keeps about one keyframe per step of new frames in reach, not all of them."""
    p = params(window_size=window_size, overlap=overlap, context_reach_windows=2, keyframe_translation=0.0,
               keyframe_rotation_deg=0.0)
    reach = 2 * (window_size - overlap)
    sizes = []
    _, outs = stream(orbit, p, OracleModel(ORBIT, seed=6), each=lambda n, r: sizes.append(len(r.world)))
    assert all(o.ok for o in outs) and all(f["keyframe"] for f in results(outs))
    last = None
    for o in outs:
        ids = o.window["context_frame_ids"]
        if last is not None and last - reach >= overlap - 2:  # enough keyframes behind the reach
            assert ids == list(range(last - reach - overlap + 2, last - reach + 1)) + [last], (ids, last)
        last = o.window["frame_ids"][-1]
    # the newest k, k behind the edge, k-1 per step in reach (2 steps); every keyframe in reach: k + reach + k
    assert max(sizes) <= 2 * overlap + 2 * (overlap - 1) and max(sizes) < 2 * overlap + reach


# --- memory -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_points,frames", [(2_000_000, 100), (3000, 45)])
@pytest.mark.slow
def test_memory_is_bounded_on_a_long_stream(orbit, max_points, frames):
    """Laps of the same orbit: dedupe saturates the map, the world keeps only context candidates, and a small
    point budget caps the occupancy (oldest voxels forgotten)."""
    mem = {}

    def each(n, rec):
        if n + 1 in (30, frames):
            mem[n + 1] = rec.memory_bytes()

    p = params(max_points=max_points)
    order = [i % ORBIT.num_frames for i in range(frames)]
    rec, outs = stream(orbit, p, OracleModel(ORBIT, seed=6), order=order, each=each)
    assert len(results(outs)) == frames and all(o.ok for o in outs)
    assert mem[30] > 0 and mem[frames] <= 1.2 * mem[30]
    reach = p.context_reach_windows * (p.window_size - p.overlap)  # keyframes a later window may reach back to
    assert len(rec.occupancy) <= max_points and len(rec.world) <= p.overlap + p.window_size + reach
    if max_points < 10_000:
        assert len(rec.occupancy) == max_points  # full, and forgetting the oldest voxels
