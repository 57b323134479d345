import cv2
import numpy as np
import pytest

from serve_app.alignment import ate_rmse, umeyama_sim3
from serve_app.geometry import invert_pose, unproject_depth
from serve_app.oracle import OracleModel
from serve_app.prediction import WindowPrediction, WindowRequest
from serve_app.synthetic import SceneSpec, render_view, scale_intrinsics

SPEC = SceneSpec(num_frames=16, width=154, height=112, speed=1 / 3)  # 7.5 deg per frame


@pytest.fixture(scope="module")
def oracle():
    return OracleModel(SPEC, scale_range=(0.5, 2.0), seed=0)


def resized(img, size, interp=cv2.INTER_LINEAR):
    return cv2.resize(img, size, interpolation=interp)


def jpeg(img, q=90):
    _ok, enc = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1]


def png(img):
    _ok, enc = cv2.imencode(".png", img[..., ::-1])
    return cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1]


def test_contract(oracle):
    assert oracle.model_name == "oracle" and oracle.any_view and not oracle.is_metric
    oracle.health_check()
    info = oracle.info()
    assert info["model_name"] == "oracle" and info["num_frames"] == 16 and info["scene"] == SPEC.to_dict()
    assert OracleModel(SPEC.to_dict()).spec == SPEC


def test_identification_survives_coding_and_resizing(oracle):
    for i in (0, 5, 11, 15):
        img = oracle.seq.images[i]
        assert oracle.identify(png(img))[0] == i
        assert oracle.identify(jpeg(img))[0] == i
        assert oracle.identify(resized(jpeg(img), (518, 378), cv2.INTER_CUBIC))[0] == i
        assert oracle.identify(resized(img, (98, 70), cv2.INTER_AREA))[0] == i
        assert oracle.identify(resized(png(img), (154, 126)))[0] == i  # aspect changed too


def test_unknown_image_rejected(oracle):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        oracle.identify(rng.integers(0, 255, (112, 154, 3), dtype=np.uint8))
    other = OracleModel(SceneSpec(seed=5, num_frames=2))
    with pytest.raises(ValueError):
        oracle.forward_windows([WindowRequest(images=other.seq.images[:1])])


def window(oracle, idx, size=(154, 112)):
    imgs = np.stack([resized(jpeg(oracle.seq.images[i]), size) for i in idx])
    return WindowRequest(images=imgs)


def test_window_gauge_and_depth(oracle):
    idx = [2, 3, 4, 5]
    W, H = 112, 84
    pred = oracle.forward_windows([window(oracle, idx, (W, H))])[0]
    assert isinstance(pred, WindowPrediction) and pred.hw == (H, W) and pred.num_views == 4
    assert pred.depth.dtype == np.float32 and pred.extrinsics.shape == (4, 3, 4) and pred.conf.shape == (4, H, W)
    np.testing.assert_allclose(pred.extrinsics[0], np.eye(4)[:3], atol=1e-7)
    K = scale_intrinsics(oracle.seq.K, (154, 112), (W, H))
    np.testing.assert_allclose(pred.intrinsics, np.broadcast_to(K, (4, 3, 3)))
    gt = np.stack([render_view(SPEC, oracle.seq.c2w[i], K, W, H)[1] for i in idx])
    ratio = pred.depth / gt
    s = float(ratio.mean())
    assert 0.5 <= s <= 2.0
    np.testing.assert_allclose(ratio, s, rtol=1e-5)
    # Poses: relative to view 0, translations scaled by the same s as the depth.
    c2w = invert_pose(pred.extrinsics)
    gt_rel = np.linalg.inv(oracle.seq.c2w[idx[0]].astype(np.float64)) @ oracle.seq.c2w[idx].astype(np.float64)
    np.testing.assert_allclose(c2w[:, :3, :3], gt_rel[:, :3, :3], atol=1e-5)
    np.testing.assert_allclose(c2w[:, :3, 3], s * gt_rel[:, :3, 3], atol=1e-4)
    # Same frames, same answer regardless of batching; other frames draw another scale.
    again = oracle.forward_windows([window(oracle, [9, 10]), window(oracle, idx, (W, H))])[1]
    np.testing.assert_array_equal(again.depth, pred.depth)
    other = oracle.forward_windows([window(oracle, [3, 4, 5, 6], (W, H))])[0]
    assert abs(float(np.median(other.depth[0] / gt[1])) - s) > 1e-3


def test_chaining_windows_recovers_relative_poses(oracle):
    # Two windows sharing frame 5: a Sim(3) from the shared frame's points chains them into one gauge whose
    # poses equal the ground truth up to one global similarity.
    a_idx, b_idx = [2, 3, 4, 5], [5, 6, 7, 8]
    pa, pb = oracle.forward_windows([window(oracle, a_idx), window(oracle, b_idx)])
    ca, cb = invert_pose(pa.extrinsics), invert_pose(pb.extrinsics)
    src = unproject_depth(pb.depth[0], pb.intrinsics[0], cb[0]).reshape(-1, 3)
    dst = unproject_depth(pa.depth[3], pa.intrinsics[3], ca[3]).reshape(-1, 3)
    sim = umeyama_sim3(src, dst)
    chained = np.concatenate([ca, sim.transform_c2w(cb[1:])])
    gt = oracle.seq.c2w[a_idx + b_idx[1:]]
    err, g = ate_rmse(chained, gt)
    assert err < 1e-3
    # Rotations agree too once the global rotation is removed.
    rel = np.einsum("ij,njk->nik", g.R, chained[:, :3, :3].astype(np.float64))
    np.testing.assert_allclose(rel, gt[:, :3, :3], atol=1e-4)


def test_noise_options():
    o = OracleModel(SPEC, depth_noise=0.02, pose_noise=1.0, seed=3)
    idx = [0, 1, 2]
    req = WindowRequest(images=o.seq.images[idx])
    p = o.forward_windows([req])[0]
    gt = np.stack([render_view(SPEC, o.seq.c2w[i], o.seq.K, 154, 112)[1] for i in idx])
    ratio = p.depth / gt
    rel = ratio / np.median(ratio)
    assert 0.01 < rel.std() < 0.03
    assert p.conf.min() < 0.5 and p.conf.max() <= 1.0
    # Noisier pixels get lower confidence.
    err = np.abs(rel - 1)
    assert err[p.conf > 0.9].mean() < err[p.conf < 0.5].mean()
    np.testing.assert_allclose(p.extrinsics[0], np.eye(4)[:3], atol=1e-7)
    c2w = invert_pose(p.extrinsics)
    gt_rel = np.linalg.inv(o.seq.c2w[0].astype(np.float64)) @ o.seq.c2w[idx].astype(np.float64)
    ang = np.degrees(np.arccos(np.clip((np.trace(c2w[1:, :3, :3].transpose(0, 2, 1) @ gt_rel[1:, :3, :3],
                                                 axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert (ang < 5).all() and (ang > 1e-3).any()
