"""A procedural room rendered by analytic ray casting in numpy, with exact depth and poses for tests.

World frame: y up, floor at y=0, room x,z in [-4, 4], ceiling at y=3. Cameras are OpenCV (x right, y down,
z forward); pixel (u, v) has its centre at integer coordinates, its ray is K^-1 [u, v, 1] (see geometry.py).
Surfaces are unlit (colour depends only on the surface point), so every view of a point has the same colour.

Trajectories: "orbit" (around the room centre, looking at it), "line", "static", "loop" (a closed path along
the walls looking outward, `loops` times round: the last frame is exactly the first pose, so a streamed map must
close) and "lookalike" (a straight, non-closing pass through a longer room holding two identical object
clusters 5 m apart, with room textures repeating with the same period: views of the two places look alike but
are far apart in the world; a loop closer must not join them).

CLI: python -m serve_app.evaluation.synthetic --out DIR [--frames N] [--size 154x112] [--seed S] [--trajectory orbit]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image

from serve_app.evaluation.scenes import (
    TWIN_SPACING,
    _cast,
    _scene,
)
from serve_app.recon.geometry import invert_pose, unproject_depths

TRAJECTORIES = ("orbit", "line", "static", "loop", "lookalike")


@dataclass
class SceneSpec:
    seed: int = 0
    num_frames: int = 48
    width: int = 154
    height: int = 112
    fov_deg: float = 60.0  # horizontal
    trajectory: str = "orbit"
    speed: float = 1.0  # orbit: laps over the sequence; line: fraction of the 5.5 m track
    loops: int = 1  # loop: times round the closed path over the sequence

    def __post_init__(self):
        if self.trajectory not in TRAJECTORIES:
            raise ValueError(f"trajectory must be one of {TRAJECTORIES}, got {self.trajectory!r}")
        if self.num_frames < 1 or self.width < 2 or self.height < 2:
            raise ValueError("num_frames >= 1 and width, height >= 2 required")
        if int(self.loops) < 1:
            raise ValueError(f"loops must be >= 1, got {self.loops}")

    @property
    def layout(self) -> str:
        """Scene content: "twin" (two look-alike places) for the lookalike pass, else the standard "room"."""
        return "twin" if self.trajectory == "lookalike" else "room"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> SceneSpec:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


# --- cameras --------------------------------------------------------------------------------------------

def camera_intrinsics(spec: SceneSpec, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Pinhole K for the given size (default spec's): horizontal fov, square pixels, centre at ((W-1)/2, (H-1)/2)."""
    w = spec.width if width is None else int(width)
    h = spec.height if height is None else int(height)
    f = 0.5 * w / np.tan(np.deg2rad(spec.fov_deg) / 2)
    return np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]], dtype=np.float32)


def scale_intrinsics(K: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]) -> np.ndarray:
    """K for an image resized (whole, no crop) from src (W, H) to dst (W, H), with integer pixel centres."""
    sx, sy = dst_size[0] / src_size[0], dst_size[1] / src_size[1]
    K2 = np.array(K, dtype=np.float64)
    K2[0, 0] *= sx
    K2[1, 1] *= sy
    K2[0, 1] *= sx
    K2[0, 2] = (K2[0, 2] + 0.5) * sx - 0.5
    K2[1, 2] = (K2[1, 2] + 0.5) * sy - 0.5
    return K2.astype(np.float32)


def look_at(position: np.ndarray, target: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """OpenCV camera-to-world (x right, y down, z forward) at `position` looking at `target` (world up +y)."""
    up = np.array([0.0, 1.0, 0.0]) if up is None else np.asarray(up, dtype=np.float64)
    z = target - position
    z = z / np.linalg.norm(z)
    x = np.cross(-up, z)
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, y, z], 1)
    T[:3, 3] = position
    return T


def _wobble(T: np.ndarray, yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])  # about camera y (down)
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])  # about camera x
    out = T.copy()
    out[:3, :3] = T[:3, :3] @ Ry @ Rx
    return out


