"""Multi-view depth refinement (serve_app/recon/depth_refine.py) on synthetic windows with a known depth warp. No Ray."""

import numpy as np
import pytest

from serve_app.config import SessionParams
from serve_app.evaluation.synthetic import SceneSpec, render_sequence
from serve_app.model.oracle import OracleModel, warp_basis
from serve_app.prediction import WindowRequest
from serve_app.recon.depth_refine import basis_at, field, refine_window
from serve_app.recon.geometry import confidence_mask, invert_pose
from serve_app.recon.plan import FrameInput
from serve_app.recon.reconstruction import StreamReconstructor

W, H = 154, 112
SPEC = SceneSpec(seed=3, num_frames=40, width=W, height=H, trajectory="loop", loops=1)


@pytest.fixture(scope="module")
def seq():
    return render_sequence(SPEC)


def window(seq, errors, start, n=6, seed=1):
    """(prediction with errors, error-free prediction) of frames start..start+n-1 (same gauge and scale)."""
    req = WindowRequest(images=np.stack(seq.images[start:start + n]))
    bad = OracleModel(SPEC, seed=seed, errors=errors).forward_windows([req])[0]
    good = OracleModel(SPEC, seed=seed, errors={"preset": "none"}).forward_windows([req])[0]
    return bad, good


def log_error(depth, truth):
    """Median |log depth error| after the common scale (which no multi-view check can see)."""
    m = truth > 0
    e = np.log(depth[m] / truth[m])
    return float(np.median(np.abs(e - np.median(e))))


def refine(pred, **kw):
    keep = confidence_mask(pred.conf, 20.0, depth=pred.depth)
    return refine_window(pred.depth, pred.intrinsics, invert_pose(pred.extrinsics), keep, **kw)


