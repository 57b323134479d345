"""A model backend that answers with ground truth from the synthetic scene, in DA3's per-window gauge.

Same contract as the DA3 runtime (forward_windows / info / health_check). Each incoming image is identified
among the scene's frames by a thumbnail match; the window's depth is re-rendered at the request's size, and the
window is expressed like DA3 does: view 0 at the origin (extrinsics[0] = [I|0]) and one arbitrary scale per
window. Assumes the server resized whole frames (no crop), so intrinsics scale with the image.

Errors (config.OracleErrors), drawn per window from the seed and the window's frame indices (each component from
its own stream, so switching one on does not change the others), independently per view:
- depth warp: depth x (1 + a x + b y + c (r^2 - mean)), x, y the pixel position over the half-width; each basis
  has unit RMS over the image and a, b, c ~ N(0, depth_warp / sqrt(3)), so the factor's std is depth_warp;
- pixel noise: depth x (1 + N(0, pixel_noise)) per pixel;
- outliers: exactly round(outliers x H x W) pixels per view (blobs: the top of a smooth random field, one factor
  per connected blob; pixels: scattered) get depth x0.5-0.8 or x1.25-2, with the confidence of an ordinary pixel;
- pose noise: views after the first turn by N(0, p) degrees about a random axis and move by N(0, p pi/180 x
  median depth) per axis (comparable image motion);
- confidence 1 / (1 + q^2), q = k |e| / rms(e) + (1 - k) |z|: e the pixel's relative depth error apart from
  outliers, z a smooth random field of unit RMS, k = conf_informative (1: knows the error, 0: unrelated to it).

Each prediction also carries a cheap per-view global descriptor of the input image alone (`image_descriptor`, no
ground truth), so look-alike places really look alike to a loop detector.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import cv2
import numpy as np

from serve_app.config import OracleErrors
from serve_app.evaluation.synthetic import SceneSpec, render_sequence, render_view, scale_intrinsics
from serve_app.prediction import WindowPrediction, WindowRequest
from serve_app.recon.geometry import Sim3, invert_pose

THUMB_SIZE = (32, 24)  # (W, H)
DESCRIPTOR_SIZE = (8, 6)  # (W, H) colour thumbnail behind the global descriptor: 144 dims
OUTLIER_LOG_RANGE = (np.log(1.25), np.log(2.0))  # |log factor| of an outlier
CONF_FIELD_CELLS = (3, 4)  # (rows, cols) of the random grid behind the uninformative confidence field
BLOB_FIELD_CELLS = (6, 8)  # ... and behind outlier blobs
_STREAM_WARP, _STREAM_NOISE, _STREAM_OUTLIERS, _STREAM_POSE, _STREAM_CONF = range(1, 6)


def _thumb(img: np.ndarray) -> np.ndarray:
    return cv2.resize(np.ascontiguousarray(img), THUMB_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)


def _random_rotation(rng: np.random.Generator, std_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = np.deg2rad(rng.normal() * std_deg)
    Kx = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * Kx + (1 - np.cos(ang)) * Kx @ Kx


def image_descriptor(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, D) float32 L2-normalised: an area-averaged 8x6 colour thumbnail minus its mean.
    Derived from the pixels only; resizing and mild coding change it little."""
    imgs = np.asarray(images)
    out = []
    for im in imgs.reshape(-1, *imgs.shape[-3:]):
        t = cv2.resize(np.ascontiguousarray(im), DESCRIPTOR_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)
        v = (t - t.mean()).reshape(-1)
        out.append(v / max(float(np.linalg.norm(v)), 1e-6))
    return np.stack(out).astype(np.float32)


