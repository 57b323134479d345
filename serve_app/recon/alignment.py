"""Sim(3) alignment (weighted Umeyama, robust IRLS), trajectory error and Chamfer distance. Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serve_app.recon.geometry import Sim3, finite_rows, median

MAD_TO_SIGMA = 1.4826


def umeyama_sim3(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> Sim3:
    """Weighted least-squares Sim(3) with dst ≈ s R src + t (Umeyama 1991, reflection-corrected).

    When src has no spread the scale is left at 1 (translation only).
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    return _umeyama_t(np.ascontiguousarray(src.T), np.ascontiguousarray(dst.T), w)


@dataclass
class AlignmentResult:
    sim3: Sim3
    ok: bool
    reason: str | None
    num_points: int  # points used (after dropping invalid ones and subsampling)
    inlier_ratio: float  # weighted fraction with residual inside the final Huber threshold
    rmse: float  # residual RMS over those inliers, in dst units
    scale: float

    def to_dict(self) -> dict:
        return {"ok": self.ok, "reason": self.reason, "num_points": self.num_points,
                "inlier_ratio": self.inlier_ratio, "rmse": self.rmse, "scale": self.scale}


def _fail(reason: str, n: int = 0) -> AlignmentResult:
    return AlignmentResult(Sim3.identity(), False, reason, n, 0.0, float("nan"), float("nan"))


