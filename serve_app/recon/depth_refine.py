"""Multi-view depth-consistency refinement of one window: a per-view low-order depth field. Pure numpy.

A feed-forward model's depth maps are wrong at low frequency: each view's depth is a little tilted or bowed,
independently of the other views. A window's Sim(3) placement cannot undo that (one transform for all views),
so every view's warp ends up in the map. But the views of a window see the same surfaces: view i's points,
projected into view j, should have view j's depth there. Each view gets a multiplicative field

    depth_true(p) = depth(p) x exp(-theta_i . B(p)),   B = (x tilt, y tilt, radial bowl[, constant])

(x, y the pixel position over the half-width; each basis function has unit RMS over the image and, apart from
the constant, zero mean), fitted by robust Gauss-Newton (Huber weights, a hard cut at `tol`) on the log-depth
disagreements of sampled pixels over every ordered pair of views. A zero-mean Gaussian prior of std `prior_std`
per coefficient fixes the gauge: a field shared by all views (which nearly coincident cameras cannot tell from
the truth) stays near the identity, per-view differences follow the data. The cost: ~100 pixels per view, every
compared pair linearised in one vectorised pass, and an (N*B)^2 normal system reweighted a few times on that one
linearisation (the fields move the correspondences by a fraction of a pixel): a few ms per window.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

MAD_TO_SIGMA = 1.4826
HUBER_K = 1.345


@dataclass
class RefineResult:
    coef: np.ndarray  # (N, B) fitted log-warp per view; the refined depth is depth x exp(-coef . B)
    depth: np.ndarray  # (N, H, W) refined depth (the input's dtype)
    rms_before: float  # robust RMS of the pairwise log-depth disagreement (inliers), before / after
    rms_after: float
    num_residuals: int
    ok: bool
    reason: str | None = None
    c2w: np.ndarray | None = None  # (N, 4, 4) refined cameras (the input's when poses were not fitted)


def basis_at(u: np.ndarray, v: np.ndarray, h: int, w: int, constant: bool = False) -> np.ndarray:
    """(k, B) field basis at (continuous) pixel coordinates u (column), v (row) of an h x w image."""
    half = max((w - 1) / 2.0, 1e-9)
    x = (np.asarray(u, np.float64) - (w - 1) / 2.0) / half
    y = (np.asarray(v, np.float64) - (h - 1) / 2.0) / half
    # Image-wide moments of x^2, y^2 and of the bowl, for zero mean and unit RMS (closed form on the pixel grid).
    gx = (np.arange(w) - (w - 1) / 2.0) / half
    gy = (np.arange(h) - (h - 1) / 2.0) / half
    mx2, my2 = float((gx ** 2).mean()), float((gy ** 2).mean())
    mx4, my4 = float((gx ** 4).mean()), float((gy ** 4).mean())
    r2_mean = mx2 + my2
    r2_var = (mx4 + my4 + 2 * mx2 * my2) - r2_mean ** 2
    cols = [x / np.sqrt(mx2), y / np.sqrt(max(my2, 1e-12)), (x * x + y * y - r2_mean) / np.sqrt(max(r2_var, 1e-12))]
    if constant:
        cols.append(np.ones_like(x))
    return np.stack(cols, axis=-1)


@lru_cache(maxsize=8)
def _grid_basis(h: int, w: int, constant: bool, f32: bool = False) -> np.ndarray:
    """(B, H*W) basis over every pixel (cached: a stream's windows share one size); float32 for the refined map."""
    v, u = np.mgrid[0:h, 0:w]
    B = basis_at(u.reshape(-1), v.reshape(-1), h, w, constant=constant).T.astype(np.float32 if f32 else np.float64)
    B.flags.writeable = False
    return B


def field(coef: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, H, W) log-warp coef . B over every pixel of each view."""
    coef = np.asarray(coef, np.float64)
    return (coef @ _grid_basis(h, w, coef.shape[1] == 4)).reshape(len(coef), h, w)


def _bilinear(depth: np.ndarray, u: np.ndarray, v: np.ndarray, view: np.ndarray | None = None) -> np.ndarray:
    """Bilinear depth at (u, v) (inside [0, w-1] x [0, h-1]) of a (H, W) map, or of maps[view] for a stack
    (N, H, W); NaN where a neighbour is not a positive depth."""
    h, w = depth.shape[-2:]
    u0 = np.clip(np.floor(u).astype(np.int64), 0, w - 2)
    v0 = np.clip(np.floor(v).astype(np.int64), 0, h - 2)
    fu, fv = u - u0, v - v0
    flat = depth.reshape(-1)
    i = v0 * w + u0
    if view is not None:
        i = i + np.asarray(view, np.int64) * (h * w)
    d00, d01, d10, d11 = flat[i], flat[i + 1], flat[i + w], flat[i + w + 1]
    d = (d00 * (1 - fu) * (1 - fv) + d01 * fu * (1 - fv) + d10 * (1 - fu) * fv + d11 * fu * fv)
    # A depth edge between the neighbours is not a surface to compare against (nor is a missing depth).
    lo = np.minimum(np.minimum(d00, d01), np.minimum(d10, d11))
    hi = np.maximum(np.maximum(d00, d01), np.maximum(d10, d11))
    return np.where((lo > 0) & (hi <= 1.1 * lo), d, np.nan)


def _skew_rotation(w: np.ndarray) -> np.ndarray:
    """Rotation matrices (n, 3, 3) of rotation vectors w (n, 3) (Rodrigues)."""
    th = np.linalg.norm(w, axis=1)
    k = w / np.maximum(th, 1e-300)[:, None]
    Kx = np.zeros((len(w), 3, 3))
    Kx[:, 0, 1], Kx[:, 0, 2], Kx[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    Kx[:, 1, 0], Kx[:, 2, 0], Kx[:, 2, 1] = k[:, 2], -k[:, 1], k[:, 0]
    s, c = np.sin(th)[:, None, None], np.cos(th)[:, None, None]
    return np.eye(3)[None] + s * Kx + (1 - c) * (Kx @ Kx)


def refine_window(depth: np.ndarray, intrinsics: np.ndarray, c2w: np.ndarray, mask: np.ndarray, *,
                  samples_per_view: int = 100, prior_std: float = 0.02, prior_rot_deg: float = 1.0,
                  prior_trans: float = 0.02, fit_poses: bool = False, tol: float = 0.1, iters: int = 1, irls: int = 3,
                  normal_step: int = 2, gauge_mean: bool = True, frame_index: np.ndarray | None = None,
                  max_gap: int | None = None, min_gain: float = 0.1, min_rms: float = 1e-3,
                  seed: int = 0) -> RefineResult:
    """Fit each view's low-order depth field, and (fit_poses) a small correction of each view's pose but the
    first (the window's gauge), by robust point-to-plane Gauss-Newton over every ordered pair of views: view i's
    sampled points against view j's surface where they project (normals from view j's smoothed depth).

    depth (N, H, W) z-depth, intrinsics (N, 3, 3), c2w (N, 4, 4), mask (N, H, W) the pixels to sample
    (confident). Priors (zero mean): `prior_std` per field coefficient, `prior_rot_deg` per rotation axis,
    `prior_trans` x the window's median depth per translation axis. Returns the refined depth and cameras
    (unchanged, ok False, when no two views overlap enough to fit). `iters` linearisations (all pairs in one
    vectorised pass), each followed by `irls` reweighted solves; rms_after is the fit's prediction on the last
    linearisation. Nothing is changed (ok, rms_after = rms_before) when the views already agree (rms_before below
    `min_rms`) or the fields would explain less than `min_gain` of their disagreement: exact or white-noise depth
    has no warp to remove, and a fit to its interpolation error or noise would only move it."""
    import cv2

    depth = np.asarray(depth)
    n, h, w = depth.shape
    nb = 3
    c2w = np.asarray(c2w, np.float64)
    K = np.asarray(intrinsics, np.float64)
    Kinv = np.linalg.inv(K)
    # Images stay float32 (lookups, smoothing, the refined map); the fit itself is float64 on the samples.
    good_px = np.isfinite(depth) & (depth > 0)
    dimg = np.where(good_px, depth, 0.0).astype(np.float32, copy=False)

    def fail(reason: str, used: int = 0) -> RefineResult:
        return RefineResult(np.zeros((n, nb)), depth, float("nan"), float("nan"), used, False, reason, c2w)

    if n < 2 or not good_px.any():
        return fail("fewer than 2 views")
    rng = np.random.default_rng(seed)
    # Samples: up to samples_per_view confident pixels per view, drawn uniformly over the image and kept where
    # the mask allows (listing every candidate costs more than the fit); a sparse mask falls back to the list.
    ok_pix = None
    mask = np.asarray(mask).reshape(n, -1)
    draw = rng.integers(0, h * w, (n, 2 * samples_per_view))
    hit = np.take_along_axis(mask, draw, axis=1) & np.take_along_axis(good_px.reshape(n, -1), draw, axis=1)
    own, pix = [], []
    for i in range(n):
        cand = np.unique(draw[i, hit[i]][:samples_per_view])  # the first hits: a uniform draw
        if len(cand) < samples_per_view // 2:
            if ok_pix is None:
                ok_pix = mask & good_px.reshape(n, -1)
            cand = np.flatnonzero(ok_pix[i])
            if len(cand) > samples_per_view:
                cand = np.unique(cand[rng.integers(0, len(cand), samples_per_view)])
        own.append(np.full(len(cand), i))
        pix.append(cand)
    O, flat_pix = np.concatenate(own), np.concatenate(pix)
    sv_, su_ = np.divmod(flat_pix, w)
    BI = basis_at(su_, sv_, h, w)
    rays = np.einsum("mij,jm->mi", Kinv[O], np.stack([su_, sv_, np.ones_like(su_)]).astype(np.float64))
    DI = dimg.reshape(n, -1)[O, flat_pix].astype(np.float64)
    med = float(np.median(DI)) if len(DI) else 1.0
    # Pairs compared: every two views, or (max_gap) those at most max_gap frames apart: far views see less of
    # the same surfaces and their pose errors look like depth warps over the longer baseline.
    order = np.arange(n) if frame_index is None else np.asarray(frame_index)
    paired = ~np.eye(n, dtype=bool)
    if max_gap is not None:
        paired &= np.abs(order[:, None] - order[None, :]) <= max_gap
    linked = paired.any(axis=1)
    ps, pj = np.nonzero(paired[O])  # (sample, target view) of every comparison
    # Smoothed depth for normals (per-pixel noise makes 1-pixel differences useless); invalid pixels excluded.
    # Only views something is compared against are needed.
    all_valid = bool(good_px.all())
    valid = None if all_valid else good_px.astype(np.float32)
    smooth = np.zeros_like(dimg)
    for j in np.flatnonzero(paired.any(axis=0)):
        num = cv2.blur(dimg[j], (5, 5))
        if all_valid:  # the box over valid pixels is 1 everywhere (reflected borders)
            smooth[j] = num
            continue
        den = cv2.blur(valid[j], (5, 5))
        smooth[j] = np.where(den > 0.99, num / np.maximum(den, 1e-9), 0.0)
    npar = 6 + nb
    # Free parameters: each linked view's field; with fit_poses its rotation and translation too, except view 0
    # (the window's gauge). The rest stay as they are.
    free = np.zeros((n, npar), bool)
    free[linked, 6:] = True
    if fit_poses:
        free[linked, :6] = True
        free[0, :6] = False
    col = np.full((n, npar), -1)
    col[free] = np.arange(int(free.sum()))
    nfree = int(free.sum())
    prior = np.tile(np.r_[np.full(3, np.radians(prior_rot_deg)), np.full(3, prior_trans), np.full(nb, prior_std)],
                    (n, 1))[free]
    R = c2w[:, :3, :3].copy()
    C = c2w[:, :3, 3].copy()
    coef = np.zeros((n, nb))
    s = float(normal_step)

    def linearise():
        """Residuals (relative to view j's depth), their Jacobian over the free parameters (dense, one row per
        comparison), at the current state."""
        a_s = np.einsum("mij,mj->mi", R[O], rays) * (DI * np.exp(-np.einsum("mk,mk->m", BI, coef[O])))[:, None]
        Pw = C[O] + a_s
        Rj = R[pj]
        cam = np.einsum("ml,mlk->mk", Pw[ps] - C[pj], Rj)
        z = cam[:, 2]
        Kj = K[pj]
        with np.errstate(divide="ignore", invalid="ignore"):
            uj = (Kj[:, 0, 0] * cam[:, 0] + Kj[:, 0, 1] * cam[:, 1]) / z + Kj[:, 0, 2]
            vj = Kj[:, 1, 1] * cam[:, 1] / z + Kj[:, 1, 2]
        ok = (z > 0) & (uj >= 0) & (uj <= w - 1 - s) & (vj >= 0) & (vj <= h - 1 - s)
        e = np.flatnonzero(ok)
        z, uj, vj, jv = z[e], uj[e], vj[e], pj[e]
        dj = _bilinear(dimg, uj, vj, jv)
        s0, su, sv = _bilinear(smooth, np.concatenate([uj, uj + s, uj]), np.concatenate([vj, vj, vj + s]),
                               np.tile(jv, 3)).reshape(3, -1)  # the three smoothed lookups in one call
        good = np.isfinite(dj) & np.isfinite(s0) & np.isfinite(su) & np.isfinite(sv)
        e, z, uj, vj, jv, dj, s0, su, sv = (x[good] for x in (e, z, uj, vj, jv, dj, s0, su, sv))
        Bj = basis_at(uj, vj, h, w)
        fj = np.exp(-np.einsum("mk,mk->m", Bj, coef[jv]))
        ki = Kinv[jv]
        ray0 = ki[:, :, 0] * uj[:, None] + ki[:, :, 1] * vj[:, None] + ki[:, :, 2]
        x0 = ray0 * s0[:, None]
        xu = (ray0 + s * ki[:, :, 0]) * su[:, None]
        xv = (ray0 + s * ki[:, :, 1]) * sv[:, None]
        nc = np.cross(xu - x0, xv - x0)
        nc /= np.maximum(np.linalg.norm(nc, axis=1), 1e-300)[:, None]
        Rv = R[jv]
        nw = np.einsum("mkl,ml->mk", Rv, nc)  # world normal
        aj = np.einsum("mkl,ml->mk", Rv, ray0) * (dj * fj)[:, None]  # view j's surface point at q, minus its centre
        smp = ps[e]
        iv = O[smp]
        ai = a_s[smp]
        inv = 1.0 / z
        r = np.einsum("ij,ij->i", nw, Pw[smp] - C[jv] - aj) * inv
        # Occlusions: the point is far in front of or behind view j's surface along its ray.
        vis = np.abs(np.log(z / (dj * fj))) <= tol
        m = len(r)
        Jd = np.zeros((m, nfree))
        rows = np.arange(m)
        blocks = [(iv, -(np.einsum("ij,ij->i", nw, ai) * inv)[:, None] * BI[smp], 6),
                  (jv, (np.einsum("ij,ij->i", nw, aj) * inv)[:, None] * Bj, 6)]
        if fit_poses:
            blocks += [(iv, np.cross(ai, nw) * inv[:, None], 0), (iv, nw * (med * inv)[:, None], 3),
                       (jv, -np.cross(aj, nw) * inv[:, None], 0), (jv, -nw * (med * inv)[:, None], 3)]
        for view, vals, p0 in blocks:
            for k in range(3):
                c = col[view, p0 + k]
                f = c >= 0
                if f.any():
                    Jd[rows[f], c[f]] = vals[f, k]
        return r[vis], Jd[vis]

    state = np.zeros(nfree)  # accumulated (rotation vector, translation / med, field) of the free parameters
    G = None
    if gauge_mean:
        # Gauge: the views' mean field is the identity (a field shared by all views is unobservable).
        G = np.zeros((nb, nfree))
        for i in np.flatnonzero(linked):
            G[:, col[i, 6:]] = np.eye(nb)
    def robust(r: np.ndarray) -> tuple[np.ndarray, float, float, int]:
        """Huber weights (a hard cut at tol), the noise scale, the weighted RMS and the inlier count."""
        a = np.abs(r)
        inl = a <= tol
        sigma = max(MAD_TO_SIGMA * float(np.median(a[inl])), 1e-6) if inl.any() else 1e-6
        k = HUBER_K * sigma
        wt = np.where(a <= k, 1.0, k / np.maximum(a, 1e-300)) * inl
        return wt, sigma, float(np.sqrt(np.average(r ** 2, weights=np.maximum(wt, 1e-12)))), int(inl.sum())

    rms_before = rms = float("nan")
    used = 0
    pg = 1e4 * G.T @ G if G is not None else np.zeros((nfree, nfree))
    for it in range(max(iters, 1)):
        r, J = linearise()
        if not len(r):
            return fail("no two views overlap")
        wt, sigma, rms, used = robust(r)
        if used < 10 * n:
            return fail("views disagree everywhere", len(r))
        if it == 0:
            rms_before = rms
        # IRLS on this linearisation: the weights follow the predicted residuals r + J step (the fields move
        # the correspondences by a fraction of a pixel, so one linearisation serves several reweightings).
        step_free = np.zeros(nfree)
        for _ in range(max(irls, 1)):
            P = np.diag((sigma / prior) ** 2) + pg
            Jw = J * wt[:, None]
            step_free = np.linalg.solve(P + Jw.T @ J, -P @ state - Jw.T @ r)
            wt, sigma, rms, used = robust(r + J @ step_free)
        state += step_free
        step = np.zeros((n, npar))
        step[free] = step_free
        R = _skew_rotation(step[:, :3]) @ R
        C = C + step[:, 3:6] * med
        coef = coef + step[:, 6:]
    if rms_before < min_rms or rms > (1.0 - min_gain) * rms_before:
        return RefineResult(np.zeros((n, nb)), depth, rms_before, rms_before, used, True, None, c2w)
    refined = dimg * np.exp(-(coef.astype(np.float32) @ _grid_basis(h, w, False, True)).reshape(n, h, w))
    if not good_px.all():
        refined[~good_px] = depth[~good_px]  # what was not a depth stays as it was
    refined = refined.astype(depth.dtype, copy=False)
    out_c2w = c2w.copy()
    out_c2w[:, :3, :3] = R
    out_c2w[:, :3, 3] = C
    return RefineResult(coef, refined, rms_before, rms, used, True, None, out_c2w)
