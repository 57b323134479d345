import io

import numpy as np
import pytest
import trimesh
from plyfile import PlyData

from serve_app.recon.exports import (
    frustum_segments,
    glb_bytes,
    ply_bytes,
    quaternion_to_rotation,
    read_ply,
    read_tum,
    rotation_to_quaternion,
    trajectory_json,
    trajectory_tum,
    write_ply,
)
from serve_app.recon.geometry import orthonormalize


@pytest.fixture
def cloud():
    rng = np.random.default_rng(0)
    return (rng.normal(size=(500, 3)).astype(np.float32), rng.integers(0, 256, (500, 3), dtype=np.uint8))


def poses(n=4, seed=1):
    rng = np.random.default_rng(seed)
    T = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        T[i, :3, :3] = orthonormalize(rng.normal(size=(3, 3)))
        T[i, :3, 3] = rng.normal(size=3)
    return T


K = np.array([[100.0, 0, 76.5], [0, 100.0, 55.5], [0, 0, 1]])


def test_ply_round_trip(tmp_path, cloud):
    pts, cols = cloud
    data = ply_bytes(pts, cols)
    assert data.startswith(b"ply\nformat binary_little_endian 1.0")
    ply = PlyData.read(io.BytesIO(data))
    assert [p.name for p in ply["vertex"].properties] == ["x", "y", "z", "red", "green", "blue"]
    p, c = read_ply(data)
    np.testing.assert_array_equal(p, pts)
    np.testing.assert_array_equal(c, cols)
    path = write_ply(tmp_path / "a.ply", pts, cols)
    p2, c2 = read_ply(path)
    np.testing.assert_array_equal(p2, pts)
    np.testing.assert_array_equal(c2, cols)
    empty_p, empty_c = read_ply(ply_bytes(np.zeros((0, 3)), np.zeros((0, 3), np.uint8)))
    assert empty_p.shape == (0, 3) and empty_c.shape == (0, 3)
    with pytest.raises(ValueError):
        ply_bytes(pts, cols[:3])


def test_glb_round_trip(cloud):
    pts, cols = cloud
    T = poses(3)
    data = glb_bytes(pts, cols, T, K, (154, 112))
    scene = trimesh.load(io.BytesIO(data), file_type="glb")
    pc = [g for g in scene.geometry.values() if isinstance(g, trimesh.PointCloud)]
    lines = [g for g in scene.geometry.values() if isinstance(g, trimesh.path.Path3D)]
    assert len(pc) == 1 and len(pc[0].vertices) == 500
    np.testing.assert_allclose(np.asarray(pc[0].vertices), pts, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pc[0].colors)[:, :3], cols)
    assert len(lines) == 1
    # glTF keeps the segments as one line primitive: 8 segments (16 endpoints) per camera, apexes at centres.
    v = np.asarray(lines[0].vertices)
    expected = frustum_segments(T, K, (154, 112), 0.03 * np.linalg.norm(
        np.percentile(pts, 95, 0) - np.percentile(pts, 5, 0))).reshape(-1, 3)
    assert v.shape == (3 * 16, 3)
    np.testing.assert_allclose(np.sort(v, axis=0), np.sort(expected, axis=0), atol=1e-5)
    for c in T[:, :3, 3]:
        assert np.linalg.norm(v - c, axis=1).min() < 1e-5
    only_points = trimesh.load(io.BytesIO(glb_bytes(pts, cols)), file_type="glb")
    assert len(only_points.geometry) == 1


def test_frustum_geometry():
    segs = frustum_segments(np.eye(4)[None], K, (154, 112), 2.0)
    assert segs.shape == (1, 8, 2, 3)
    np.testing.assert_allclose(segs[0, :4, 0], 0.0)
    np.testing.assert_allclose(segs[0, :4, 1, 2], 2.0)  # corners at depth = scale
    np.testing.assert_allclose(segs[0, 0, 1, :2], [(-0.5 - 76.5) / 100 * 2, (-0.5 - 55.5) / 100 * 2])


def test_quaternions_round_trip_including_near_180():
    rng = np.random.default_rng(2)
    Rs = [orthonormalize(rng.normal(size=(3, 3))) for _ in range(50)]
    Rs += [np.diag([1.0, -1, -1]), np.diag([-1.0, 1, -1]), np.diag([-1.0, -1, 1]), np.eye(3)]
    Rs = np.stack(Rs)
    q = rotation_to_quaternion(Rs)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-12)
    assert (q[:, 3] >= 0).all()
    np.testing.assert_allclose(quaternion_to_rotation(q), Rs, atol=1e-9)
    # Known value: 90 deg about z.
    Rz = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(rotation_to_quaternion(Rz), [0, 0, np.sqrt(0.5), np.sqrt(0.5)], atol=1e-12)


def test_tum_round_trip():
    T = poses(5)
    ts = np.array([0.0, 0.1, 0.25, 1.0, 2.5])
    text = trajectory_tum(ts, T)
    lines = text.strip().splitlines()
    assert len(lines) == 5 and all(len(ln.split()) == 8 for ln in lines)
    t2, T2 = read_tum("# timestamp tx ty tz qx qy qz qw\n" + text)
    np.testing.assert_allclose(t2, ts)
    np.testing.assert_allclose(T2, T, atol=1e-7)
    np.testing.assert_allclose(read_tum(trajectory_tum(ts, T[:, :3]))[1], T, atol=1e-7)
    with pytest.raises(ValueError):
        trajectory_tum(ts[:2], T)


def test_trajectory_json():
    T = poses(3)
    d = trajectory_json(["a", "b", "c"], [0.0, None, 2.0], T[:, :3], K)
    assert [f["frame_id"] for f in d["frames"]] == ["a", "b", "c"]
    assert d["frames"][1]["timestamp"] is None and d["frames"][2]["timestamp"] == 2.0
    np.testing.assert_allclose(np.array([f["c2w"] for f in d["frames"]]), T)
    np.testing.assert_allclose(d["frames"][0]["intrinsics"], K)
    assert trajectory_json([1], None, T[:1], None)["frames"][0]["intrinsics"] is None
