import numpy as np
import pytest

from serve_app.recon.alignment import (
    ate_rmse,
    chamfer_distance,
    robust_scale_about_centres,
    robust_scale_translation,
    robust_sim3,
    trajectory_length,
    umeyama_sim3,
)
from serve_app.recon.geometry import Sim3, orthonormalize


def random_sim3(rng, s=None):
    return Sim3(float(rng.uniform(0.2, 5.0)) if s is None else s, orthonormalize(rng.normal(size=(3, 3))),
                rng.normal(size=3) * 3)


def cloud(rng, n=2000):
    return rng.normal(size=(n, 3)) * [3.0, 1.0, 2.0]


def sim_error(a: Sim3, b: Sim3):
    return abs(a.s - b.s) / b.s, float(np.abs(a.R - b.R).max()), float(np.abs(a.t - b.t).max())


@pytest.mark.parametrize("seed", range(4))
def test_umeyama_exact_without_noise(seed):
    rng = np.random.default_rng(seed)
    gt = random_sim3(rng)
    src = cloud(rng, 200)
    est = umeyama_sim3(src, gt.apply(src).astype(np.float64))
    ds, dR, dt = sim_error(est, gt)
    assert ds < 1e-5 and dR < 1e-5 and dt < 1e-4
    assert np.linalg.det(est.R) > 0


def test_umeyama_under_noise_and_weights():
    rng = np.random.default_rng(10)
    gt = random_sim3(rng)
    src = cloud(rng, 5000)
    dst = gt.apply(src) + rng.normal(size=src.shape) * 0.01
    ds, dR, dt = sim_error(umeyama_sim3(src, dst), gt)
    assert ds < 2e-3 and dR < 2e-3 and dt < 0.01 * gt.s + 0.01
    # Zero weights exclude corrupted points exactly.
    dst[:100] += 50.0
    w = np.ones(len(src))
    w[:100] = 0.0
    ds, dR, dt = sim_error(umeyama_sim3(src, dst, w), gt)
    assert ds < 2e-3 and dR < 2e-3


def test_umeyama_corrects_reflection():
    rng = np.random.default_rng(3)
    src = cloud(rng, 100)
    mirrored = src * [-1, 1, 1]
    assert np.linalg.det(umeyama_sim3(src, mirrored).R) > 0


@pytest.mark.parametrize("seed", range(3))
def test_robust_recovers_with_30pct_outliers_where_umeyama_fails(seed):
    rng = np.random.default_rng(seed)
    gt = random_sim3(rng)
    src = cloud(rng, 3000)
    dst = gt.apply(src) + rng.normal(size=src.shape) * 0.01
    k = int(0.3 * len(src))
    dst[:k] += rng.normal(size=(k, 3)) * 3.0 + 6.0  # one-sided gross outliers
    res = robust_sim3(src, dst)
    assert res.ok and res.reason is None
    ds, dR, dt = sim_error(res.sim3, gt)
    assert ds < 5e-3 and dR < 5e-3 and dt < 0.02
    assert 0.65 <= res.inlier_ratio <= 0.75
    assert res.rmse < 0.05 and res.num_points == len(src) and res.scale == pytest.approx(res.sim3.s)
    plain = umeyama_sim3(src, dst)
    assert sim_error(plain, gt)[2] > 0.5  # plain least squares is dragged far away


def test_robust_uses_confidence_weights_and_subsamples():
    rng = np.random.default_rng(5)
    gt = random_sim3(rng)
    src = cloud(rng, 4000)
    dst = gt.apply(src) + rng.normal(size=src.shape) * 0.005
    res = robust_sim3(src, dst, np.full(len(src), 0.5), max_points=1000)
    assert res.ok and res.num_points == 1000
    assert sim_error(res.sim3, gt)[0] < 5e-3
    # Non-finite rows are dropped when enough valid points remain.
    src2 = src.copy()
    src2[:10] = np.nan
    res2 = robust_sim3(src2, dst)
    assert res2.ok and res2.num_points == len(src) - 10


def _degenerate_cases():
    rng = np.random.default_rng(7)
    src = cloud(rng, 500)
    gt = random_sim3(rng, s=1.5)
    dst = gt.apply(src).astype(np.float64)
    line = np.outer(np.linspace(-1, 1, 500), [1.0, 2.0, 0.5])
    nan = src.copy()
    nan[:] = np.nan
    return {
        "too few": (src[:20], dst[:20], None, "too few"),
        "zero weights": (src, dst, np.zeros(len(src)), "too few"),
        "collinear": (line, gt.apply(line), None, "collinear"),
        "nan": (nan, dst, None, "non-finite"),
        "zero scale": (src, np.zeros_like(dst) + 3.0, None, "no spread"),
        "scale out of bounds": (src, dst * 1e-6, None, "scale"),
        "mismatched": (src, dst[:10], None, "differ"),
        "bad weights": (src, dst, np.ones(3), "weights"),
    }


@pytest.mark.parametrize("case", list(_degenerate_cases()))
def test_robust_reports_degenerate_cases(case):
    src, dst, w, fragment = _degenerate_cases()[case]
    res = robust_sim3(src, dst, w)
    assert res.ok is False
    assert fragment in res.reason