def _loop_pose(theta: float) -> np.ndarray:
    """On an ellipse 2.5 x 2.1 m round the room centre (objects stay > 1 m away), looking 50 deg outward of the
    direction of travel and slightly down; periodic in theta, so the path closes exactly."""
    a, b = 2.5, 2.1
    pos = np.array([a * np.cos(theta), 1.5 + 0.1 * np.sin(3 * theta), b * np.sin(theta)])
    tangent = np.array([-a * np.sin(theta), 0.0, b * np.cos(theta)])
    outward = np.array([np.cos(theta) / a, 0.0, np.sin(theta) / b])
    tangent, outward = tangent / np.linalg.norm(tangent), outward / np.linalg.norm(outward)
    alpha = np.deg2rad(50.0)
    fwd = np.cos(alpha) * tangent + np.sin(alpha) * outward + np.array([0.0, -0.25, 0.0])
    T = look_at(pos, pos + fwd)
    return _wobble(T, np.deg2rad(4.0) * np.sin(2 * theta), np.deg2rad(3.0) * np.sin(3 * theta + 0.5))


def _lookalike_pose(s: float) -> np.ndarray:
    """Straight pass along x (slowly drifting in z and height: the two places are never seen from exactly the same
    relative pose), looking at +z where the clusters stand; the wobble repeats with the cluster spacing."""
    x = -4.6 + 9.2 * s
    pos = np.array([x, 1.45 + 0.1 * s, -1.6 + 0.25 * s])
    T = look_at(pos, pos + np.array([0.0, -0.3, 1.0]))
    ph = 2 * np.pi * (x + TWIN_SPACING / 2) / TWIN_SPACING
    return _wobble(T, np.deg2rad(5.0) * np.sin(ph), np.deg2rad(2.0) * np.sin(2 * ph))


def camera_poses(spec: SceneSpec) -> np.ndarray:
    """(N, 4, 4) float64 camera-to-world for the spec's trajectory."""
    n = spec.num_frames
    poses = []
    centre = np.array([0.0, 1.2, 0.0])
    for i in range(n):
        if spec.trajectory == "loop":
            poses.append(_loop_pose(2 * np.pi * int(spec.loops) * i / max(n - 1, 1)))
            continue
        if spec.trajectory == "lookalike":
            poses.append(_lookalike_pose(i / max(n - 1, 1)))
            continue
        if spec.trajectory == "line":
            s = min(spec.speed * i / max(n - 1, 1), 1.0)
            pos = np.array([-2.6, 1.5 + 0.05 * np.sin(4 * np.pi * s), -3.0 + 5.5 * s])
            T = look_at(pos, pos + np.array([0.35, -0.15, 1.0]))
            T = _wobble(T, np.deg2rad(4.0) * np.sin(2 * np.pi * s), np.deg2rad(3.0) * np.sin(3 * np.pi * s))
        else:
            th = 0.0 if spec.trajectory == "static" else 2 * np.pi * spec.speed * i / n
            pos = np.array([2.6 * np.cos(th), 1.5 + 0.1 * np.sin(2 * th), 2.2 * np.sin(th)])
            T = look_at(pos, centre)
            T = _wobble(T, np.deg2rad(6.0) * np.sin(3 * th), np.deg2rad(4.0) * np.sin(2 * th + 1.0))
        poses.append(T)
    return np.stack(poses)


# --- rendering ------------------------------------------------------------------------------------------

