"""Accuracy metrics (serve_app/evaluation/metrics.py) on trajectories and clouds with known errors."""

import numpy as np
import pytest

from serve_app.evaluation.metrics import (
    cloud_metrics,
    drift,
    extent,
    loop_gap,
    rotation_angle_deg,
    rotation_errors_deg,
    rotation_only_errors_deg,
    segment_ate_pct,
    segment_median,
    trajectory_metrics,
)
from serve_app.evaluation.synthetic import SceneSpec, camera_poses, surface_points
from serve_app.recon.geometry import Sim3


def rot(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = np.deg2rad(deg)
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


@pytest.fixture(scope="module")
def loop():
    return camera_poses(SceneSpec(num_frames=120, trajectory="loop"))


def test_perfect_trajectory_in_another_gauge_scores_zero(loop):
    g = Sim3(0.37, rot([1, 2, 3], 70), np.array([5.0, -2.0, 1.0]))
    est = g.transform_c2w(loop)
    m, sim = trajectory_metrics(est, loop)
    assert m.ate_pct < 1e-4 and m.rot_max_deg < 0.01 and m.drift_pct < 1e-4 and m.loop_gap_pct < 1e-4
    assert m.frames == 120 and m.length > 10
    assert sim.s == pytest.approx(1 / 0.37, rel=1e-5)
    # A closed true path measured against itself has no loop gap.
    assert loop_gap(loop, loop, Sim3.identity()) < 1e-12


def test_known_rotation_error_is_measured(loop):
    est = loop.astype(np.float64).copy()
    est[10:, :3, :3] = rot([0, 1, 0.3], 2.0) @ est[10:, :3, :3]  # orientation only: centres untouched
    m, sim = trajectory_metrics(est, loop)
    assert m.ate_pct < 1e-6
    errs = rotation_errors_deg(est, loop, sim)
    np.testing.assert_allclose(errs[:10], 0, atol=1e-4)
    np.testing.assert_allclose(errs[10:], 2.0, atol=1e-4)
    assert m.rot_median_deg == pytest.approx(2.0, abs=1e-4) and m.rot_max_deg == pytest.approx(2.0, abs=1e-4)
    assert rotation_angle_deg(rot([1, 0, 0], 33)) == pytest.approx(33)


def test_rotation_only_error_ignores_a_global_rotation_but_not_a_tilt_of_some_views(loop):
    # A global rotation of all orientations (what a tilted centres-only fit adds) scores zero...
    est = loop.astype(np.float64).copy()
    est[:, :3, :3] = rot([1, 0, 0], 5.0) @ est[:, :3, :3]
    np.testing.assert_allclose(rotation_only_errors_deg(est, loop), 0, atol=1e-5)
    # ...while the centres-only Sim(3) (centres untouched) reads it as 5 degrees everywhere.
    _, sim = trajectory_metrics(est, loop)
    np.testing.assert_allclose(rotation_errors_deg(est, loop, sim), 5.0, atol=1e-4)
    # Half the views turned by 4 degrees: the best single rotation splits it, ~2 degrees each side.
    est = loop.astype(np.float64).copy()
    est[60:, :3, :3] = rot([0, 1, 0], 4.0) @ est[60:, :3, :3]
    errs = rotation_only_errors_deg(est, loop)
    np.testing.assert_allclose(errs, 2.0, atol=0.05)
    # Per-lap medians: growth from lap 1 to lap 3 shows.
    vals = np.concatenate([np.full(40, 1.0), np.full(40, 2.0), np.full(40, 3.0)])
    assert segment_median(vals, 3) == [1.0, 2.0, 3.0]


def test_open_loop_gap_ate_and_drift(loop):
    # The estimate drifts linearly: frame i is pushed i/119 x 0.3 m along x, so it ends 0.3 m from its start.
    est = loop.astype(np.float64).copy()
    est[:, 0, 3] += 0.3 * np.arange(120) / 119
    m, sim = trajectory_metrics(est, loop)
    gap = 100 * 0.3 / m.length
    assert m.loop_gap_pct == pytest.approx(gap, rel=0.05)  # the global fit barely rescales a small drift
    assert 0 < m.ate_pct < gap
    assert m.drift_pct > 0.5 * gap
    assert drift(loop, loop) < 1e-6
    # Error in the last third only (a bad third lap): its segment scores worst.
    bad = loop.astype(np.float64).copy()
    bad[80:, :3, 3] += np.random.default_rng(0).normal(0, 0.1, (40, 3))
    m, sim = trajectory_metrics(bad, loop)
    seg = segment_ate_pct(bad, loop, sim, 3)
    assert len(seg) == 3 and seg[2] > 1.5 * max(seg[0], seg[1])


@pytest.mark.slow
def test_cloud_accuracy_and_completeness_separately():
    spec = SceneSpec(num_frames=24, width=77, height=56, trajectory="loop")
    surf = surface_points(spec, 8000, seed=0)
    diag = extent(surf)
    assert diag > 5
    same = surface_points(spec, 8000, seed=1)
    acc0, comp0 = cloud_metrics(same, surf)
    assert acc0 < 0.01 * diag and comp0 < 0.01 * diag  # sampling floor
    # Half the map missing: accurate but incomplete.
    half = same[same[:, 0] < np.median(same[:, 0])]
    acc, comp = cloud_metrics(half, surf)
    assert acc < 0.01 * diag and comp > 3 * comp0
    # Every point 0.1 m off the surface along a constant direction: inaccurate, complete-ish.
    off = same + np.array([0.0, 0.1, 0.0])
    acc, comp = cloud_metrics(off, surf)
    assert acc > 0.05 and comp < 0.12
    assert np.isnan(cloud_metrics(np.zeros((0, 3)), surf)[0])


def test_straight_path_alignment_uses_orientations():
    # Along a line the centres cannot fix the roll about it: the orientations must (else a perfect estimate in a
    # rolled gauge would read as a huge rotation error).
    line = camera_poses(SceneSpec(num_frames=60, trajectory="lookalike"))
    g = Sim3(2.0, rot([1, 0, 0], 40) @ rot([0, 1, 0], 10), np.array([0.3, 0.0, -1.0]))
    m, _ = trajectory_metrics(g.transform_c2w(line), line)
    assert m.rot_max_deg < 0.01 and m.ate_pct < 1e-3
    noisy = line.astype(np.float64).copy()
    noisy[:, :3, 3] += np.random.default_rng(1).normal(0, 0.02, (60, 3))
    m, _ = trajectory_metrics(g.transform_c2w(noisy), line)
    assert m.rot_median_deg < 0.5  # orientations were untouched: only a little of the centre noise leaks in