def test_basis_is_tilt_tilt_bowl_with_zero_mean_and_unit_rms():
    v, u = np.mgrid[0:H, 0:W]
    B = basis_at(u.ravel(), v.ravel(), H, W)
    assert B.shape == (H * W, 3)
    np.testing.assert_allclose(B.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(np.sqrt((B ** 2).mean(0)), 1, atol=1e-9)
    # The same span as the oracle's warp (tilt x, tilt y, bowl): any oracle warp is one of these fields.
    ob = warp_basis(H, W).reshape(3, -1).T
    coef, *_ = np.linalg.lstsq(B, ob, rcond=None)
    np.testing.assert_allclose(B @ coef, ob, atol=1e-9)
    np.testing.assert_allclose(field(np.array([[0.1, 0, 0]]), H, W)[0].ravel(), 0.1 * B[:, 0], atol=1e-12)


@pytest.mark.parametrize("start", [0, 10, 20])
def test_a_known_warp_is_mostly_removed(seq, start):
    bad, good = window(seq, {"depth_warp": 0.03}, start)
    res = refine(bad)
    assert res.ok and res.rms_after < 0.5 * res.rms_before
    # Each view's true field (the warp is exactly such a field), up to the part all views share (the gauge).
    v, u = np.mgrid[0:H, 0:W]
    B = basis_at(u.ravel(), v.ravel(), H, W)
    true = np.stack([np.linalg.lstsq(B, np.log(bad.depth[j] / good.depth[j]).ravel(), rcond=None)[0]
                     for j in range(len(bad.depth))])
    true -= true.mean(0)
    assert np.abs(res.coef - true).mean() < 0.5 * np.abs(true).mean()
    before, after = log_error(bad.depth, good.depth), log_error(res.depth, good.depth)
    assert before > 0.01
    assert after < 0.75 * before, (before, after)
    np.testing.assert_allclose(res.c2w, invert_pose(bad.extrinsics), atol=1e-6)  # fields only: cameras kept


@pytest.mark.slow
def test_realistic_errors_still_leave_less_warp(seq):
    """Warp + pixel noise + confident outlier blobs + pose noise + weakly informative confidence, over windows."""
    before, after = [], []
    for start in range(0, 30, 6):
        bad, good = window(seq, {"preset": "realistic"}, start)
        res = refine(bad, frame_index=np.arange(start, start + 6), max_gap=3)
        assert res.ok
        before.append(log_error(bad.depth, good.depth))
        after.append(log_error(res.depth, good.depth))
    assert np.mean(after) < 0.75 * np.mean(before), (before, after)


def test_error_free_window_is_left_as_it_is(seq):
    bad, _ = window(seq, {"preset": "none"}, 5)
    res = refine(bad)
    assert res.ok
    assert np.abs(res.coef).max() < 2e-3
    np.testing.assert_allclose(res.depth, bad.depth, rtol=5e-3)


def test_pose_noise_alone_is_corrected_when_poses_are_fitted(seq):
    bad, good = window(seq, {"pose_noise_deg": 0.5}, 8)
    res = refine(bad, fit_poses=True, iters=4)
    c2w, truth = invert_pose(bad.extrinsics), invert_pose(good.extrinsics)

    def rot_err(a):
        R = a[:, :3, :3] @ np.swapaxes(truth[:, :3, :3], 1, 2)
        return np.degrees(np.arccos(np.clip((np.trace(R, axis1=1, axis2=2) - 1) / 2, -1, 1))).mean()

    assert rot_err(res.c2w) < 0.5 * rot_err(c2w)
    np.testing.assert_allclose(res.c2w[0], c2w[0], atol=1e-9)  # view 0 is the gauge


def test_views_too_far_apart_are_not_compared_and_stay_unchanged(seq):
    bad, _ = window(seq, {"depth_warp": 0.03}, 0)
    res = refine(bad, frame_index=np.array([0, 1, 2, 3, 4, 40]), max_gap=3)
    assert res.ok
    np.testing.assert_allclose(res.coef[5], 0, atol=1e-9)
    np.testing.assert_array_equal(res.depth[5], bad.depth[5])


def test_a_single_view_is_refused_unchanged(seq):
    bad, _ = window(seq, {"depth_warp": 0.03}, 0, n=1)
    res = refine(bad)
    assert not res.ok and res.reason
    assert res.depth is bad.depth


@pytest.mark.slow
def test_the_reconstructor_uses_it_when_asked(seq):
    """depth_refine on: every window reports the refinement, and the map is closer to the true depth."""
    oracle = OracleModel(SPEC, seed=1, errors={"depth_warp": 0.03})

    def stream(mode):
        rec = StreamReconstructor(SessionParams(process_res=W, window_size=6, overlap=2, depth_refine=mode))
        outs = []
        for i, img in enumerate(seq.images[:24]):
            rec.add_frame(FrameInput(index=i, frame_id=i, image=img, original_size=(W, H)))
            while (plan := rec.next_window()) is not None:
                outs.append(rec.integrate(plan, oracle.forward_windows([plan.request()])[0]))
        return outs

    off, on = stream("off"), stream("field")
    assert all(o.ok for o in off + on) and len(on) == len(off) > 3
    assert all(o.window["alignment"]["depth_refine"]["ok"] for o in on[1:])
    assert "depth_refine" not in off[1].window["alignment"]
    # The window-to-world alignment residual (its views against the world's) falls once the warps are gone.
    rmse = [np.median([o.window["alignment"]["rmse"] / o.window["alignment"]["scale"] for o in outs[1:]])
            for outs in (off, on)]
    assert rmse[1] < 0.8 * rmse[0], rmse


def test_it_is_on_by_default():
    p = SessionParams()
    assert p.depth_refine == "field" and p.depth_refine_samples == 100


def test_a_sparse_mask_still_gets_its_samples_and_the_fit(seq):
    """Samples are drawn uniformly over the image and kept where the mask allows; a mask too sparse for that
    (here 8 % of the pixels) falls back to listing its pixels, and the warp is still mostly removed."""
    bad, good = window(seq, {"depth_warp": 0.03}, 10)
    keep = np.zeros(bad.depth.shape, bool)
    keep[:, ::4, ::3] = True
    res = refine_window(bad.depth, bad.intrinsics, invert_pose(bad.extrinsics), keep, samples_per_view=100)
    assert res.ok and res.rms_after < 0.5 * res.rms_before
    assert log_error(res.depth, good.depth) < 0.75 * log_error(bad.depth, good.depth)


def test_white_noise_has_no_warp_to_remove_and_is_left_as_it_is(seq):
    """Per-pixel noise makes the views disagree, but no low-order field explains it: the fit would only move the
    depth by its noise, so nothing is changed (a warped window is refined: the tests above)."""
    bad, _ = window(seq, {"preset": "white"}, 10)
    res = refine(bad)
    assert res.ok and res.rms_before > 0.005
    assert res.rms_after == res.rms_before and not res.coef.any()
    assert res.depth is bad.depth
