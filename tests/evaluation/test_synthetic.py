import json

import cv2
import numpy as np
import pytest

from serve_app.evaluation.scenes import ROOM_MAX, ROOM_MIN
from serve_app.evaluation.synthetic import (
    SceneSpec,
    camera_intrinsics,
    camera_poses,
    load_groundtruth,
    look_at,
    main,
    render_sequence,
    render_view,
    scale_intrinsics,
    surface_points,
    write_sequence,
)
from serve_app.recon.geometry import project_points, unproject_depth

SMALL = SceneSpec(num_frames=12, width=154, height=112, speed=0.25)  # 7.5 deg steps, as 48 frames a lap


@pytest.fixture(scope="module")
def seq():
    return render_sequence(SMALL)


def test_spec_round_trip_and_validation():
    spec = SceneSpec(seed=3, trajectory="line", speed=0.5)
    assert SceneSpec.from_dict(spec.to_dict()) == spec
    assert SceneSpec.from_dict({"seed": 2, "unknown": 1}).seed == 2
    with pytest.raises(ValueError):
        SceneSpec(trajectory="spiral")


def test_wall_facing_camera_sees_constant_depth():
    # A camera 1 m from the +x wall, looking straight at it: z-depth is 1 at every pixel.
    c2w = look_at(np.array([3.0, 1.5, -3.0]), np.array([4.0, 1.5, -3.0]))
    K = camera_intrinsics(SMALL)
    rgb, depth = render_view(SMALL, c2w, K, 154, 112)
    assert rgb.shape == (112, 154, 3) and rgb.dtype == np.uint8 and depth.dtype == np.float32
    np.testing.assert_allclose(depth, 1.0, rtol=1e-5)
    assert rgb.std() > 10  # textured, not flat


def test_depth_matches_analytic_room_planes():
    # Looking into a corner away from the objects: depth is the nearest room plane along each pixel ray.
    c2w = look_at(np.array([2.5, 1.2, -2.5]), np.array([4.0, 0.8, -4.0]))
    W, H = 77, 56
    K = camera_intrinsics(SMALL, W, H)
    _, depth = render_view(SMALL, c2w, K, W, H)
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T @ c2w[:3, :3].T
    o = c2w[:3, 3]
    t = np.full((H, W), np.inf)
    for ax in range(3):
        for bound in (ROOM_MIN[ax], ROOM_MAX[ax]):
            with np.errstate(divide="ignore"):
                ti = (bound - o[ax]) / rays[..., ax]
            t = np.where((ti > 0) & (ti < t), ti, t)
    np.testing.assert_allclose(depth, t, rtol=1e-5)


def test_intrinsics_and_scaling():
    K = camera_intrinsics(SMALL)
    assert K[0, 0] == pytest.approx(77 / np.tan(np.pi / 6)) and K[0, 2] == pytest.approx(76.5)
    # Scaling the native K to another size equals the K built for that size (same fov, centred).
    np.testing.assert_allclose(scale_intrinsics(K, (154, 112), (308, 224)), camera_intrinsics(SMALL, 308, 224),
                               rtol=1e-6)


