import warnings

import numpy as np
import pytest

from serve_app.recon.geometry import (
    Sim3,
    confidence_mask,
    invert_pose,
    median,
    orthonormalize,
    positive_depths,
    project_points,
    sample_indices,
    to_homogeneous,
    unproject_depth,
    unproject_depths,
    unproject_pixels,
    voxel_downsample,
)


def random_pose(rng):
    T = np.eye(4)
    T[:3, :3] = orthonormalize(rng.normal(size=(3, 3)))
    T[:3, 3] = rng.normal(size=3) * 2
    return T


def random_sim3(rng):
    return Sim3(float(rng.uniform(0.2, 5.0)), orthonormalize(rng.normal(size=(3, 3))), rng.normal(size=3) * 3)


K = np.array([[100.0, 0, 76.5], [0, 100.0, 55.5], [0, 0, 1]])


def test_homogeneous_and_inverse():
    rng = np.random.default_rng(0)
    T = np.stack([random_pose(rng) for _ in range(4)])
    H = to_homogeneous(T[:, :3])
    assert H.shape == (4, 4, 4) and H.dtype == np.float32
    np.testing.assert_allclose(H, T, atol=1e-6)
    inv = invert_pose(T[:, :3])
    np.testing.assert_allclose(inv @ T, np.broadcast_to(np.eye(4), (4, 4, 4)), atol=1e-5)
    np.testing.assert_allclose(invert_pose(T[0]), np.linalg.inv(T[0]), atol=1e-5)


def test_unproject_known_points():
    # Identity camera: the principal-point pixel at depth 2 is (0, 0, 2); pixel (u, v) maps to ((u-cx)z/f, ...).
    depth = np.full((112, 154), 2.0, np.float32)
    pts = unproject_depth(depth, K, np.eye(4))
    assert pts.shape == (112, 154, 3) and pts.dtype == np.float32
    np.testing.assert_allclose(pts[55, 76], [(76 - 76.5) * 2 / 100, (55 - 55.5) * 2 / 100, 2.0], atol=1e-6)
    np.testing.assert_allclose(pts[0, 0], [-76.5 * 0.02, -55.5 * 0.02, 2.0], atol=1e-6)
    # A pure translation of the camera shifts every point by it.
    T = np.eye(4)
    T[:3, 3] = [1, 2, 3]
    np.testing.assert_allclose(unproject_depth(depth, K, T[:3]), pts + [1, 2, 3], atol=1e-5)


def test_unproject_project_round_trip():
    rng = np.random.default_rng(1)
    N, H, W = 3, 20, 30
    depth = rng.uniform(0.5, 10, size=(N, H, W)).astype(np.float32)
    c2w = np.stack([random_pose(rng) for _ in range(N)])
    Ks = np.stack([K] * N)
    pts = unproject_depths(depth, Ks, c2w)
    assert pts.shape == (N, H, W, 3)
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    for i in range(N):
        pix, z = project_points(pts[i], Ks[i], np.linalg.inv(c2w[i]))
        np.testing.assert_allclose(z, depth[i], rtol=1e-4)
        np.testing.assert_allclose(pix[..., 0], u, atol=1e-3)
        np.testing.assert_allclose(pix[..., 1], v, atol=1e-3)
        np.testing.assert_allclose(unproject_depth(depth[i], Ks[i], c2w[i]), pts[i], atol=1e-5)


def test_unproject_pixels_matches_the_dense_unprojection():
    rng = np.random.default_rng(2)
    depth = rng.uniform(0.5, 10, size=(37, 53)).astype(np.float32)
    depth[3, 4] = np.nan
    c2w = random_pose(rng)
    Kr = np.array([[61.0, 0, 25.0], [0, 59.0, 18.0], [0, 0, 1]])
    dense = unproject_depth(depth, Kr, c2w).reshape(-1, 3)
    idx = np.sort(rng.choice(depth.size, size=300, replace=False))
    got = unproject_pixels(depth, Kr, c2w, idx)
    assert got.shape == (300, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, dense[idx], rtol=1e-6, atol=1e-5)
    # row-major indexing: index 3 * 53 + 4 is the NaN pixel (3, 4); corners map to their own rays
    assert np.isnan(unproject_pixels(depth, Kr, c2w, [3 * 53 + 4])).all()
    np.testing.assert_allclose(unproject_pixels(depth, Kr, c2w, [0, depth.size - 1]), dense[[0, -1]], atol=1e-5)
    assert unproject_pixels(depth, Kr, c2w, np.zeros(0, np.int64)).shape == (0, 3)


