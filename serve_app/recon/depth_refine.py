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
the truth) stays near the identity, per-view differences follow the data. The cost is a few hundred pixels per
view and pair and an (N*B)^2 normal system: a few ms per window.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def field(coef: np.ndarray, h: int, w: int) -> np.ndarray:
    """(N, H, W) log-warp coef . B over every pixel of each view."""
    coef = np.asarray(coef, np.float64)
    v, u = np.mgrid[0:h, 0:w]
    B = basis_at(u.reshape(-1), v.reshape(-1), h, w, constant=coef.shape[1] == 4)  # (HW, B)
    return (coef @ B.T).reshape(len(coef), h, w)


def _bilinear(depth: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear depth at (u, v) (inside [0, w-1] x [0, h-1]); NaN where a neighbour is not a positive depth."""
    h, w = depth.shape
    u0 = np.clip(np.floor(u).astype(np.int64), 0, w - 2)
    v0 = np.clip(np.floor(v).astype(np.int64), 0, h - 2)
    fu, fv = u - u0, v - v0
    flat = depth.reshape(-1)
    i = v0 * w + u0
    d00, d01, d10, d11 = flat[i], flat[i + 1], flat[i + w], flat[i + w + 1]
    d = (d00 * (1 - fu) * (1 - fv) + d01 * fu * (1 - fv) + d10 * (1 - fu) * fv + d11 * fu * fv)
    good = (d00 > 0) & (d01 > 0) & (d10 > 0) & (d11 > 0)
    # A depth edge between the neighbours is not a surface to compare against.
    lo = np.minimum(np.minimum(d00, d01), np.minimum(d10, d11))
    hi = np.maximum(np.maximum(d00, d01), np.maximum(d10, d11))
    good &= hi <= 1.1 * lo
    return np.where(good, d, np.nan)


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
                  samples_per_view: int = 300, prior_std: float = 0.02, prior_rot_deg: float = 1.0,
                  prior_trans: float = 0.02, fit_poses: bool = False, tol: float = 0.1, iters: int = 2,
                  normal_step: int = 2, gauge_mean: bool = True, frame_index: np.ndarray | None = None,
                  max_gap: int | None = None, seed: int = 0) -> RefineResult:
    """Fit each view's low-order depth field, and (fit_poses) a small correction of each view's pose but the
    first (the window's gauge), by robust point-to-plane Gauss-Newton over every ordered pair of views: view i's
    sampled points against view j's surface where they project (normals from view j's smoothed depth).

    depth (N, H, W) z-depth, intrinsics (N, 3, 3), c2w (N, 4, 4), mask (N, H, W) the pixels to sample
    (confident). Priors (zero mean): `prior_std` per field coefficient, `prior_rot_deg` per rotation axis,
    `prior_trans` x the window's median depth per translation axis. Returns the refined depth and cameras
    (unchanged, ok False, when no two views overlap enough to fit)."""
    import cv2

    depth = np.asarray(depth)
    n, h, w = depth.shape
    nb = 3
    c2w = np.asarray(c2w, np.float64)
    K = np.asarray(intrinsics, np.float64)
    Kinv = np.linalg.inv(K)
    d64 = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float64)
    pos = d64[d64 > 0]

    def fail(reason: str, used: int = 0) -> RefineResult:
        return RefineResult(np.zeros((n, nb)), depth, float("nan"), float("nan"), used, False, reason, c2w)

    if n < 2 or not pos.size:
        return fail("fewer than 2 views")
    med = float(np.median(pos))
    rng = np.random.default_rng(seed)
    # Smoothed depth for normals (per-pixel noise makes 1-pixel differences useless); invalid pixels excluded.
    valid = (d64 > 0).astype(np.float64)
    smooth = np.empty_like(d64)
    for j in range(n):
        num = cv2.blur(d64[j], (5, 5))
        den = cv2.blur(valid[j], (5, 5))
        smooth[j] = np.where(den > 0.99, num / np.maximum(den, 1e-9), 0.0)
    samp = []
    for i in range(n):
        cand = np.flatnonzero(np.asarray(mask[i]).reshape(-1) & (d64[i].reshape(-1) > 0))
        if len(cand) > samples_per_view:
            cand = rng.choice(cand, samples_per_view, replace=False)
        v, u = np.divmod(cand, w)
        pix = np.stack([u, v, np.ones_like(u)]).astype(np.float64)
        samp.append((basis_at(u, v, h, w), (Kinv[i] @ pix).T, d64[i].reshape(-1)[cand]))
    npar = 6 + nb
    # Pairs compared: every two views, or (max_gap) those at most max_gap frames apart: far views see less of
    # the same surfaces and their pose errors look like depth warps over the longer baseline.
    order = np.arange(n) if frame_index is None else np.asarray(frame_index)
    paired = ~np.eye(n, dtype=bool)
    if max_gap is not None:
        paired &= np.abs(order[:, None] - order[None, :]) <= max_gap
    linked = paired.any(axis=1)
    R = c2w[:, :3, :3].copy()
    C = c2w[:, :3, 3].copy()
    coef = np.zeros((n, nb))
    s = float(normal_step)

    def linearise():
        """Residuals (relative to view j's depth) and their Jacobian rows, per pair, at the current state."""
        pts, arm, own, bas = [], [], [], []
        for i in range(n):
            Bi, rays, di = samp[i]
            a = (rays @ R[i].T) * (di * np.exp(-(Bi @ coef[i])))[:, None]
            pts.append(C[i] + a)
            arm.append(a)
            own.append(np.full(len(di), i))
            bas.append(Bi)
        P, A, O, BI = np.concatenate(pts), np.concatenate(arm), np.concatenate(own), np.concatenate(bas)
        out = []
        for j in range(n):
            sel = np.flatnonzero(paired[O, j])
            cam = (P[sel] - C[j]) @ R[j]
            z = cam[:, 2]
            with np.errstate(divide="ignore", invalid="ignore"):
                uj = (K[j, 0, 0] * cam[:, 0] + K[j, 0, 1] * cam[:, 1]) / z + K[j, 0, 2]
                vj = K[j, 1, 1] * cam[:, 1] / z + K[j, 1, 2]
            ok = (z > 0) & (uj >= 0) & (uj <= w - 1 - s) & (vj >= 0) & (vj <= h - 1 - s)
            sel, z, uj, vj = sel[ok], z[ok], uj[ok], vj[ok]
            if len(sel) < 10:
                continue
            dj = _bilinear(d64[j], uj, vj)
            s0 = _bilinear(smooth[j], uj, vj)
            su = _bilinear(smooth[j], uj + s, vj)
            sv = _bilinear(smooth[j], uj, vj + s)
            good = np.isfinite(dj) & np.isfinite(s0) & np.isfinite(su) & np.isfinite(sv)
            if good.sum() < 10:
                continue
            sel, z, uj, vj, dj, s0, su, sv = (x[good] for x in (sel, z, uj, vj, dj, s0, su, sv))
            Bj = basis_at(uj, vj, h, w)
            fj = np.exp(-(Bj @ coef[j]))
            ki = Kinv[j]
            ray0 = np.stack([uj, vj, np.ones_like(uj)], 1) @ ki.T
            x0 = ray0 * s0[:, None]
            xu = (ray0 + s * ki[:, 0]) * su[:, None]
            xv = (ray0 + s * ki[:, 1]) * sv[:, None]
            nc = np.cross(xu - x0, xv - x0)
            nc /= np.maximum(np.linalg.norm(nc, axis=1), 1e-300)[:, None]
            nw = nc @ R[j].T  # world normal
            aj = (ray0 * (dj * fj)[:, None]) @ R[j].T  # view j's surface point at q, minus its centre
            Xj = C[j] + aj
            Xi, ai, oi = P[sel], A[sel], O[sel]
            r = np.einsum("ij,ij->i", nw, Xi - Xj) / z
            inv = 1.0 / z
            J = np.zeros((len(r), 2 * npar))  # [view i's params | view j's params]
            J[:, 0:3] = np.cross(ai, nw) * inv[:, None]
            J[:, 3:6] = nw * (med * inv)[:, None]
            J[:, 6:9] = -(np.einsum("ij,ij->i", nw, ai) * inv)[:, None] * BI[sel]
            J[:, 9:12] = -np.cross(aj, nw) * inv[:, None]
            J[:, 12:15] = -nw * (med * inv)[:, None]
            J[:, 15:18] = (np.einsum("ij,ij->i", nw, aj) * inv)[:, None] * Bj
            # Occlusions: the point is far in front of or behind view j's surface along its ray.
            vis = np.abs(np.log(z / (dj * fj))) <= tol
            out.append((oi[vis], j, r[vis], J[vis]))
        return out

    prior = np.tile(np.r_[np.full(3, np.radians(prior_rot_deg)), np.full(3, prior_trans), np.full(nb, prior_std)],
                    n).reshape(n, npar)
    if not fit_poses:
        prior[:, :6] = 1e-9
    prior[0, :6] = 1e-9  # view 0 is the window's gauge
    prior[~linked] = 1e-9  # a view compared with none stays as it is
    state = np.zeros((n, npar))  # accumulated (rotation vector, translation / med, field)
    rms_before = rms = float("nan")
    used = 0
    for it in range(iters + 1):
        rows = linearise()
        if not rows:
            return fail("no two views overlap")
        r_all = np.concatenate([x[2] for x in rows])
        a = np.abs(r_all)
        inl = a <= tol
        if inl.sum() < 10 * n:
            return fail("views disagree everywhere", len(r_all))
        sigma = max(MAD_TO_SIGMA * float(np.median(a[inl])), 1e-6)
        k = HUBER_K * sigma
        wt_all = np.where(a <= k, 1.0, k / np.maximum(a, 1e-300)) * inl
        rms = float(np.sqrt(np.average(r_all ** 2, weights=np.maximum(wt_all, 1e-12))))
        used = int(inl.sum())
        if it == 0:
            rms_before = rms
        if it == iters:
            break
        H = np.diag((sigma / prior.reshape(-1)) ** 2)
        if gauge_mean:
            # Gauge: the views' mean field is the identity (a field shared by all views is unobservable).
            G = np.zeros((nb, n * npar))
            for i in np.flatnonzero(linked):
                G[:, i * npar + 6:(i + 1) * npar] = np.eye(nb)
            H += 1e4 * G.T @ G
        g = -H @ state.reshape(-1)
        start = 0
        for oi, j, r, J in rows:
            wt = wt_all[start:start + len(r)]
            start += len(r)
            for i in np.unique(oi):
                m = oi == i
                cols = np.r_[i * npar:(i + 1) * npar, j * npar:(j + 1) * npar]
                Jm, wm, rm = J[m], wt[m], r[m]
                Jw = Jm * wm[:, None]
                H[np.ix_(cols, cols)] += Jw.T @ Jm
                g[cols] -= Jw.T @ rm
        step = np.linalg.solve(H, g).reshape(n, npar)
        state += step
        R = _skew_rotation(step[:, :3]) @ R
        C = C + step[:, 3:6] * med
        coef = coef + step[:, 6:]
    refined = (d64 * np.exp(-field(coef, h, w))).astype(depth.dtype)
    refined = np.where(d64 > 0, refined, depth)
    out_c2w = c2w.copy()
    out_c2w[:, :3, :3] = R
    out_c2w[:, :3, 3] = C
    return RefineResult(coef, refined, rms_before, rms, used, True, None, out_c2w)