def _residuals(sim: Sim3, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    return np.linalg.norm(sim.s * (src @ sim.R.T) + sim.t - dst, axis=1)


# robust_sim3 evaluates dozens of fits on the same (subsampled) points, so it keeps them transposed, (3, n)
# C-contiguous: R @ srcT is a fast BLAS product (src @ R.T on (n, 3) is not) and every per-axis pass is
# contiguous. Same arithmetic as umeyama_sim3 / _residuals above.

def _row_medians(x: np.ndarray) -> np.ndarray:
    """np.median(x, axis=1) for a 2-D array without NaNs, by partition (np.median along an axis is ~5x slower)."""
    k = x.shape[1] // 2
    part = np.partition(x, k, axis=1)  # one kth: partitioning at two is ~5x slower along an axis
    if x.shape[1] % 2:
        return part[:, k]
    return (part[:, :k].max(1) + part[:, k]) / 2.0


def _residuals_t(sim: Sim3, srcT: np.ndarray, dstT: np.ndarray) -> np.ndarray:
    d = sim.R @ srcT
    d *= sim.s
    d += sim.t[:, None]
    d -= dstT
    d *= d
    return np.sqrt(d[0] + d[1] + d[2])


def _umeyama_t(srcT: np.ndarray, dstT: np.ndarray, w: np.ndarray) -> Sim3:
    """umeyama_sim3 on (3, n) points with weights (n,)."""
    w = w / w.sum()
    mu_s = srcT @ w
    mu_d = dstT @ w
    xs = srcT - mu_s[:, None]
    xd = dstT - mu_d[:, None]
    var_s = float(((xs * xs).sum(0)) @ w)
    cov = (xd * w) @ xs.T
    U, D, Vt = np.linalg.svd(cov)
    S = np.ones(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        S[2] = -1.0
    R = (U * S) @ Vt
    s = float((D * S).sum() / var_s) if var_s > 1e-300 else 1.0
    t = mu_d - s * (R @ mu_s)
    return Sim3(s, R, t)


def _umeyama_batch(S: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unweighted umeyama_sim3 of h point sets at once: S, D (h, m, 3) -> s (h,), R (h, 3, 3), t (h, 3)."""
    mu_s, mu_d = S.mean(1), D.mean(1)
    xs, xd = S - mu_s[:, None], D - mu_d[:, None]
    var_s = (xs * xs).sum((1, 2)) / S.shape[1]
    cov = np.einsum("hki,hkj->hij", xd, xs) / S.shape[1]
    U, Dg, Vt = np.linalg.svd(cov)
    sign = np.ones((len(S), 3))
    sign[np.linalg.det(U) * np.linalg.det(Vt) < 0, 2] = -1.0
    R = (U * sign[:, None, :]) @ Vt
    with np.errstate(all="ignore"):
        s = np.where(var_s > 1e-300, (Dg * sign).sum(1) / var_s, 1.0)
    t = mu_d - s[:, None] * np.einsum("hij,hj->hi", R, mu_s)
    return s, R, t


def robust_sim3(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None, *, iters: int = 10,
                huber_k: float = 1.345, min_points: int = 50, max_points: int = 50000,
                scale_bounds: tuple[float, float] = (1e-4, 1e4), seed: int = 0,
                degenerate_ratio: float = 1e-3, hypotheses: int = 32, score_points: int = 2000,
                tol: float = 1e-6) -> AlignmentResult:
    """Robust Sim(3) dst ≈ s R src + t: IRLS with Huber weights (threshold huber_k x a MAD residual scale)
    times the given confidence weights. Bad data gives ok=False and a reason; it never raises on bad data.

    Huber alone is biased by one-sided gross outliers and converges slowly from a contaminated start, so the
    IRLS starts from the best of the plain fit and `hypotheses` 4-point fits (least median residual, scored on
    `score_points` of the points: a median needs far fewer points than the fit), and ends with a refit on the
    points inside the final Huber threshold.

    `degenerate_ratio`: the src (and dst) spread's second principal std over its first must exceed this,
    otherwise the points are (nearly) collinear and the rotation about that line is undetermined.
    `tol`: the IRLS stops once an iteration changes the fit by less than this (relative scale + translation +
    rotation entries). The result comes from the inlier refit, whose inlier set settles long before the IRLS
    converges to 1e-10 (same results on recorded da3-small windows, 40 % less time).
    """
    try:
        src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
        dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    except (ValueError, TypeError) as exc:
        return _fail(f"bad input shapes: {exc}")
    if len(src) != len(dst):
        return _fail(f"src and dst differ in length ({len(src)} vs {len(dst)})")
    n_in = len(src)
    if weights is None:
        w0 = np.ones(n_in)
    else:
        w0 = np.asarray(weights, dtype=np.float64).reshape(-1)
        if len(w0) != n_in:
            return _fail(f"weights length {len(w0)} != {n_in} points")
    finite = finite_rows(src) & finite_rows(dst) & np.isfinite(w0)
    valid = finite & (w0 > 0)
    n_valid = int(valid.sum())
    if n_valid < max(min_points, 3):
        if n_in and finite.sum() < n_in:
            return _fail(f"non-finite input: {n_in - int(finite.sum())} of {n_in} points are NaN/inf, "
                         f"{n_valid} valid left (need {min_points})", n_valid)
        return _fail(f"too few valid points: {n_valid} (need {min_points})", n_valid)
    keep = np.flatnonzero(valid)
    if n_valid > max_points:
        keep = keep[np.random.default_rng(seed).choice(n_valid, size=max_points, replace=False)]
    src, dst, w0 = src[keep], dst[keep], w0[keep]
    n = len(src)

    for name, pts in (("src", src), ("dst", dst)):
        mu = (w0 @ pts) / w0.sum()
        sv = np.linalg.svd((pts - mu) * np.sqrt(w0 / w0.sum())[:, None], compute_uv=False)
        if not np.isfinite(sv).all():
            return _fail(f"non-finite {name} spread", n)
        if sv[0] <= 1e-12 * (1.0 + np.abs(mu).max()):
            return _fail(f"{name} points have no spread (all at one location)", n)
        if sv[1] < degenerate_ratio * sv[0]:
            return _fail(f"{name} points nearly collinear (spread ratio {sv[1] / sv[0]:.2e})", n)

    rng = np.random.default_rng(seed)
    srcT, dstT = np.ascontiguousarray(src.T), np.ascontiguousarray(dst.T)
    sim = _umeyama_t(srcT, dstT, w0)
    # Hypotheses are ranked on a fixed subsample; the IRLS below uses every point.
    sub = np.sort(rng.choice(n, size=score_points, replace=False)) if n > score_points else slice(None)
    subS, subD = np.ascontiguousarray(srcT[:, sub]), np.ascontiguousarray(dstT[:, sub])
    best = median(_residuals_t(sim, subS, subD))
    # All minimal sets in one draw (confidence-weighted, with replacement: a repeated point leaves 3, enough).
    sets = rng.choice(n, size=(hypotheses, 4), replace=True, p=w0 / w0.sum())
    with np.errstate(all="ignore"):
        # Fitted and scored together: (h, 3, n) residuals, one median per hypothesis.
        hs, hR, ht = _umeyama_batch(src[sets], dst[sets])
        d = hR @ subS
        d *= hs[:, None, None]
        d += ht[:, :, None]
        d -= subD
        d *= d
        r = np.sqrt(d[:, 0] + d[:, 1] + d[:, 2])  # (h, m); summing the axes by hand beats .sum(1) ~5x
        bad = np.isnan(r).any(1)
        r[bad] = np.inf
        meds = _row_medians(r)
        meds[bad] = np.nan
        usable = np.isfinite(hs) & finite_rows(ht) & (hs > 0) & ~np.isnan(meds)
        if usable.any():
            i = int(np.flatnonzero(usable)[np.argmin(meds[usable])])
            if meds[i] < best:
                sim, best = Sim3(hs[i], hR[i], ht[i]), float(meds[i])
    thresh = np.inf
    # Floor so exact data (sigma 0) keeps unit weights instead of dividing by zero.
    floor = 1e-9 * (1.0 + float(np.abs(dst).max()))
    for _ in range(max(iters, 1)):
        r = _residuals_t(sim, srcT, dstT)
        sigma = MAD_TO_SIGMA * median(r)
        thresh = max(huber_k * sigma, floor)
        hub = np.where(r <= thresh, 1.0, thresh / np.maximum(r, 1e-300))
        w = w0 * hub
        new = _umeyama_t(srcT, dstT, w)
        if not (np.isfinite(new.s) and np.isfinite(new.R).all() and np.isfinite(new.t).all()):
            return _fail("non-finite result", n)
        change = abs(new.s - sim.s) / max(abs(sim.s), 1e-300) + float(np.abs(new.t - sim.t).max()) / (
            1.0 + float(np.abs(sim.t).max())) + float(np.abs(new.R - sim.R).max())
        sim = new
        if change < tol:
            break
    for _ in range(2):
        inl = _residuals_t(sim, srcT, dstT) <= thresh
        if inl.sum() < max(min_points, 3):
            break
        sim = _umeyama_t(srcT[:, inl], dstT[:, inl], w0[inl])

    if not (np.isfinite(sim.s) and np.isfinite(sim.R).all() and np.isfinite(sim.t).all()):
        return _fail("non-finite result", n)
    if not (scale_bounds[0] <= sim.s <= scale_bounds[1]):
        return AlignmentResult(sim, False, f"scale {sim.s:.3g} outside bounds {scale_bounds}", n, 0.0,
                               float("nan"), float(sim.s))
    r = _residuals_t(sim, srcT, dstT)
    inl = r <= thresh
    inlier_ratio = float(w0[inl].sum() / w0.sum())
    rmse = float(np.sqrt(np.average(r[inl] ** 2, weights=w0[inl]))) if inl.any() else float("nan")
    return AlignmentResult(sim, True, None, n, inlier_ratio, rmse, float(sim.s))


def camera_centers(c2w: np.ndarray) -> np.ndarray:
    return np.asarray(c2w, dtype=np.float64)[..., :3, 3]


def ate_rmse(est_c2w: np.ndarray, gt_c2w: np.ndarray) -> tuple[float, Sim3]:
    """Camera-centre RMSE after one global Sim(3) taking estimated centres onto ground truth."""
    est = camera_centers(est_c2w).reshape(-1, 3)
    gt = camera_centers(gt_c2w).reshape(-1, 3)
    if len(est) != len(gt) or len(est) == 0:
        raise ValueError(f"need equal non-empty trajectories, got {len(est)} and {len(gt)}")
    sim = umeyama_sim3(est, gt)
    err = np.linalg.norm(sim.s * (est @ sim.R.T) + sim.t - gt, axis=1)
    return float(np.sqrt(np.mean(err ** 2))), sim


def trajectory_length(c2w: np.ndarray) -> float:
    c = camera_centers(c2w).reshape(-1, 3)
    return float(np.linalg.norm(np.diff(c, axis=0), axis=1).sum()) if len(c) > 1 else 0.0


def nearest_distances(query: np.ndarray, ref: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Distance from each query point to its nearest ref point (brute force in chunks, float64 BLAS)."""
    q = np.asarray(query, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    rr = np.einsum("ij,ij->i", r, r)
    out = np.empty(len(q))
    for i in range(0, len(q), chunk):
        qc = q[i:i + chunk]
        d2 = np.einsum("ij,ij->i", qc, qc)[:, None] - 2.0 * (qc @ r.T) + rr[None, :]
        out[i:i + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out


def chamfer_distance(a: np.ndarray, b: np.ndarray, max_points: int = 20000, seed: int = 0) -> float:
    """Symmetric Chamfer distance: (mean NN distance a->b + mean b->a) / 2, on at most max_points per cloud.

    scipy is not in the environment, so this is a chunked brute-force search (about a second at 20k x 20k).
    """
    rng = np.random.default_rng(seed)

    def prep(p):
        p = np.asarray(p, dtype=np.float64).reshape(-1, 3)
        p = p[np.isfinite(p).all(1)]
        if len(p) > max_points:
            p = p[rng.choice(len(p), size=max_points, replace=False)]
        return p

    a, b = prep(a), prep(b)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    centre = np.concatenate([a, b]).mean(0)  # keeps |x|^2 small so the expansion stays accurate
    a, b = a - centre, b - centre
    return float(0.5 * (nearest_distances(a, b).mean() + nearest_distances(b, a).mean()))


def irls_scale_translation(a: np.ndarray, b: np.ndarray, w0: np.ndarray, *, iters: int, floor: float,
                           huber_k: float = 1.345, tol: float = 0.0
                           ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, float]:
    """Huber IRLS of b ≈ s a + t (rotation already applied to `a`), prior weights w0, the Huber threshold
    huber_k robust sigmas of the residuals (at least `floor`). Stops early when the relative change of s and t
    falls under `tol` (0: runs all iters). Returns (s, t, residuals, weights, threshold) of the last iteration."""
    w = w0.copy()
    s, t = 1.0, np.zeros(3)
    r = np.zeros(len(a))
    thresh = np.inf
    for _ in range(iters):
        s_prev, t_prev = s, t
        wn = w / w.sum()
        ma, mb = wn @ a, wn @ b
        da, db = a - ma, b - mb
        s = float((wn * np.einsum("ij,ij->i", da, db)).sum() / max((wn * np.einsum("ij,ij->i", da, da)).sum(),
                                                                   1e-300))
        t = mb - s * ma
        r = np.linalg.norm(s * a + t - b, axis=1)
        thresh = max(huber_k * MAD_TO_SIGMA * median(r), floor)
        w = w0 * np.where(r <= thresh, 1.0, thresh / np.maximum(r, 1e-300))
        if tol and (abs(s - s_prev) / max(abs(s), 1e-300)
                    + float(np.abs(t - t_prev).max()) / (1.0 + float(np.abs(t).max()))) < tol:
            break
    return s, t, r, w, thresh


def robust_scale_translation(src: np.ndarray, dst: np.ndarray, R: np.ndarray, weights: np.ndarray | None = None, *,
                             iters: int = 10, huber_k: float = 1.345, min_points: int = 50, max_points: int = 2000,
                             seed: int = 0, tol: float = 1e-6) -> AlignmentResult:
    """dst ≈ s R src + t with the rotation given (e.g. from the cameras): robust (Huber IRLS) scale and
    translation. A depth map's low-frequency warp tilts its points, which a free rotation fit absorbs (a degree
    or two per window, a random walk along a stream); the cameras' rotations do not see the warp."""
    src = np.asarray(src, np.float64).reshape(-1, 3)
    dst = np.asarray(dst, np.float64).reshape(-1, 3)
    w0 = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    ok = finite_rows(src) & finite_rows(dst) & np.isfinite(w0) & (w0 > 0)
    if ok.sum() < max(min_points, 3):
        return _fail(f"too few valid points: {int(ok.sum())} (need {min_points})", int(ok.sum()))
    keep = np.flatnonzero(ok)
    if len(keep) > max_points:  # four unknowns: a couple of thousand points fix them (and keep this cheap)
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_points, replace=False))
    a, b, w0 = src[keep] @ np.asarray(R, np.float64).T, dst[keep], w0[keep]
    s, t, _, _, thresh = irls_scale_translation(a, b, w0, iters=iters, floor=1e-9 * (1.0 + float(np.abs(b).max())),
                                                huber_k=huber_k, tol=tol)
    if not (np.isfinite(s) and s > 0 and np.isfinite(t).all()):
        return _fail(f"bad scale {s:.3g}", len(a))
    r = np.linalg.norm(s * a + t - b, axis=1)
    inl = r <= thresh
    rmse = float(np.sqrt(np.average(r[inl] ** 2, weights=w0[inl]))) if inl.any() else float("nan")
    return AlignmentResult(Sim3(s, R, t), True, None, len(a), float(w0[inl].sum() / w0.sum()), rmse, s)


def robust_scale_about_centres(src: np.ndarray, dst: np.ndarray, R: np.ndarray, c_src: np.ndarray,
                               c_dst: np.ndarray, weights: np.ndarray | None = None, *, iters: int = 10,
                               huber_k: float = 1.345, min_points: int = 50, max_points: int = 2000, seed: int = 0,
                               tol: float = 1e-7) -> AlignmentResult:
    """dst ≈ s R (src - c_src) + c_dst: the Sim(3) that takes camera centre c_src onto c_dst (two predictions of
    one camera), the rotation given (from the cameras), only the scale from the points (Huber IRLS of the points'
    distances from the camera). A view's low-frequency depth warp (tilt, bowl) moves its points along the viewing
    rays; a free translation fit follows them and shifts the camera by a few % of the depth, which pinning the
    centre avoids (the warp then only scales, by about its mean)."""
    src = np.asarray(src, np.float64).reshape(-1, 3)
    dst = np.asarray(dst, np.float64).reshape(-1, 3)
    R = np.asarray(R, np.float64)
    c_src, c_dst = np.asarray(c_src, np.float64).reshape(3), np.asarray(c_dst, np.float64).reshape(3)
    w0 = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    ok = finite_rows(src) & finite_rows(dst) & np.isfinite(w0) & (w0 > 0)
    if ok.sum() < max(min_points, 1) or not (np.isfinite(c_src).all() and np.isfinite(c_dst).all()):
        return _fail(f"too few valid points: {int(ok.sum())} (need {min_points})", int(ok.sum()))
    keep = np.flatnonzero(ok)
    if len(keep) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_points, replace=False))
    a, b, w0 = (src[keep] - c_src) @ R.T, dst[keep] - c_dst, w0[keep]
    na = np.linalg.norm(a, axis=1)
    good = na > 0
    if good.sum() < max(min_points, 1):
        return _fail("points at the camera centre", int(good.sum()))
    s = median(np.linalg.norm(b[good], axis=1) / na[good])  # start: median distance ratio (robust to outliers)
    floor = 1e-9 * (1.0 + float(np.abs(b).max()))
    w, r, thresh = w0, np.zeros(len(a)), np.inf
    for _ in range(iters):
        r = np.linalg.norm(s * a - b, axis=1)
        thresh = max(huber_k * MAD_TO_SIGMA * median(r), floor)
        w = w0 * np.where(r <= thresh, 1.0, thresh / np.maximum(r, 1e-300))
        s_prev, s = s, float((w * np.einsum("ij,ij->i", a, b)).sum() / max((w * (na * na)).sum(), 1e-300))
        if abs(s - s_prev) <= tol * abs(s):
            break
    if not (np.isfinite(s) and s > 0):
        return _fail(f"bad scale {s:.3g}", len(a))
    r = np.linalg.norm(s * a - b, axis=1)
    inl = r <= thresh
    rmse = float(np.sqrt(np.average(r[inl] ** 2, weights=w0[inl]))) if inl.any() else float("nan")
    return AlignmentResult(Sim3(s, R, c_dst - s * (R @ c_src)), True, None, len(a),
                           float(w0[inl].sum() / w0.sum()), rmse, s)