def test_confidence_mask_percentile_and_depth():
    conf = np.arange(100, dtype=np.float32).reshape(10, 10)
    m = confidence_mask(conf, 40.0)
    assert m.sum() == 60 and m[conf >= 39.6].all() and not m[conf < 39.6].any()
    depth = np.ones_like(conf)
    depth[9, 9] = np.nan
    depth[9, 8] = 0.0
    depth[9, 7] = -1.0
    md = confidence_mask(conf, 40.0, depth=depth)
    assert md.sum() == 57 and not md[9, 7:].any()
    assert confidence_mask(conf, 0.0).all()


def test_confidence_mask_da3_rule():
    # DA3: thr = clamp(base, pct40, pct90); with confidences in [0, 99], base 1.05 -> pct40 (39.6) wins,
    conf = np.arange(100, dtype=np.float32)
    assert confidence_mask(conf, 40.0, base_thresh=1.05).sum() == 60
    # base between the percentiles is used as is, base above pct90 is clamped to it.
    assert confidence_mask(conf, 40.0, base_thresh=70.0).sum() == 30
    assert confidence_mask(conf, 40.0, base_thresh=1000.0).sum() == 10
    conf_nan = conf.copy()
    conf_nan[:5] = np.nan
    assert not confidence_mask(conf_nan, 0.0)[:5].any()


def test_voxel_downsample():
    pts = np.array([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [1.5, 0.2, 0.2], [np.nan, 0, 0]], np.float32)
    cols = np.array([[0, 0, 0], [100, 200, 50], [10, 10, 10], [1, 1, 1]], np.uint8)
    p, c, n = voxel_downsample(pts, cols, 1.0)
    order = np.argsort(p[:, 0])
    p, c, n = p[order], c[order], n[order]
    np.testing.assert_allclose(p, [[0.2, 0.2, 0.2], [1.5, 0.2, 0.2]], atol=1e-6)
    np.testing.assert_array_equal(c, [[50, 100, 25], [10, 10, 10]])
    np.testing.assert_array_equal(n, [2, 1])
    pw, _, _ = voxel_downsample(pts[:2], cols[:2], 1.0, weights=np.array([3.0, 1.0]))
    np.testing.assert_allclose(pw, [[0.15, 0.15, 0.15]], atol=1e-6)
    # Many points: one output per occupied voxel, all within their voxel.
    rng = np.random.default_rng(0)
    many = rng.uniform(-1, 1, size=(5000, 3))
    p, c, n = voxel_downsample(many, np.zeros((5000, 3), np.uint8), 0.5)
    assert len(p) == 64 and n.sum() == 5000
    assert len(np.unique(np.floor(p / 0.5), axis=0)) == 64


def test_sample_indices():
    rng = np.random.default_rng(0)
    pts = np.arange(300, dtype=np.float32).reshape(100, 3)
    cols = pts.astype(np.uint8)
    cand = np.flatnonzero(pts[:, 0] % 2 == 0)  # e.g. the confident pixels
    idx = sample_indices(cand, 10, rng)
    p, c = pts[idx], cols[idx]
    assert len(p) == 10 and np.array_equal(p.astype(np.uint8), c)
    assert len(np.unique(p[:, 0])) == 10 and np.isin(idx, cand).all()
    assert (np.diff(idx) > 0).all()  # original order kept
    assert sample_indices(cand, 1000, rng) is cand


