"""Multi-view fusion of a window's map points. Pure numpy.

The views of a window see the same surfaces. A map point of view j, projected into another view k of the window,
should have view k's depth there. Two uses:

- filter: a confident outlier (depth off by tens of percent, as confident as its surroundings, so confidence
  cannot find it) disagrees with the other views where they see it. A point is kept when some other view agrees
  within `tol` relative depth, or when no other view sees it (nothing to judge it by).
- fuse: each view's depth carries its own error (pixel noise, what is left of its low-frequency warp after
  depth_refine, its pose error). The agreeing views' estimates of the same surface point (view k's depth along
  view k's ray through the point) are averaged with view j's, so the map point is the mean of up to N
  independent estimates instead of one.
"""

from __future__ import annotations

import numpy as np


def bilinear_depth(depth: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear z-depth of a (H, W) map at continuous pixel coordinates (u column, v row); NaN outside the image,
    where a neighbour is not a positive depth, or across a depth edge (neighbours more than 10 % apart: no single
    surface to interpolate)."""
    depth = np.asarray(depth)
    h, w = depth.shape
    out = np.full(len(u), np.nan)
    inside = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (u <= w - 1) & (v >= 0) & (v <= h - 1)
    i = np.flatnonzero(inside)
    if not len(i):
        return out
    uu, vv = u[i], v[i]
    u0 = np.minimum(np.floor(uu).astype(np.int64), w - 2 if w > 1 else 0)
    v0 = np.minimum(np.floor(vv).astype(np.int64), h - 2 if h > 1 else 0)
    fu, fv = uu - u0, vv - v0
    flat = depth.reshape(-1).astype(np.float64)
    k = v0 * w + u0
    du, dv = (1 if w > 1 else 0), (w if h > 1 else 0)
    d00, d01, d10, d11 = flat[k], flat[k + du], flat[k + dv], flat[k + du + dv]
    d = d00 * (1 - fu) * (1 - fv) + d01 * fu * (1 - fv) + d10 * (1 - fu) * fv + d11 * fu * fv
    with np.errstate(invalid="ignore"):
        lo = np.minimum(np.minimum(d00, d01), np.minimum(d10, d11))
        hi = np.maximum(np.maximum(d00, d01), np.maximum(d10, d11))
        ok = (lo > 0) & (hi <= 1.1 * lo)
    out[i[ok]] = d[ok]
    return out


def fuse_points(points: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray, w2c: np.ndarray,
                views: list[int] | np.ndarray, tol: float, fuse: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Points (k, 3) of one view, in the window's gauge, against the other `views` of the window (depth (N, H, W)
    z-depth, intrinsics (N, 3, 3), w2c (N, 3|4, 4)). Returns (points, keep): keep (k,) bool is False where some
    view sees the point and none agrees within `tol` relative depth; points are the mean of the point and every
    agreeing view's estimate of it (that view's depth along its ray through the point) when `fuse`, else the
    input."""
    p = np.asarray(points, np.float64).reshape(-1, 3)
    n = len(p)
    seen = np.zeros(n, bool)
    agree = np.zeros(n, bool)
    total = p.copy() if fuse else None
    count = np.ones(n)
    for k in views:
        E = np.asarray(w2c[k], np.float64)
        K = np.asarray(intrinsics[k], np.float64)
        cam = p @ E[:3, :3].T + E[:3, 3]
        z = cam[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = (K[0, 0] * cam[:, 0] + K[0, 1] * cam[:, 1]) / z + K[0, 2]
            v = K[1, 1] * cam[:, 1] / z + K[1, 2]
        u[~(z > 0)] = np.nan
        d = bilinear_depth(depth[k], u, v)
        valid = np.isfinite(d)
        seen |= valid
        with np.errstate(invalid="ignore"):
            ok = valid & (np.abs(d - z) <= tol * z)
        agree |= ok
        if fuse and ok.any():
            # View k's estimate: the point moved along k's ray to k's depth (camera centre c = -R^T t).
            c = -E[:3, :3].T @ E[:3, 3]
            i = np.flatnonzero(ok)
            total[i] += c + (p[i] - c) * (d[i] / z[i])[:, None]
            count[i] += 1
    keep = agree | ~seen
    out = (total / count[:, None]).astype(np.float32) if fuse else np.asarray(points, np.float32)
    return out, keep
