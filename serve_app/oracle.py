"""A model backend that answers with ground truth from the synthetic scene, in DA3's per-window gauge.

Same contract as the DA3 runtime (forward_windows / info / health_check). Each incoming image is identified
among the scene's frames by a thumbnail match; the window's depth is re-rendered at the request's size, and the
window is expressed like DA3 does: view 0 at the origin (extrinsics[0] = [I|0]) and one arbitrary scale per
window. Assumes the server resized whole frames (no crop), so intrinsics scale with the image.
"""

from __future__ import annotations

import time
import zlib

import cv2
import numpy as np

from serve_app.geometry import Sim3, invert_pose
from serve_app.prediction import WindowPrediction, WindowRequest
from serve_app.synthetic import SceneSpec, render_sequence, render_view, scale_intrinsics

THUMB_SIZE = (32, 24)  # (W, H)


def _thumb(img: np.ndarray) -> np.ndarray:
    return cv2.resize(np.ascontiguousarray(img), THUMB_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)


def _random_rotation(rng: np.random.Generator, std_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.normal() * std_deg)
    Kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * Kx + (1 - np.cos(ang)) * Kx @ Kx


class OracleModel:
    model_name = "oracle"
    any_view = True
    is_metric = False

    def __init__(self, scene: SceneSpec | dict | None = None, *, scale_range: tuple[float, float] = (0.5, 2.0),
                 depth_noise: float = 0.0, pose_noise: float = 0.0, seed: int = 0,
                 max_thumb_diff: float = 8.0):
        """depth_noise: relative per-pixel depth std. pose_noise p: rotation noise std p degrees and camera
        centre noise std p*pi/180 x the window's median depth (comparable image motion), views after the first.
        max_thumb_diff: largest mean absolute thumbnail difference (0-255) accepted as a match."""
        self.spec = scene if isinstance(scene, SceneSpec) else SceneSpec.from_dict(scene)
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not (0 < lo <= hi):
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.scale_range = (lo, hi)
        self.depth_noise = float(depth_noise)
        self.pose_noise = float(pose_noise)
        self.seed = int(seed)
        self.max_thumb_diff = float(max_thumb_diff)
        self.seq = render_sequence(self.spec)
        self._thumbs = np.stack([_thumb(im) for im in self.seq.images])  # (F, 24, 32, 3)
        self.windows_served = 0

    # --- contract -------------------------------------------------------------------------------------
    def info(self) -> dict:
        return {"model_name": self.model_name, "backend": "oracle", "any_view": self.any_view,
                "is_metric": self.is_metric, "device": "cpu", "scene": self.spec.to_dict(),
                "num_frames": len(self.seq.images), "scale_range": list(self.scale_range),
                "depth_noise": self.depth_noise, "pose_noise": self.pose_noise, "seed": self.seed,
                "windows_served": self.windows_served}

    def health_check(self) -> None:
        if self._thumbs.shape[0] != self.spec.num_frames:
            raise RuntimeError("oracle scene not rendered")

    def forward_windows(self, requests: list[WindowRequest]) -> list[WindowPrediction]:
        return [self._forward(r) for r in requests]

    # --- internals ------------------------------------------------------------------------------------
    def identify(self, image: np.ndarray) -> tuple[int, float]:
        """Index of the scene frame this image shows, and the thumbnail difference; ValueError if no match."""
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) image, got {img.shape}")
        diff = np.abs(self._thumbs - _thumb(img.astype(np.uint8))).mean(axis=(1, 2, 3))
        i = int(np.argmin(diff))
        if diff[i] > self.max_thumb_diff:
            raise ValueError(f"image matches no frame of the oracle scene (best frame {i}, "
                             f"difference {diff[i]:.1f} > {self.max_thumb_diff})")
        return i, float(diff[i])

    def _forward(self, req: WindowRequest) -> WindowPrediction:
        t0 = time.perf_counter()
        images = np.asarray(req.images)
        if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
            raise ValueError(f"expected (N, H, W, 3) images, got {images.shape}")
        n, h, w = images.shape[:3]
        idx = [self.identify(im)[0] for im in images]
        # Per-window stream from the seed and the frame indices: independent of batching and call order.
        rng = np.random.default_rng([self.seed, zlib.crc32(np.asarray(idx, dtype=np.int64).tobytes())])
        K = scale_intrinsics(self.seq.K, (self.spec.width, self.spec.height), (w, h))
        c2w = self.seq.c2w[idx].astype(np.float64)
        depth = np.stack([render_view(self.spec, c2w[j], K, w, h)[1] for j in range(n)]).astype(np.float64)

        lo, hi = self.scale_range
        s = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        # Window gauge: x -> s * inv(c2w_0) x, so view 0 sits at the origin and lengths scale by s.
        gauge = Sim3(s, np.eye(3), np.zeros(3)).compose(
            Sim3(1.0, c2w[0, :3, :3].T, -c2w[0, :3, :3].T @ c2w[0, :3, 3]))
        c2w_g = gauge.transform_c2w(c2w).astype(np.float64)
        c2w_g[0] = np.eye(4)
        depth *= s

        conf = np.ones_like(depth)
        if self.depth_noise > 0:
            e = rng.normal(size=depth.shape) * self.depth_noise
            depth *= 1.0 + e
            conf = 1.0 / (1.0 + (e / self.depth_noise) ** 2)  # noisier pixels are less confident
        if self.pose_noise > 0 and n > 1:
            med = float(np.median(depth))
            for j in range(1, n):
                c2w_g[j, :3, :3] = _random_rotation(rng, self.pose_noise) @ c2w_g[j, :3, :3]
                c2w_g[j, :3, 3] += rng.normal(size=3) * np.deg2rad(self.pose_noise) * med

        extr = invert_pose(c2w_g)[:, :3, :]
        extr[0] = np.eye(4, dtype=np.float32)[:3]
        self.windows_served += 1
        return WindowPrediction(depth=depth.astype(np.float32), conf=conf.astype(np.float32), extrinsics=extr,
                                intrinsics=np.repeat(K[None], n, axis=0).astype(np.float32),
                                images=images.astype(np.uint8), is_metric=False,
                                timings={"model_ms": (time.perf_counter() - t0) * 1000.0})
