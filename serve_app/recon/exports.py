"""Export writers: PLY point clouds (plyfile), GLB scenes with camera frustums (trimesh), TUM/JSON trajectories."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import trimesh
from plyfile import PlyData, PlyElement

_PLY_DTYPE = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]


def _as_cloud(points: np.ndarray, colors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    if colors is None:
        c = np.full((len(p), 3), 200, dtype=np.uint8)
    else:
        c = np.asarray(colors).reshape(-1, 3)
        if c.dtype != np.uint8:
            c = np.clip(np.rint(c * 255.0 if np.issubdtype(c.dtype, np.floating) and c.max(initial=0) <= 1.0
                                else c), 0, 255).astype(np.uint8)
    if len(c) != len(p):
        raise ValueError(f"{len(p)} points but {len(c)} colours")
    return p, c


def ply_bytes(points: np.ndarray, colors: np.ndarray | None) -> bytes:
    """Binary little-endian PLY: vertex x, y, z float32 and red, green, blue uint8."""
    p, c = _as_cloud(points, colors)
    v = np.empty(len(p), dtype=_PLY_DTYPE)
    v["x"], v["y"], v["z"] = p[:, 0], p[:, 1], p[:, 2]
    v["red"], v["green"], v["blue"] = c[:, 0], c[:, 1], c[:, 2]
    buf = io.BytesIO()
    PlyData([PlyElement.describe(v, "vertex")], text=False, byte_order="<").write(buf)
    return buf.getvalue()


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray | None) -> Path:
    path = Path(path)
    path.write_bytes(ply_bytes(points, colors))
    return path


def read_ply(src: str | Path | bytes) -> tuple[np.ndarray, np.ndarray]:
    """(points float32 (M,3), colors uint8 (M,3)) from a PLY file or its bytes (colours 0 if absent)."""
    ply = PlyData.read(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else str(src))
    v = ply["vertex"].data
    pts = np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float32)
    names = v.dtype.names
    if all(k in names for k in ("red", "green", "blue")):
        cols = np.stack([v["red"], v["green"], v["blue"]], 1).astype(np.uint8)
    else:
        cols = np.zeros((len(pts), 3), dtype=np.uint8)
    return pts, cols


def frustum_segments(c2w: np.ndarray, K: np.ndarray, image_size: tuple[int, int], scale: float) -> np.ndarray:
    """(N, 8, 2, 3) line segments: apex to the 4 image corners at depth `scale`, and the 4 rim edges."""
    c2w = np.asarray(c2w, dtype=np.float64).reshape(-1, 4, 4)
    n = len(c2w)
    K = np.asarray(K, dtype=np.float64)
    K = np.broadcast_to(K, (n, 3, 3)) if K.ndim == 2 else K
    w, h = image_size
    corners = np.array([[-0.5, -0.5, 1], [w - 0.5, -0.5, 1], [w - 0.5, h - 0.5, 1], [-0.5, h - 0.5, 1]])
    segs = np.empty((n, 8, 2, 3))
    for i in range(n):
        cam = corners @ np.linalg.inv(K[i]).T * scale  # z = scale
        world = cam @ c2w[i, :3, :3].T + c2w[i, :3, 3]
        apex = c2w[i, :3, 3]
        for k in range(4):
            segs[i, k] = (apex, world[k])
            segs[i, 4 + k] = (world[k], world[(k + 1) % 4])
    return segs


def glb_bytes(points: np.ndarray, colors: np.ndarray | None, c2w: np.ndarray | None = None,
              K: np.ndarray | None = None, image_size: tuple[int, int] | None = None,
              frustum_scale: float | None = None) -> bytes:
    """GLB with the coloured point cloud and one frustum (line geometry) per camera, in the points' frame.

    frustum_scale: frustum depth in world units; default 3% of the cloud's 5-95 percentile diagonal (as DA3).
    """
    p, c = _as_cloud(points, colors)
    scene = trimesh.Scene()
    if len(p):
        scene.add_geometry(trimesh.PointCloud(vertices=p, colors=np.c_[c, np.full(len(c), 255, np.uint8)]),
                           geom_name="points")
    if c2w is not None and K is not None and image_size is not None and len(np.asarray(c2w)):
        if frustum_scale is None:
            if len(p) > 1:
                diag = float(np.linalg.norm(np.percentile(p, 95, 0) - np.percentile(p, 5, 0)))
            else:
                cen = np.asarray(c2w)[:, :3, 3]
                diag = float(np.linalg.norm(cen.max(0) - cen.min(0)))
            frustum_scale = 0.03 * diag if np.isfinite(diag) and diag > 0 else 0.1
        segs = frustum_segments(c2w, K, image_size, frustum_scale)
        n = len(segs)
        verts = segs.reshape(-1, 3)
        entities = [trimesh.path.entities.Line([2 * k, 2 * k + 1]) for k in range(len(verts) // 2)]
        hue = np.repeat(np.linspace(0.0, 1.0, n, endpoint=False), 8)
        rgb = (np.stack([np.abs(np.sin(np.pi * (hue + o))) for o in (0.0, 1 / 3, 2 / 3)], 1) * 255).astype(np.uint8)
        path = trimesh.path.Path3D(entities=entities, vertices=verts,
                                   colors=np.c_[rgb, np.full(len(rgb), 255, np.uint8)])
        scene.add_geometry(path, geom_name="cameras")
    return scene.export(file_type="glb")


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotations -> (..., 4) unit quaternions (x, y, z, w), w >= 0 (Shepperd's branch choice)."""
    R = np.asarray(R, dtype=np.float64)
    shape = R.shape[:-2]
    R = R.reshape(-1, 3, 3)
    q = np.empty((len(R), 4))
    tr = np.trace(R, axis1=1, axis2=2)
    diag = np.diagonal(R, axis1=1, axis2=2)
    # Pick the largest of 4w^2, 4x^2, 4y^2, 4z^2 to divide by, for numerical stability.
    cand = np.stack([tr, diag[:, 0], diag[:, 1], diag[:, 2]], 1)
    which = np.argmax(cand, 1)
    for i, (m, k) in enumerate(zip(R, which)):
        if k == 0:
            s = 2.0 * np.sqrt(max(1.0 + tr[i], 1e-300))
            q[i] = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
        elif k == 1:
            s = 2.0 * np.sqrt(max(1.0 + m[0, 0] - m[1, 1] - m[2, 2], 1e-300))
            q[i] = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
        elif k == 2:
            s = 2.0 * np.sqrt(max(1.0 + m[1, 1] - m[0, 0] - m[2, 2], 1e-300))
            q[i] = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
        else:
            s = 2.0 * np.sqrt(max(1.0 + m[2, 2] - m[0, 0] - m[1, 1], 1e-300))
            q[i] = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q[q[:, 3] < 0] *= -1.0
    return q.reshape(shape + (4,))