def render_view(spec: SceneSpec, c2w: np.ndarray, K: np.ndarray, width: int, height: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Render rgb (H, W, 3) uint8 and z-depth (H, W) float32 from camera c2w (4x4 or 3x4) with intrinsics K."""
    c2w = np.asarray(c2w, dtype=np.float64)
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pix = np.stack([u, v, np.ones_like(u)], -1).reshape(-1, 3)
    rays_cam = pix @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T  # z = 1, so t is z-depth
    d = rays_cam @ c2w[:3, :3].T
    t, rgb = _cast(_scene(int(spec.seed), spec.layout), c2w[:3, 3], d)
    img = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8).reshape(height, width, 3)
    return img, t.astype(np.float32).reshape(height, width)


@dataclass
class SyntheticSequence:
    spec: SceneSpec
    images: np.ndarray  # (N, H, W, 3) uint8
    depths: np.ndarray  # (N, H, W) float32
    c2w: np.ndarray  # (N, 4, 4) float32
    K: np.ndarray  # (3, 3) float32

    @property
    def w2c(self) -> np.ndarray:
        return invert_pose(self.c2w)


def render_sequence(spec: SceneSpec) -> SyntheticSequence:
    K = camera_intrinsics(spec)
    poses = camera_poses(spec)
    imgs, depths = zip(*(render_view(spec, T, K, spec.width, spec.height) for T in poses))
    return SyntheticSequence(spec, np.stack(imgs), np.stack(depths), poses.astype(np.float32), K)


def surface_points(spec: SceneSpec, n: int, seed: int = 0, seq: SyntheticSequence | None = None) -> np.ndarray:
    """(n, 3) float32 points on the surfaces the trajectory sees (unprojected GT depth of every frame)."""
    seq = seq if seq is not None else render_sequence(spec)
    N = len(seq.depths)
    pts = unproject_depths(seq.depths, np.broadcast_to(seq.K, (N, 3, 3)), seq.c2w).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    return pts[rng.choice(len(pts), size=n, replace=n > len(pts))]


# --- files ----------------------------------------------------------------------------------------------

def write_sequence(seq: SyntheticSequence, out_dir: str | Path, fmt: str = "png",
                   save_depth: bool = False) -> list[Path]:
    """Write frame_00000.<fmt>, ... and groundtruth.json (plus depths.npy if save_depth); returns frame paths."""
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f"unsupported format {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(seq.images):
        p = out / f"frame_{i:05d}.{fmt}"
        Image.fromarray(img).save(p, **({"quality": 95} if fmt != "png" else {}))
        paths.append(p)
    h, w = seq.images.shape[1:3]
    gt = {"spec": seq.spec.to_dict(), "K": np.asarray(seq.K).tolist(), "image_size": [int(w), int(h)],
          "c2w": np.asarray(seq.c2w).tolist(), "frames": [p.name for p in paths],
          "convention": "OpenCV camera (x right, y down, z forward); c2w camera-to-world; world y up"}
    (out / "groundtruth.json").write_text(json.dumps(gt))
    if save_depth:
        np.save(out / "depths.npy", seq.depths)
    return paths


def load_groundtruth(directory: str | Path) -> dict:
    """groundtruth.json with arrays as numpy: spec (SceneSpec), K (3,3), c2w (N,4,4), image_size, frames (paths)."""
    d = Path(directory)
    gt = json.loads((d / "groundtruth.json").read_text())
    gt["spec"] = SceneSpec.from_dict(gt["spec"])
    gt["K"] = np.asarray(gt["K"], dtype=np.float32)
    gt["c2w"] = np.asarray(gt["c2w"], dtype=np.float32)
    gt["frames"] = [d / f for f in gt["frames"]]
    if (d / "depths.npy").exists():
        gt["depths"] = np.load(d / "depths.npy")
    return gt


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Render the synthetic room to image files plus ground truth.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--size", default="154x112", help="WxH")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trajectory", default="orbit", choices=TRAJECTORIES)
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--loops", type=int, default=1, help="loop trajectory: times round the closed path")
    ap.add_argument("--fov", type=float, default=60.0)
    ap.add_argument("--format", default="png", choices=("png", "jpg"))
    ap.add_argument("--depth", action="store_true", help="also write depths.npy")
    a = ap.parse_args(argv)
    w, h = (int(x) for x in a.size.lower().split("x"))
    spec = SceneSpec(seed=a.seed, num_frames=a.frames, width=w, height=h, fov_deg=a.fov,
                     trajectory=a.trajectory, speed=a.speed, loops=a.loops)
    paths = write_sequence(render_sequence(spec), a.out, fmt=a.format, save_depth=a.depth)
    print(f"wrote {len(paths)} frames and groundtruth.json to {a.out}")


if __name__ == "__main__":
    main()
