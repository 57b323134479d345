"""Online loop closure: keyframe descriptors, retrieval of loop candidates, geometric verification. Pure numpy.

Each keyframe keeps a global descriptor (the backend's, WindowPrediction.descriptors, or a small image thumbnail
when the backend gives none) and a sample of its depth points in its window's normalised gauge. A new keyframe
queries the older ones (cosine >= min_similarity, at least min_gap frames older, best one only: non-maximum
suppression over the candidates, one query per `query_interval` keyframes). A candidate is then run through the
model together with the query (a 2-view "loop window") and verified: both views must re-align to their own
earlier predictions (robust Sim(3), inliers and residual thresholds), the query's points must be seen by the
candidate camera at a consistent depth (overlap), and the relative pose must agree with the pose graph within
what drift allows (PoseGraph.loop_discrepancy). A false loop is worse than none, so every test must pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from serve_app.recon.alignment import robust_scale_about_centres, robust_scale_translation, robust_sim3
from serve_app.recon.geometry import Sim3, median, orthonormalize, unproject_pixels

THUMB = (16, 12)  # (W, H) of the fallback image descriptor
VERIFY_POINTS = 3000  # alignment subsample per view
OVERLAP_DEPTH_TOL = 0.05
CAMERA_ROTATION_MAX_DEG = 10.0  # the cameras' rotation is used while within this of the points' fit  # relative depth agreement for a point to count as seen by the other view


def image_descriptor(image: np.ndarray) -> np.ndarray:
    """A cheap global descriptor: a zero-mean, unit-norm colour thumbnail (works with any backend)."""
    t = cv2.resize(np.ascontiguousarray(image), THUMB, interpolation=cv2.INTER_AREA).astype(np.float32).reshape(-1)
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-6)


def normalise(d: np.ndarray) -> np.ndarray:
    d = np.asarray(d, np.float32).reshape(-1)
    return d / max(float(np.linalg.norm(d)), 1e-12)


@dataclass
class Keyframe:
    index: int  # frame index
    window: int  # the window that placed it (pose-graph node)
    descriptor: np.ndarray  # (D,) unit norm
    source: Any  # FrameInput, sent again in a loop window
    pix: np.ndarray  # (k,) flat pixel indices
    points: np.ndarray  # (k, 3) float32 in the window's normalised gauge
    c2w: np.ndarray  # (4, 4) in the window's normalised gauge


@dataclass
class LoopDetector:
    min_similarity: float
    min_gap: int
    query_interval: int
    max_keyframes: int
    keyframes: list[Keyframe] = field(default_factory=list)
    since_query: int = 0
    pending: list[tuple] = field(default_factory=list)  # (query frame, candidate frame[, root query])

    def add(self, kf: Keyframe) -> tuple[int, int, float] | None:
        """Store a keyframe and return (query, candidate, similarity) if it is time to query and one qualifies."""
        cand = None
        self.since_query += 1
        if self.since_query >= self.query_interval:
            old = [k for k in self.keyframes if kf.index - k.index >= self.min_gap]
            if old:
                sims = np.stack([k.descriptor for k in old]) @ kf.descriptor
                i = int(np.argmax(sims))
                if sims[i] >= self.min_similarity:
                    cand = (kf.index, old[i].index, float(sims[i]))
                    self.pending.append(cand[:2])
                    self.since_query = 0
        self.keyframes.append(kf)
        if len(self.keyframes) > self.max_keyframes:
            del self.keyframes[0]
        return cand

    def matches(self, descriptor: np.ndarray, index: int) -> bool:
        """Whether a frame with this descriptor would find a candidate among the stored keyframes (similarity and
        temporal gap; the query schedule aside)."""
        old = [k.descriptor for k in self.keyframes if index - k.index >= self.min_gap]
        return bool(old) and float(np.max(np.stack(old) @ descriptor)) >= self.min_similarity

    def get(self, index: int) -> Keyframe | None:
        for k in reversed(self.keyframes):
            if k.index == index:
                return k
        return None


@dataclass
class LoopCheck:
    ok: bool
    reason: str | None
    z: Sim3 | None = None  # normalised gauge of the query's window -> that of the candidate's window
    info: dict = field(default_factory=dict)


def _align_view(kf: Keyframe, depth, K, c2w, keep, min_inliers: float, max_rmse: float, seed: int,
                pin_cameras: bool = True) -> tuple[Sim3 | None, dict | str]:
    m = keep.reshape(-1)[kf.pix]
    if m.sum() < 50:
        return None, f"frame {kf.index}: {int(m.sum())} confident points"
    src = unproject_pixels(depth, K, c2w, kf.pix[m])
    res = robust_sim3(src, kf.points[m], max_points=VERIFY_POINTS, seed=seed)
    if not res.ok:
        return None, f"frame {kf.index}: {res.reason}"
    # The rotation from the two predictions of this camera (a depth warp tilts points, not cameras), as placement
    # does with global consistency; scale and translation from the points.
    R = orthonormalize(np.asarray(kf.c2w, np.float64)[:3, :3] @ np.asarray(c2w, np.float64)[:3, :3].T)
    cameras = False
    if np.degrees(np.arccos(np.clip((np.trace(R.T @ res.sim3.R) - 1) / 2, -1, 1))) <= CAMERA_ROTATION_MAX_DEG:
        fit = robust_scale_translation(src, kf.points[m], R)
        if fit.ok:
            res, cameras = fit, True
    # The stored points are in a gauge normalised to median depth 1: the rmse is already relative.
    info = {"inlier_ratio": round(res.inlier_ratio, 3), "rmse": round(res.rmse, 4)}
    if res.inlier_ratio < min_inliers:
        return None, f"frame {kf.index}: inlier ratio {res.inlier_ratio:.2f} < {min_inliers}"
    if res.rmse > max_rmse:
        return None, f"frame {kf.index}: relative rmse {res.rmse:.3f} > {max_rmse}"
    if pin_cameras and cameras:
        # The edge: this camera's two predictions made to coincide, only the scale from the points. The points' own
        # translation (verified above) carries the loop view's depth warp: a few % of the depth along the view,
        # a bias every loop edge of the closure shares (the loop gap; bench/README.md "Loop edges at the cameras").
        pin = robust_scale_about_centres(src, kf.points[m], R, np.asarray(c2w, np.float64)[:3, 3],
                                         np.asarray(kf.c2w, np.float64)[:3, 3], max_points=VERIFY_POINTS, seed=seed)
        if pin.ok:
            info["pinned_scale"] = round(pin.scale / max(res.scale, 1e-12), 4)  # against the points' scale
            return pin.sim3, info
    return res.sim3, info


def overlap(depth_q, depth_c, K_q, K_c, c2w_q, c2w_c, keep_q, rng: np.random.Generator, n: int = 2000) -> float:
    """Fraction of the query view's confident points that the candidate view sees at a consistent depth."""
    idx = np.flatnonzero(keep_q.reshape(-1))
    if not len(idx):
        return 0.0
    idx = rng.choice(idx, size=min(n, len(idx)), replace=False)
    pts = unproject_pixels(depth_q, K_q, c2w_q, idx).astype(np.float64)
    w2c = np.linalg.inv(np.asarray(c2w_c, np.float64))
    cam = pts @ w2c[:3, :3].T + w2c[:3, 3]
    z = cam[:, 2]
    h, w = depth_c.shape
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = cam @ np.asarray(K_c, np.float64).T
        u, v = np.rint(uv[:, 0] / z), np.rint(uv[:, 1] / z)
    ok = (z > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    if not ok.any():
        return 0.0
    d = depth_c[v[ok].astype(int), u[ok].astype(int)]
    seen = np.abs(d - z[ok]) <= OVERLAP_DEPTH_TOL * z[ok]
    return float(seen.sum() / len(idx))


def verify_loop(query: Keyframe, cand: Keyframe, depth, K, c2w, keep, *, min_inliers: float, max_rmse: float,
                min_overlap: float, seed: int = 0, pin_cameras: bool = True) -> LoopCheck:
    """Verify a 2-view loop window (view 0 = candidate, view 1 = query, in the loop window's gauge). With
    pin_cameras the edge maps each loop view's camera centre onto its earlier prediction (scale from the points);
    the tests (inliers, rmse, overlap) are the points' either way."""
    a_c, ic = _align_view(cand, depth[0], K[0], c2w[0], keep[0], min_inliers, max_rmse, seed, pin_cameras)
    if a_c is None:
        return LoopCheck(False, ic)
    a_q, iq = _align_view(query, depth[1], K[1], c2w[1], keep[1], min_inliers, max_rmse, seed + 1, pin_cameras)
    if a_q is None:
        return LoopCheck(False, iq)
    rng = np.random.default_rng(seed)
    ov = min(overlap(depth[1], depth[0], K[1], K[0], c2w[1], c2w[0], keep[1], rng),
             overlap(depth[0], depth[1], K[0], K[1], c2w[0], c2w[1], keep[0], rng))
    info = {"candidate_fit": ic, "query_fit": iq, "overlap": round(ov, 3)}
    if ov < min_overlap:
        return LoopCheck(False, f"overlap {ov:.2f} < {min_overlap}", info=info)
    # loop gauge -> candidate gauge, composed with query gauge -> loop gauge.
    return LoopCheck(True, None, a_c.compose(a_q.inverse()), info)


def depth_scale(depth: np.ndarray) -> float:
    d = np.asarray(depth)
    d = d[np.isfinite(d) & (d > 0)]
    return median(d) if d.size else 1.0