def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """(..., 4) quaternions (x, y, z, w) -> (..., 3, 3)."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def trajectory_tum(timestamps, c2w: np.ndarray) -> str:
    """TUM RGB-D trajectory text: one line "t tx ty tz qx qy qz qw" per camera (camera-to-world)."""
    c2w = np.asarray(c2w, dtype=np.float64).reshape(-1, 4, 4) if np.asarray(c2w).shape[-2:] == (4, 4) else \
        np.asarray(c2w, dtype=np.float64).reshape(-1, 3, 4)
    ts = np.asarray(timestamps, dtype=np.float64).reshape(-1)
    if len(ts) != len(c2w):
        raise ValueError(f"{len(ts)} timestamps for {len(c2w)} poses")
    q = rotation_to_quaternion(c2w[:, :3, :3])
    lines = [" ".join([f"{t:.6f}"] + [f"{x:.9g}" for x in (*c2w[i, :3, 3], *q[i])]) for i, t in enumerate(ts)]
    return "\n".join(lines) + ("\n" if lines else "")


def read_tum(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse TUM text -> (timestamps (N,), c2w (N, 4, 4)); '#' comments and blank lines are skipped."""
    rows = [list(map(float, ln.split())) for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    a = np.asarray(rows, dtype=np.float64).reshape(-1, 8)
    T = np.tile(np.eye(4), (len(a), 1, 1))
    T[:, :3, :3] = quaternion_to_rotation(a[:, 4:8])
    T[:, :3, 3] = a[:, 1:4]
    return a[:, 0], T


def trajectory_json(frame_ids, timestamps, c2w: np.ndarray, K: np.ndarray | None) -> dict:
    """{"convention", "frames": [{"frame_id", "timestamp", "c2w" 4x4, "intrinsics" 3x3 | None}]}."""
    c2w = np.asarray(c2w, dtype=np.float64)
    frame_ids = list(frame_ids)
    timestamps = list(timestamps) if timestamps is not None else [None] * len(frame_ids)
    n = len(c2w)
    if len(frame_ids) != n or len(timestamps) != n:
        raise ValueError(f"{len(frame_ids)} ids, {len(timestamps)} timestamps, {n} poses")
    if K is not None:
        K = np.asarray(K, dtype=np.float64)
        K = np.broadcast_to(K, (n, 3, 3)) if K.ndim == 2 else K
    frames = []
    for i in range(n):
        T = np.eye(4)
        T[:3, :] = c2w[i, :3, :]
        frames.append({"frame_id": frame_ids[i],
                       "timestamp": None if timestamps[i] is None else float(timestamps[i]),
                       "c2w": T.tolist(), "intrinsics": None if K is None else K[i].tolist()})
    return {"convention": "OpenCV camera (x right, y down, z forward); c2w camera-to-world", "frames": frames}
