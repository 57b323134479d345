"""Multi-view fusion of a window's map points (serve_app/recon/fusion.py): confident outliers dropped, the views'
independent depth errors averaged. Pure numpy, no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from serve_app.recon.fusion import bilinear_depth, fuse_points
from serve_app.recon.geometry import unproject_pixels

W, H = 80, 60
K = np.array([[60.0, 0, (W - 1) / 2], [0, 60.0, (H - 1) / 2], [0, 0, 1]])
PLANE_Z = 4.0  # a wall at z = 4 in front of cameras at z = 0, translated along x


def window(n: int = 3, baseline: float = 0.3):
    """Cameras (c2w, w2c) looking down +z from x = 0, baseline, ...; exact z-depth of the wall (constant)."""
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, 0, 3] = np.arange(n) * baseline
    w2c = np.linalg.inv(c2w)[:, :3, :]
    depth = np.full((n, H, W), PLANE_Z)
    return depth, np.tile(K, (n, 1, 1)), c2w, w2c


def blob(cx: int, cy: int, r: int) -> np.ndarray:
    v, u = np.mgrid[0:H, 0:W]
    return (u - cx) ** 2 + (v - cy) ** 2 <= r * r


def test_confident_outlier_blob_is_dropped_and_inliers_stay():
    depth, Ks, c2w, w2c = window()
    out = blob(50, 30, 6)  # a blob view 1 and 2 also see (they look at the same wall, shifted)
    depth[0][out] *= 1.5  # an outlier: 50 % too far, as confident as everything else
    idx = np.arange(H * W)
    pts = unproject_pixels(depth[0], Ks[0], c2w[0], idx)
    fused, keep, agree = fuse_points(pts, depth, Ks, w2c, [1, 2], tol=0.1, min_agree=0)
    flat_out = out.reshape(-1)
    assert not keep[flat_out].any()  # every outlier pixel dropped
    assert keep[~flat_out].all()  # no inlier lost (pixels the others do not see are kept too)
    assert (agree[flat_out] == 0).all() and agree[~flat_out].max() == 2
    assert np.abs(fused[keep][:, 2] - PLANE_Z).max() < 1e-4


def test_points_no_other_view_sees_need_min_agree_0():
    depth, Ks, c2w, w2c = window(baseline=12.0)  # the views do not overlap at all
    depth[0][blob(40, 30, 6)] *= 2.0
    pts = unproject_pixels(depth[0], Ks[0], c2w[0], np.arange(H * W))
    fused, keep, agree = fuse_points(pts, depth, Ks, w2c, [1, 2], tol=0.1, min_agree=0)
    assert keep.all() and not agree.any()  # nothing to judge them by: kept with min_agree 0
    np.testing.assert_allclose(fused, pts, atol=1e-5)
    _, keep, _ = fuse_points(pts, depth, Ks, w2c, [1, 2], tol=0.1)  # the default 1: unconfirmed, dropped
    assert not keep.any()


def test_min_agree_drops_what_too_few_views_confirm():
    depth, Ks, c2w, w2c = window(n=3, baseline=0.3)
    depth[2][blob(30, 30, 8)] *= 1.4  # view 2 is wrong where view 0's points land: only view 1 agrees there
    pts = unproject_pixels(depth[0], Ks[0], c2w[0], np.arange(H * W))
    _, keep1, agree = fuse_points(pts, depth, Ks, w2c, [1, 2], tol=0.1, min_agree=1)
    _, keep2, _ = fuse_points(pts, depth, Ks, w2c, [1, 2], tol=0.1, min_agree=2)
    one = agree == 1
    assert one.sum() > 50 and keep1[one].all() and not keep2[one].any()
    assert keep2[agree == 2].all()


@pytest.mark.parametrize("fuse", [True, False])
def test_fusion_averages_the_views_independent_errors(fuse):
    rng = np.random.default_rng(0)
    depth, Ks, c2w, w2c = window(n=5, baseline=0.1)
    v, u = np.mgrid[0:H, 0:W]
    for j in range(5):  # each view: its own tilt (low frequency) + 1 % pixel noise
        tilt = 1 + 0.02 * rng.normal() * (u - W / 2) / (W / 2) + 0.02 * rng.normal() * (v - H / 2) / (H / 2)
        depth[j] *= tilt * (1 + 0.01 * rng.normal(size=(H, W)))
    idx = np.arange(H * W)
    pts = unproject_pixels(depth[2], Ks[2], c2w[2], idx)
    fused, keep, _ = fuse_points(pts, depth, Ks, w2c, [0, 1, 3, 4], tol=0.1, fuse=fuse)
    assert keep.mean() > 0.95  # all but the border pixels no other view sees
    before = np.abs(pts[:, 2] - PLANE_Z).mean()
    after = np.abs(fused[keep][:, 2] - PLANE_Z).mean()
    if fuse:
        assert after < 0.6 * before  # the mean of up to five independent estimates
    else:
        np.testing.assert_array_equal(fused, pts)


def test_bilinear_depth_interpolates_and_refuses_edges_and_outside():
    d = np.tile(np.arange(1.0, 5.0), (3, 1))  # columns 1, 2, 3, 4 (steps over 10 %: edges)
    assert np.isnan(bilinear_depth(d, np.array([0.5]), np.array([1.0])))[0]
    smooth = np.full((3, 4), 10.0)
    smooth[:, 1] = 10.5
    np.testing.assert_allclose(bilinear_depth(smooth, np.array([0.5, 1.0]), np.array([1.0, 2.0])), [10.25, 10.5])
    assert np.isnan(bilinear_depth(smooth, np.array([-0.1, 3.5, np.nan]), np.array([1.0, 1.0, 1.0]))).all()
    holes = smooth.copy()
    holes[1, 1] = 0.0
    assert np.isnan(bilinear_depth(holes, np.array([1.2]), np.array([1.2])))[0]


@pytest.mark.slow
@pytest.mark.parametrize("tol", [0.0, 0.1])
def test_stream_map_has_no_confident_outlier_blobs(tol):
    """The whole pipeline (oracle with confident outlier blobs, global_consistency on): with the multi-view check
    (tol 0.1, the default) no map point is grossly off the true surface; without it (tol 0) the blobs are there."""
    from serve_app.config import SessionParams
    from serve_app.evaluation.synthetic import SceneSpec, render_sequence
    from serve_app.model.oracle import OracleModel
    from serve_app.recon.alignment import nearest_distances
    from serve_app.recon.reconstruction import FrameInput, StreamReconstructor

    spec = SceneSpec(seed=5, num_frames=18, width=112, height=84, trajectory="orbit")
    seq = render_sequence(spec)
    oracle = OracleModel(spec, scale_range=(1.0, 1.0), seed=1, errors={"outliers": 0.03, "outlier_shape": "blobs"})
    rec = StreamReconstructor(SessionParams(process_res=140, window_size=5, overlap=2, global_consistency=True,
                                            multiview_depth_tol=tol))
    pts = []
    for i in range(len(seq.images)):
        rec.add_frame(FrameInput(index=i, frame_id=i, image=seq.images[i], original_size=(112, 84)))
        while (plan := rec.next_window(force=i == len(seq.images) - 1)) is not None:
            out = rec.integrate(plan, oracle.forward_windows([plan.request()])[0])
            assert out.ok
            pts.append(out.points)
    pts = np.concatenate(pts)
    # The world is frame 0's camera at scale 1 (exact depth but for the outliers): the truth in that frame.
    w2c0 = np.linalg.inv(seq.c2w[0])
    gt = []
    for i in range(len(seq.images)):
        v, u = np.mgrid[0:84, 0:112]
        d = seq.depths[i]
        cam = np.stack([(u - seq.K[0, 2]) / seq.K[0, 0] * d, (v - seq.K[1, 2]) / seq.K[1, 1] * d, d], -1)
        world = cam.reshape(-1, 3) @ seq.c2w[i][:3, :3].T + seq.c2w[i][:3, 3]
        gt.append(world @ w2c0[:3, :3].T + w2c0[:3, 3])
    gt = np.concatenate(gt)[::3]
    dist = nearest_distances(pts[::2], gt)
    gross = float((dist > 0.05 * np.median(seq.depths)).mean())
    if tol:
        assert gross < 0.001
    else:
        assert gross > 0.005  # the blobs (3 % of the pixels, 25-100 % off) reach the map unchecked