def test_sim3_identities():
    rng = np.random.default_rng(2)
    a, b, c = random_sim3(rng), random_sim3(rng), random_sim3(rng)
    x = rng.normal(size=(50, 3))
    np.testing.assert_allclose(a.compose(b).apply(x), a.apply(b.apply(x)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.compose(a.inverse()).matrix(), np.eye(4), atol=1e-9)
    np.testing.assert_allclose(a.inverse().compose(a).matrix(), np.eye(4), atol=1e-9)
    np.testing.assert_allclose(a.compose(b).compose(c).matrix(), a.compose(b.compose(c)).matrix(), atol=1e-9)
    np.testing.assert_allclose(a.matrix() @ b.matrix(), a.compose(b).matrix(), atol=1e-9)
    np.testing.assert_allclose(Sim3.identity().apply(x), x, atol=1e-6)
    np.testing.assert_allclose(Sim3.from_matrix(a.matrix()).matrix(), a.matrix(), atol=1e-9)
    h = np.c_[x, np.ones(len(x))]
    np.testing.assert_allclose((h @ a.matrix().T)[:, :3], a.apply(x), rtol=1e-5, atol=1e-5)


def test_sim3_transforms_cameras_consistently_with_points():
    # Points unprojected from a camera, then moved by the Sim(3), equal the points unprojected from the moved
    # camera with depth scaled by s.
    rng = np.random.default_rng(3)
    sim = random_sim3(rng)
    c2w = random_pose(rng)
    depth = rng.uniform(1, 5, size=(8, 9))
    moved = sim.transform_c2w(c2w)
    np.testing.assert_allclose(moved[:3, :3] @ moved[:3, :3].T, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(sim.apply(unproject_depth(depth, K, c2w)),
                               unproject_depth(depth * sim.s, K, moved), rtol=1e-4, atol=1e-4)
    w2c = np.linalg.inv(c2w)
    np.testing.assert_allclose(sim.transform_w2c(w2c[:3]), np.linalg.inv(moved), atol=1e-4)
    batch = sim.transform_c2w(np.stack([c2w, c2w]))
    assert batch.shape == (2, 4, 4)
    np.testing.assert_allclose(batch[1], moved, atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((3, 3)), np.zeros((2, 5))])
def test_to_homogeneous_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        to_homogeneous(bad)


def test_confidence_mask_on_large_maps_keeps_the_requested_share():
    # Above PERCENTILE_SAMPLE values the threshold comes from a sample; the kept share stays within half a
    # percent, also for a gradient across columns (a 1-in-9 strided sample aliased: 91.1 % kept at the 10th).
    from serve_app.recon.geometry import PERCENTILE_SAMPLE

    rng = np.random.default_rng(3)
    for conf in (rng.gamma(2.0, 1.0, size=(6, 378, 504)).astype(np.float32),
                 np.broadcast_to(np.linspace(1, 5, 504, dtype=np.float32), (6, 378, 504)).copy()):
        assert conf.size > PERCENTILE_SAMPLE
        for pct in (10.0, 40.0, 90.0):
            kept = confidence_mask(conf, pct).mean()
            assert abs(kept - (1 - pct / 100)) < 0.005, (pct, kept)


def test_median_is_numpy_median_bit_for_bit():
    rng = np.random.default_rng(5)
    cases = [np.zeros(0), np.array([3.0]), np.array([np.nan, 1.0]), np.arange(7), np.arange(8).reshape(2, 4)]
    for _ in range(400):
        n = int(rng.integers(1, 3000))
        x = rng.gamma(2.0, 1.0, n) * 10 ** rng.uniform(-3, 3)
        if rng.random() < 0.3:
            x = np.round(x, 1)  # ties
        cases.append(x.astype(np.float32 if rng.random() < 0.5 else np.float64))
    cases.append(rng.random(190512).astype(np.float32))  # a 504x378 depth map
    for x in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the empty array's "mean of empty slice"
            want, got = float(np.median(x)), median(x)
        assert (got == want) or (np.isnan(got) and np.isnan(want)), (x.dtype, x.size, got, want)


def test_positive_depths_keeps_order_and_skips_the_copy_when_it_can():
    d = np.linspace(0.5, 3.0, 12, dtype=np.float32).reshape(3, 4)
    out = positive_depths(d)
    assert np.shares_memory(out, d) and np.array_equal(out, d.reshape(-1))
    d[0, 1], d[1, 2], d[2, 3] = np.nan, 0.0, np.inf
    out = positive_depths(d)
    assert not np.shares_memory(out, d) and np.array_equal(out, d[np.isfinite(d) & (d > 0)])


@pytest.mark.parametrize("holes", [False, True])
def test_confidence_mask_equals_its_definition_on_large_maps(holes):
    """The mask is conf >= the percentile of (a fixed sample of) the finite confidences, with finite positive
    depth; the all-finite case (no copies) and the case with holes give exactly that."""
    from serve_app.recon.geometry import PERCENTILE_SAMPLE

    rng = np.random.default_rng(11)
    conf = rng.gamma(2.0, 1.0, size=(6, 378, 504)).astype(np.float32)
    depth = rng.uniform(0.5, 4.0, size=conf.shape).astype(np.float32)
    if holes:
        conf.reshape(-1)[rng.integers(0, conf.size, 5000)] = np.nan
        conf.reshape(-1)[rng.integers(0, conf.size, 50)] = np.inf
        depth.reshape(-1)[rng.integers(0, depth.size, 5000)] = 0.0
    finite = np.isfinite(conf)
    vals = conf[finite]
    vals = vals[np.random.default_rng(0).integers(0, vals.size, PERCENTILE_SAMPLE)]
    want = finite & (conf >= np.percentile(vals, 40.0)) & np.isfinite(depth) & (depth > 0)
    for _ in range(2):  # the second call reuses the cached sample positions
        assert np.array_equal(confidence_mask(conf, 40.0, depth=depth), want)