def smooth_field(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """(h, w) zero-mean unit-std random field: a Gaussian grid of `cells` (rows, cols) upsampled bicubically."""
    grid = rng.normal(size=(cells[0] + 1, cells[1] + 1)).astype(np.float32)
    f = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    f -= f.mean()
    return f / max(float(f.std()), 1e-9)


def warp_basis(h: int, w: int) -> np.ndarray:
    """(3, h, w): x tilt, y tilt, radial bowl (r^2 minus its mean), each with unit RMS over the image."""
    half = max((w - 1) / 2.0, 1e-9)
    x, y = np.meshgrid((np.arange(w) - (w - 1) / 2.0) / half, (np.arange(h) - (h - 1) / 2.0) / half)
    r2 = x * x + y * y
    basis = np.stack([x, y, r2 - r2.mean()])
    return basis / np.sqrt((basis ** 2).mean(axis=(1, 2)))[:, None, None]


@dataclass
class WindowErrors:
    """One window's drawn errors (N views of H x W); depth_factor multiplies the true depth."""

    warp: np.ndarray  # (N, H, W) 1 + low-frequency warp
    noise: np.ndarray  # (N, H, W) 1 + per-pixel noise
    outlier: np.ndarray  # (N, H, W) bool
    outlier_factor: np.ndarray  # (N, H, W), 1 off the outliers
    rotations: np.ndarray  # (N, 3, 3) left-multiplied onto each view's camera-to-world rotation (view 0: I)
    centre_noise: np.ndarray  # (N, 3) camera centre offsets in units of the window's median depth (view 0: 0)
    conf: np.ndarray  # (N, H, W)

    @property
    def depth_factor(self) -> np.ndarray:
        return self.warp * self.noise * self.outlier_factor

    @property
    def rotation_deg(self) -> np.ndarray:
        cos = (np.trace(self.rotations, axis1=1, axis2=2) - 1.0) / 2.0
        return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _outlier_mask(rng: np.random.Generator, h: int, w: int, frac: float, shape: str) -> np.ndarray:
    count = round(frac * h * w)
    mask = np.zeros(h * w, bool)
    if count == 0:
        return mask.reshape(h, w)
    if shape == "pixels":
        mask[rng.choice(h * w, size=count, replace=False)] = True
    else:  # the `count` highest values of a smooth field: blobs around its maxima
        field_ = smooth_field(rng, h, w, BLOB_FIELD_CELLS).reshape(-1)
        mask[np.argpartition(-field_, count - 1)[:count]] = True
    return mask.reshape(h, w)


def draw_window_errors(errors: OracleErrors, streams: list, n: int, h: int, w: int) -> WindowErrors:
    """Draw every error component for an N-view window of H x W. `streams` is the window's seed sequence entropy
    (a list of ints); component k draws from default_rng(streams + [k])."""
    def rng(k: int) -> np.random.Generator:
        return np.random.default_rng([*streams, k])

    shape = (n, h, w)
    warp = np.ones(shape)
    if errors.depth_warp > 0:
        coef = rng(_STREAM_WARP).normal(size=(n, 3)) * errors.depth_warp / np.sqrt(3.0)
        warp = np.maximum(1.0 + np.einsum("nk,khw->nhw", coef, warp_basis(h, w)), 0.2)
    noise = np.ones(shape)
    if errors.pixel_noise > 0:
        noise = np.maximum(1.0 + rng(_STREAM_NOISE).normal(size=shape) * errors.pixel_noise, 0.2)
    outlier = np.zeros(shape, bool)
    factor = np.ones(shape)
    if errors.outliers > 0:
        r = rng(_STREAM_OUTLIERS)
        for j in range(n):
            outlier[j] = _outlier_mask(r, h, w, errors.outliers, errors.outlier_shape)
            if errors.outlier_shape == "blobs":
                nlab, labels = cv2.connectedComponents(outlier[j].astype(np.uint8), connectivity=8)
                logf = r.uniform(*OUTLIER_LOG_RANGE, size=nlab) * r.choice([-1.0, 1.0], size=nlab)
                factor[j] = np.where(outlier[j], np.exp(logf[labels]), 1.0)
            else:
                k = int(outlier[j].sum())
                logf = r.uniform(*OUTLIER_LOG_RANGE, size=k) * r.choice([-1.0, 1.0], size=k)
                factor[j][outlier[j]] = np.exp(logf)
    rots = np.repeat(np.eye(3)[None], n, axis=0)
    centre = np.zeros((n, 3))
    if errors.pose_noise_deg > 0 and n > 1:
        r = rng(_STREAM_POSE)
        for j in range(1, n):
            rots[j] = _random_rotation(r, errors.pose_noise_deg)
            centre[j] = r.normal(size=3) * np.deg2rad(errors.pose_noise_deg)
    # Confidence: from the error apart from outliers (they look ordinary), blended with a random smooth field.
    e = np.abs(warp * noise - 1.0)
    rms = float(np.sqrt((e ** 2).mean()))
    informed = e / rms if rms > 0 else np.zeros(shape)
    k = float(errors.conf_informative)
    q = k * informed
    if k < 1.0:
        r = rng(_STREAM_CONF)
        z = np.stack([np.abs(smooth_field(r, h, w, CONF_FIELD_CELLS)) for _ in range(n)])
        q = q + (1.0 - k) * z / np.sqrt((z ** 2).mean())
    conf = 1.0 / (1.0 + q ** 2)
    return WindowErrors(warp, noise, outlier, factor, rots, centre, conf)


class OracleModel:
    model_name = "oracle"
    any_view = True
    is_metric = False

    def __init__(self, scene: SceneSpec | dict | None = None, *, scale_range: tuple[float, float] = (0.5, 2.0),
                 depth_noise: float = 0.0, pose_noise: float = 0.0, seed: int = 0,
                 max_thumb_diff: float = 8.0, errors: OracleErrors | dict | str | None = None):
        """errors: the error model (OracleErrors, its dict, or a preset name); without it, the legacy
        depth_noise (relative per-pixel depth std, confidence knows it) and pose_noise (degrees) map onto it.
        max_thumb_diff: largest mean absolute thumbnail difference (0-255) accepted as a match."""
        self.spec = scene if isinstance(scene, SceneSpec) else SceneSpec.from_dict(scene)
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not (0 < lo <= hi):
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {scale_range}")
        self.scale_range = (lo, hi)
        if errors is None:
            errors = OracleErrors(pixel_noise=float(depth_noise), pose_noise_deg=float(pose_noise))
        elif (depth_noise or pose_noise):
            raise ValueError("give either errors or the legacy depth_noise / pose_noise")
        self.errors = errors if isinstance(errors, OracleErrors) else OracleErrors.model_validate(errors)
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
                "errors": self.errors.model_dump(), "seed": self.seed, "descriptors": "thumbnail8x6",
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
        streams = [self.seed, zlib.crc32(np.asarray(idx, dtype=np.int64).tobytes())]
        rng = np.random.default_rng(streams)
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

        err = draw_window_errors(self.errors, streams, n, h, w)
        med = float(np.median(depth))
        depth *= err.depth_factor
        conf = err.conf
        for j in range(1, n):
            c2w_g[j, :3, :3] = err.rotations[j] @ c2w_g[j, :3, :3]
            c2w_g[j, :3, 3] += err.centre_noise[j] * med

        extr = invert_pose(c2w_g)[:, :3, :]
        extr[0] = np.eye(4, dtype=np.float32)[:3]
        self.windows_served += 1
        return WindowPrediction(depth=depth.astype(np.float32), conf=conf.astype(np.float32), extrinsics=extr,
                                intrinsics=np.repeat(K[None], n, axis=0).astype(np.float32),
                                images=images.astype(np.uint8), is_metric=False,
                                descriptors=image_descriptor(images),
                                timings={"model_ms": (time.perf_counter() - t0) * 1000.0})
