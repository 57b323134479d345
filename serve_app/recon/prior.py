"""Placing a window by the client's pose priors: the Sim(3) from the window's predicted cameras onto the priors,
or None when the priors cannot fix the scale or disagree with the prediction (then the dense alignment places it)."""

from __future__ import annotations

import numpy as np

from serve_app.recon.alignment import MAD_TO_SIGMA, irls_scale_translation
from serve_app.recon.geometry import Sim3, median, orthonormalize, rotation_angle_deg

PRIOR_MIN_BASELINE = 0.01  # camera-centre spread / median depth below which priors cannot fix the scale
PRIOR_MAX_REL_RMSE = 0.25  # centre residual / centre spread above which priors disagree with the prediction


def _huber(r: np.ndarray, floor: float) -> np.ndarray:
    thresh = max(1.345 * MAD_TO_SIGMA * median(r), floor)
    return np.where(r <= thresh, 1.0, thresh / np.maximum(r, 1e-300))


def prior_sim3(pred_c2w: np.ndarray, prior_c2w: np.ndarray, depth: float, *,
               min_baseline: float = PRIOR_MIN_BASELINE, max_rel_rmse: float = PRIOR_MAX_REL_RMSE,
               iters: int = 10) -> tuple[Sim3 | None, dict]:
    """Sim(3) taking the window's predicted cameras (its gauge) onto the client's c2w priors.

    Rotation: robust (Huber IRLS) chordal mean of prior R_j pred R_j^T, so it holds for collinear paths too.
    Scale and translation: robust least squares of the rotated predicted centres onto the prior centres.
    `depth` is the window's median depth in its gauge (sets what "no baseline" means). Returns (None, info with
    a reason) when the priors cannot fix the scale or disagree with the prediction.
    """
    P = np.asarray(pred_c2w, np.float64)
    Q = np.asarray(prior_c2w, np.float64)
    n = len(P)
    Rs = Q[:, :3, :3] @ np.swapaxes(P[:, :3, :3], 1, 2)
    w = np.ones(n)
    for _ in range(iters):
        R = orthonormalize(np.einsum("n,nij->ij", w, Rs))
        ang = np.radians(rotation_angle_deg(np.einsum("ji,njk->nik", R, Rs)))
        w = _huber(ang, 1e-9)
    rot_err = float(np.degrees(np.sqrt(np.average(ang ** 2, weights=w))))

    a = P[:, :3, 3] @ R.T
    b = Q[:, :3, 3]
    base_pred = float(np.linalg.norm(a - a.mean(0), axis=1).max()) if n else 0.0
    base_prior = float(np.linalg.norm(b - b.mean(0), axis=1).max()) if n else 0.0
    # Every refusal carries "rigid" (the priors' rotation and mean centre at the model's scale): a first window
    # has no world to align to densely, so it is placed with that.
    info = {"num_cameras": n, "rotation_rmse_deg": rot_err, "rigid": Sim3(1.0, R, b.mean(0) - a.mean(0))}
    if n < 2 or base_pred < min_baseline * depth or base_prior <= 1e-9 * (1.0 + float(np.abs(b).max())):
        info["reason"] = "pose priors have no baseline (fewer than 2 distinct camera centres)"
        return None, info
    s, t, r, w, _ = irls_scale_translation(a, b, np.ones(n), iters=iters, floor=1e-9 * (1.0 + base_prior))
    rmse = float(np.sqrt(np.average(r ** 2, weights=w)))
    info.update(scale=s, rmse=rmse, inlier_ratio=float((w >= 1.0).mean()))
    if not (np.isfinite(s) and s > 0 and np.isfinite(t).all()):
        info["reason"] = f"pose priors give a bad scale ({s:.3g})"
        return None, info
    if rmse > max_rel_rmse * base_prior:
        info["reason"] = f"pose priors disagree with the predicted cameras (rmse {rmse:.3g} vs spread {base_prior:.3g})"
        return None, info
    return Sim3(s, R, t), info
