import cv2
import numpy as np
import pytest

from serve_app.evaluation.synthetic import SceneSpec, render_view, scale_intrinsics
from serve_app.model.oracle import OracleModel
from serve_app.prediction import WindowPrediction, WindowRequest
from serve_app.recon.alignment import ate_rmse, umeyama_sim3
from serve_app.recon.geometry import invert_pose, unproject_depth

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


@pytest.mark.slow
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


# --- error model (config.OracleErrors) ----------------------------------------------------------------------

from serve_app.config import ORACLE_ERROR_PRESETS, ModelConfig, OracleErrors
from serve_app.model.oracle import draw_window_errors, image_descriptor, warp_basis

H_, W_ = 56, 77


def draws(errors, windows=60, n=6):
    return [draw_window_errors(errors, [11, i], n, H_, W_) for i in range(windows)]


def spearman(a, b):
    ra = np.argsort(np.argsort(np.ravel(a))).astype(float)
    rb = np.argsort(np.argsort(np.ravel(b))).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def test_error_presets_and_legacy_fields():
    assert OracleErrors.model_validate("none") == OracleErrors(preset="none")
    r = OracleErrors.model_validate("realistic")
    assert (r.depth_warp, r.pixel_noise, r.outliers, r.pose_noise_deg) == (0.03, 0.01, 0.01, 0.5)
    assert 0 < r.conf_informative < 1 and r.outlier_shape == "blobs"
    w = OracleErrors.model_validate({"preset": "white", "pixel_noise": 0.05})  # fields override the preset
    assert w.pixel_noise == 0.05 and w.outliers == ORACLE_ERROR_PRESETS["white"]["outliers"]
    assert not OracleErrors().any and r.any
    with pytest.raises(ValueError, match="unknown preset"):
        OracleErrors.model_validate("bad")
    with pytest.raises(ValueError):
        OracleErrors(depth_warp=-0.1)
    with pytest.raises(ValueError):
        OracleErrors(conf_informative=1.5)
    # ModelConfig: the preset by name; the legacy fields map onto the model; both spellings at once refused.
    assert ModelConfig(backend="oracle", oracle_errors="realistic").oracle_error_model() == r
    legacy = ModelConfig(backend="oracle", oracle_depth_noise=0.02, oracle_pose_noise=1.0).oracle_error_model()
    assert (legacy.pixel_noise, legacy.pose_noise_deg, legacy.conf_informative, legacy.depth_warp) == \
        (0.02, 1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="oracle_errors"):
        ModelConfig(backend="oracle", oracle_errors="white", oracle_depth_noise=0.02)
    with pytest.raises(ValueError):
        OracleModel(SPEC, depth_noise=0.02, errors="white")


def test_depth_warp_statistics():
    ws = draws(OracleErrors(depth_warp=0.03))
    warp = np.stack([w.warp for w in ws])  # (windows, views, H, W)
    assert abs(warp.std() - 0.03) < 0.003 and abs(warp.mean() - 1.0) < 0.002
    # Low frequency: every view's warp is exactly 1 + tilt + bowl (a 3-term fit leaves nothing), and views differ.
    B = warp_basis(H_, W_).reshape(3, -1).T
    for v in warp.reshape(-1, H_ * W_)[:20]:
        coef, *_ = np.linalg.lstsq(B, v - 1.0, rcond=None)
        np.testing.assert_allclose(B @ coef, v - 1.0, atol=1e-9)
    per_view = warp.reshape(-1, H_ * W_).std(axis=1)
    assert per_view.std() > 0.005  # each view draws its own shape
    # Nothing else is switched on.
    w = ws[0]
    assert (w.noise == 1).all() and not w.outlier.any() and np.allclose(w.rotations, np.eye(3))


def test_pixel_noise_statistics():
    ws = draws(OracleErrors(pixel_noise=0.02), windows=20)
    noise = np.stack([w.noise for w in ws])
    assert abs(noise.std() - 0.02) < 0.001 and abs(noise.mean() - 1.0) < 0.001
    # White: neighbouring pixels are uncorrelated.
    a, b = (noise[..., :-1] - 1).ravel(), (noise[..., 1:] - 1).ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02


@pytest.mark.parametrize("shape", ["blobs", "pixels"])
def test_outliers_fraction_factors_and_ordinary_confidence(shape):
    import cv2 as _cv2

    errs = OracleErrors(outliers=0.02, outlier_shape=shape, pixel_noise=0.01, depth_warp=0.03,
                        conf_informative=0.3)
    ws = draws(errs, windows=20)
    want = round(0.02 * H_ * W_)
    comps = []
    for w in ws:
        assert all(int(m.sum()) == want for m in w.outlier)
        f = w.outlier_factor[w.outlier]
        assert ((f >= 0.5 - 1e-9) & (f <= 0.8 + 1e-9) | (f >= 1.25 - 1e-9) & (f <= 2.0 + 1e-9)).all()
        assert (w.outlier_factor[~w.outlier] == 1).all()
        comps += [_cv2.connectedComponents(m.astype(np.uint8), connectivity=8)[0] - 1 for m in w.outlier]
    if shape == "blobs":
        assert np.mean(comps) < 6  # a few compact blobs
    else:
        assert np.mean(comps) > 0.7 * want  # scattered pixels
    # Outliers are as confident as the other pixels.
    conf = np.stack([w.conf for w in ws])
    mask = np.stack([w.outlier for w in ws])
    assert abs(np.median(conf[mask]) - np.median(conf[~mask])) < 0.1