@pytest.mark.slow
def test_sequence_shapes_determinism_and_motion(seq):
    assert seq.images.shape == (12, 112, 154, 3) and seq.depths.shape == (12, 112, 154)
    assert seq.c2w.shape == (12, 4, 4) and np.isfinite(seq.depths).all() and (seq.depths > 0.3).all()
    again = render_sequence(SMALL)
    assert np.array_equal(again.images, seq.images)
    other = render_sequence(SceneSpec(seed=1, num_frames=2))
    assert not np.array_equal(other.images[0], seq.images[0])
    diffs = np.abs(np.diff(seq.images.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert (diffs > 5).all()  # consecutive frames differ
    R = seq.c2w[:, :3, :3]
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
    centres = seq.c2w[:, :3, 3]
    assert (np.abs(centres[:, 1] - 1.5) < 0.2).all()


def test_trajectories():
    static = camera_poses(SceneSpec(num_frames=5, trajectory="static"))
    assert np.allclose(static, static[0])
    line = camera_poses(SceneSpec(num_frames=5, trajectory="line"))
    c = line[:, :3, 3]
    assert np.allclose(c[:, 0], c[0, 0]) and (np.diff(c[:, 2]) > 0).all()
    fwd = line[:, :3, 2]
    assert (fwd[:, 2] > 0.8).all()  # looking roughly along the motion


def test_multiview_consistency(seq):
    # Reproject frame i's pixels into frame j: where visible, frame j's colour there matches frame i's.
    K = seq.K
    for i, j in [(0, 1), (5, 6), (3, 5)]:
        pts = unproject_depth(seq.depths[i], K, seq.c2w[i])
        pix, z = project_points(pts, K, np.linalg.inv(seq.c2w[j]))
        mapx, mapy = pix[..., 0].astype(np.float32), pix[..., 1].astype(np.float32)
        inside = (mapx >= 0) & (mapx <= 153) & (mapy >= 0) & (mapy <= 111) & (z > 0)
        dj = cv2.remap(seq.depths[j], mapx, mapy, cv2.INTER_NEAREST)
        visible = inside & (np.abs(dj - z) < 0.01 * z)
        assert visible.mean() > 0.3
        col = cv2.remap(seq.images[j], mapx, mapy, cv2.INTER_LINEAR).astype(np.float32)
        err = np.abs(col - seq.images[i].astype(np.float32)).mean(-1)[visible]
        assert np.median(err) < 12
        # A wrong pose (swap j for a far frame) must not look consistent.
        pix_bad, _ = project_points(pts, K, np.linalg.inv(seq.c2w[(j + 6) % 12]))
        bad = cv2.remap(seq.images[j], pix_bad[..., 0].astype(np.float32), pix_bad[..., 1].astype(np.float32),
                        cv2.INTER_LINEAR).astype(np.float32)
        assert np.median(np.abs(bad - seq.images[i]).mean(-1)[visible]) > 2 * np.median(err)


def test_surface_points(seq):
    pts = surface_points(SMALL, 5000, seed=0, seq=seq)
    assert pts.shape == (5000, 3)
    assert (pts >= ROOM_MIN - 1e-3).all() and (pts <= ROOM_MAX + 1e-3).all()
    # Points lie on a room plane or on an object inside the room: spread over the visible walls.
    assert np.ptp(pts[:, 0]) > 4 and np.ptp(pts[:, 2]) > 4


def test_write_and_load(tmp_path, seq):
    paths = write_sequence(seq, tmp_path, save_depth=True)
    assert [p.name for p in paths[:2]] == ["frame_00000.png", "frame_00001.png"] and len(paths) == 12
    img = cv2.imread(str(paths[3]))[..., ::-1]
    assert np.array_equal(img, seq.images[3])
    gt = load_groundtruth(tmp_path)
    assert gt["spec"] == SMALL and gt["image_size"] == [154, 112]
    np.testing.assert_allclose(gt["c2w"], seq.c2w)
    np.testing.assert_allclose(gt["K"], seq.K)
    np.testing.assert_array_equal(gt["depths"], seq.depths)
    assert json.loads((tmp_path / "groundtruth.json").read_text())["frames"][0] == "frame_00000.png"


def test_cli(tmp_path):
    main(["--out", str(tmp_path), "--frames", "3", "--size", "70x56", "--seed", "4", "--trajectory", "line"])
    gt = load_groundtruth(tmp_path)
    assert gt["spec"].seed == 4 and gt["spec"].trajectory == "line" and len(gt["frames"]) == 3
    assert cv2.imread(str(gt["frames"][0])).shape == (56, 70, 3)


# --- loop and look-alike scenes -------------------------------------------------------------------------

def test_loop_path_ends_where_it_starts():
    one = camera_poses(SceneSpec(num_frames=120, trajectory="loop"))
    np.testing.assert_allclose(one[-1], one[0], atol=1e-9)
    c = one[:, :3, 3]
    steps = np.linalg.norm(np.diff(c, axis=0), axis=1)
    assert steps.min() > 0.05 and steps.max() < 0.2  # smooth, always moving
    # A real loop, not an out-and-back: half way round the camera is far from the start and looks elsewhere.
    assert np.linalg.norm(c[60] - c[0]) > 4.0 and one[60, :3, 2] @ one[0, :3, 2] < 0
    # Keeps > 1 m from the objects at the room centre and inside the room.
    assert (np.linalg.norm(c[:, [0, 2]], axis=1) > 2.0).all() and (np.abs(c[:, [0, 2]]) < 3.0).all()
    three = camera_poses(SceneSpec(num_frames=360, trajectory="loop", loops=3))
    np.testing.assert_allclose(three[-1], three[0], atol=1e-9)
    # Each lap revisits the first: every frame of laps 2 and 3 is within one step of a frame of lap 1.
    c3 = three[:, :3, 3]
    d = np.linalg.norm(c3[120:, None] - c3[None, :120], axis=-1).min(axis=1)
    assert d.max() < 0.1
    with pytest.raises(ValueError):
        SceneSpec(trajectory="loop", loops=0)


@pytest.mark.slow
def test_loop_views_see_the_room():
    spec = SceneSpec(num_frames=120, trajectory="loop")
    seq = render_sequence(SceneSpec(num_frames=120, trajectory="loop", width=77, height=56))
    assert spec.layout == "room" and np.isfinite(seq.depths).all()
    assert 0.5 < np.median(seq.depths) < 4.0 and seq.images.std() > 20
    np.testing.assert_array_equal(seq.images[-1], seq.images[0])


@pytest.mark.slow
def test_lookalike_places_look_alike_but_are_far_apart():
    from serve_app.model.oracle import OracleModel, image_descriptor

    spec = SceneSpec(num_frames=120, trajectory="lookalike")
    seq = render_sequence(spec)
    assert spec.layout == "twin"
    c = seq.c2w[:, :3, 3]
    assert (np.diff(c[:, 0]) > 0).all()  # a straight pass: never revisits
    d = image_descriptor(seq.images)
    S = d @ d.T
    idx = np.arange(120)
    twins = 0
    for i in range(10, 45):  # views of the first place
        far = np.abs(idx - i) > 12
        j = int(np.argmax(np.where(far, S[i], -2)))  # the most similar view outside the neighbourhood
        if j > 60:
            twins += 1
            # ... looks more alike than the same place seen 3 frames later, yet stands ~5 m away
            assert S[i, j] > 0.95 and S[i, j] > S[i, i + 3]
            assert np.linalg.norm(c[j] - c[i]) > 4.0
    assert twins >= 30
    # The images still differ: the oracle tells the twins apart, even through JPEG.
    import cv2

    oracle = OracleModel(spec)
    for i in (20, 85):
        _ok, enc = cv2.imencode(".jpg", seq.images[i][..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert oracle.identify(cv2.imdecode(enc, cv2.IMREAD_COLOR)[..., ::-1])[0] == i
    # The geometry really repeats with the twin spacing (same cluster, same depth from the twin pose).
    twin_pose = seq.c2w[20].copy()
    twin_pose[0, 3] += 5.0
    img, depth = render_view(spec, twin_pose, seq.K, 154, 112)
    np.testing.assert_allclose(depth, seq.depths[20], rtol=1e-4)
    assert np.abs(img.astype(int) - seq.images[20]).mean() < 3