def test_ate_zero_for_sim3_copy_and_positive_for_perturbed():
    rng = np.random.default_rng(8)
    n = 20
    gt = np.tile(np.eye(4), (n, 1, 1))
    th = np.linspace(0, 2 * np.pi, n)
    gt[:, :3, 3] = np.c_[np.cos(th) * 2, np.sin(3 * th) * 0.2, np.sin(th)]
    sim = random_sim3(rng)
    est = sim.transform_c2w(gt).astype(np.float64)
    err, est_sim = ate_rmse(est, gt)
    assert err < 1e-5
    np.testing.assert_allclose(est_sim.compose(sim).matrix(), np.eye(4), atol=1e-4)
    est[5, :3, 3] += [0.5, 0, 0]
    assert ate_rmse(est, gt)[0] > 0.01
    assert trajectory_length(gt) == pytest.approx(np.linalg.norm(np.diff(gt[:, :3, 3], axis=0), axis=1).sum())


@pytest.mark.slow
def test_chamfer():
    rng = np.random.default_rng(9)
    a = rng.uniform(-1, 1, size=(3000, 3)) + 100.0  # far from the origin: precision must hold
    assert chamfer_distance(a, a) < 1e-6
    d1 = chamfer_distance(a, a + [0.05, 0, 0])
    d2 = chamfer_distance(a, a + [0.2, 0, 0])
    d3 = chamfer_distance(a, a + [1.0, 0, 0])
    assert 0 < d1 < d2 < d3
    far = chamfer_distance(a, a + [10.0, 0, 0])  # cubes of side 2, gap 8: every NN distance in [8, 10.4]
    assert 8.0 < far < 10.4
    # Symmetric, and subsampling keeps it close.
    b = rng.uniform(-1, 1, size=(2000, 3)) + 100.2
    assert chamfer_distance(a, b) == pytest.approx(chamfer_distance(b, a), rel=1e-9)
    assert chamfer_distance(a, b, max_points=1000) == pytest.approx(chamfer_distance(a, b), rel=0.3)


def _view(rng, n=3000):
    """A camera (centre, rotation) and n points 2-4 units in front of it, with their rays' pixel coordinates."""
    R = orthonormalize(rng.normal(size=(3, 3)))
    c = rng.normal(size=3)
    xy = rng.uniform(-0.6, 0.6, size=(n, 2))
    z = rng.uniform(2.0, 4.0, size=n)
    cam = np.column_stack([xy * z[:, None], z])
    return c, R, xy, cam @ R.T + c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_about_centres_is_exact_and_pins_the_camera(seed):
    rng = np.random.default_rng(seed)
    c, _, _, src = _view(rng)
    T = random_sim3(rng)
    res = robust_scale_about_centres(src, T.apply(src), T.R, c, T.apply(c[None])[0])
    assert res.ok and res.rmse < 1e-5 * T.s  # (float32 targets: the Huber cut on exact data is rounding)
    ds, dR, dt = sim_error(res.sim3, T)
    assert ds < 1e-6 and dR < 1e-9 and dt < 1e-5 * (1 + np.abs(T.t).max())
    # 30 % gross outliers (depth x0.5..x2 along the rays, as confident as the rest): the scale holds.
    dst = T.apply(src).astype(np.float64)
    bad = rng.random(len(src)) < 0.3
    dst[bad] = T.apply(c + (src[bad] - c) * rng.uniform(0.5, 2.0, size=(bad.sum(), 1)))
    res = robust_scale_about_centres(src, dst, T.R, c, T.apply(c[None])[0])
    assert res.ok and abs(res.scale / T.s - 1) < 1e-3, res.scale / T.s


def test_a_warped_view_moves_the_free_translation_not_the_pinned_camera():
    """A low-frequency depth warp (tilt + bowl, a few %) of the source view: the free scale + translation fit
    shifts the camera by percents of the depth, the pinned fit keeps it where its other prediction is."""
    rng = np.random.default_rng(7)
    c, _, xy, src = _view(rng)
    T = random_sim3(rng, s=1.0)
    u = xy / 0.6  # image coordinates in [-1, 1]
    warp = 1.0 + 0.03 * u[:, 0] - 0.02 * u[:, 1] + 0.03 * ((u ** 2).sum(1) - 2.0 / 3.0)
    warped = c + (src - c) * warp[:, None]
    dst = T.apply(src)
    c_dst = T.apply(c[None])[0].astype(np.float64)
    free = robust_scale_translation(warped, dst, T.R)
    pinned = robust_scale_about_centres(warped, dst, T.R, c, c_dst)
    depth = 3.0
    shift_free = np.linalg.norm(free.sim3.apply(c[None])[0] - c_dst) / depth
    shift_pinned = np.linalg.norm(pinned.sim3.apply(c[None])[0] - c_dst) / depth
    assert shift_free > 0.005, shift_free  # ~1 % of the depth: the bias pinning removes
    assert shift_pinned < 1e-5, shift_pinned
    assert abs(pinned.scale - 1.0) < 0.03  # the warp's mean, a few %


def test_scale_about_centres_reports_degenerate_input():
    rng = np.random.default_rng(3)
    c, _, _, src = _view(rng, n=30)
    assert not robust_scale_about_centres(src, src, np.eye(3), c, c).ok  # fewer than min_points
    c, _, _, src = _view(rng)
    src[:] = np.nan
    assert not robust_scale_about_centres(src, src, np.eye(3), c, c).ok