def test_pose_noise_angle_distribution():
    p = 0.5
    ws = draws(OracleErrors(pose_noise_deg=p), windows=200)
    ang = np.concatenate([w.rotation_deg[1:] for w in ws])
    assert all(w.rotation_deg[0] == 0 and (w.centre_noise[0] == 0).all() for w in ws)  # view 0 is the gauge
    # Angle |N(0, p)|: half-normal mean p sqrt(2/pi) and rms p.
    assert abs(ang.mean() - p * np.sqrt(2 / np.pi)) < 0.03
    assert abs(np.sqrt((ang ** 2).mean()) - p) < 0.03
    c = np.concatenate([w.centre_noise[1:] for w in ws])
    assert abs(c.std() - np.deg2rad(p)) < 0.1 * np.deg2rad(p)
    R = np.concatenate([w.rotations for w in ws])
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-9)


def test_confidence_informativeness_knob():
    def rho(k):
        rs = []
        for w in draws(OracleErrors(depth_warp=0.03, pixel_noise=0.01, conf_informative=k), windows=10):
            rs.append(spearman(w.conf, np.abs(w.warp * w.noise - 1)))
        return float(np.mean(rs))

    r1, r_mid, r0 = rho(1.0), rho(0.3), rho(0.0)
    assert r1 < -0.99  # knows the error: confidence falls monotonically with it
    assert abs(r0) < 0.1  # a random smooth field
    assert r1 < r_mid < r0 - 0.1  # weakly informative in between
    # Knob 1 without errors: fully confident everywhere (the noise-free oracle of before).
    assert (draws(OracleErrors(), windows=1)[0].conf == 1).all()
    # Knob 0: the confidence is smooth (low frequency), not per-pixel noise.
    c = draws(OracleErrors(conf_informative=0.0), windows=1)[0].conf
    assert np.corrcoef(c[:, :, :-1].ravel(), c[:, :, 1:].ravel())[0, 1] > 0.95


@pytest.mark.slow
def test_forward_applies_drawn_errors():
    errs = OracleErrors.model_validate("realistic")
    o = OracleModel(SPEC, scale_range=(1.0, 1.0), seed=5, errors=errs)
    idx = [3, 4, 5, 6]
    p, again = o.forward_windows([window(o, idx), window(o, [0, 1])])[0], o.forward_windows([window(o, idx)])[0]
    np.testing.assert_array_equal(p.depth, again.depth)  # deterministic, independent of batching
    np.testing.assert_array_equal(p.conf, again.conf)
    import zlib

    streams = [5, zlib.crc32(np.asarray(idx, dtype=np.int64).tobytes())]
    drawn = draw_window_errors(errs, streams, 4, 112, 154)
    gt = np.stack([render_view(SPEC, o.seq.c2w[i], o.seq.K, 154, 112)[1] for i in idx])
    np.testing.assert_allclose(p.depth, gt * drawn.depth_factor, rtol=1e-5)
    np.testing.assert_allclose(p.conf, drawn.conf, rtol=1e-6)
    c2w = invert_pose(p.extrinsics)
    gt_rel = np.linalg.inv(o.seq.c2w[idx[0]].astype(np.float64)) @ o.seq.c2w[idx].astype(np.float64)
    np.testing.assert_allclose(c2w[:, :3, :3], drawn.rotations @ gt_rel[:, :3, :3], atol=1e-5)
    med = float(np.median(gt))
    np.testing.assert_allclose(c2w[:, :3, 3], gt_rel[:, :3, 3] + drawn.centre_noise * med, atol=1e-4)
    assert o.info()["errors"]["depth_warp"] == 0.03


def test_descriptors_from_the_image_only():
    o = OracleModel(SPEC, seed=0, errors="realistic")
    p = o.forward_windows([window(o, [2, 3, 4])])[0]
    assert p.descriptors.shape == (3, 144) and p.descriptors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(p.descriptors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p.descriptors, image_descriptor(np.stack([jpeg(o.seq.images[i]) for i in [2, 3, 4]])),
                               atol=1e-6)
    # Robust to coding and resizing; nearby views more alike than distant ones.
    d = image_descriptor(o.seq.images)
    d2 = image_descriptor(np.stack([resized(jpeg(im), (112, 84)) for im in o.seq.images]))
    assert (np.einsum("nd,nd->n", d, d2) > 0.98).all()
    assert d[4] @ d[5] > d[4] @ d[12]
