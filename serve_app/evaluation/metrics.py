"""Accuracy metrics of a streamed reconstruction against ground truth (bench/accuracy.py, tests). Pure numpy.

Trajectories are (N, 4, 4) camera-to-world matrices of the same frames; an estimate is compared after one global
Sim(3) taking its camera centres onto the truth (Umeyama), so the arbitrary gauge and scale of a monocular
stream do not count. Lengths are reported as % of the true path length, cloud distances as % of the true surface's
bounding-box diagonal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from serve_app.recon.alignment import camera_centers, nearest_distances, trajectory_length, umeyama_sim3
from serve_app.recon.geometry import Sim3, rotation_angle_deg

COLLINEAR_RATIO = 0.05  # second/first singular value of the true centres below which the path counts as a line


def align_trajectory(est_c2w: np.ndarray, gt_c2w: np.ndarray) -> Sim3:
    """The Sim(3) taking estimated camera centres onto the true ones (least squares). Centres along a (nearly)
    straight path leave the roll about it undetermined; there the fit also takes two points ahead of and beside
    each camera (at a tenth of the path length, scaled by the centres-only fit), so orientations fix it."""
    est, gt = camera_centers(est_c2w).reshape(-1, 3), camera_centers(gt_c2w).reshape(-1, 3)
    if len(est) != len(gt) or len(est) < 3:
        raise ValueError(f"need two trajectories of the same >= 3 frames, got {len(est)} and {len(gt)}")
    est, gt = est.astype(np.float64), gt.astype(np.float64)
    sim = umeyama_sim3(est, gt)
    sv = np.linalg.svd(gt - gt.mean(0), compute_uv=False)
    if sv[0] <= 0 or sv[1] / sv[0] >= COLLINEAR_RATIO:
        return sim
    ell = 0.1 * trajectory_length(gt_c2w)
    R_est = np.asarray(est_c2w, np.float64)[:, :3, :3]
    R_gt = np.asarray(gt_c2w, np.float64)[:, :3, :3]
    src = [est] + [est + R_est[:, :, a] * (ell / sim.s) for a in (0, 2)]
    dst = [gt] + [gt + R_gt[:, :, a] * ell for a in (0, 2)]
    return umeyama_sim3(np.concatenate(src), np.concatenate(dst))


def rotation_errors_deg(est_c2w: np.ndarray, gt_c2w: np.ndarray, sim: Sim3) -> np.ndarray:
    """Per frame: angle between the true orientation and the estimated one brought into the true frame by sim."""
    R_est = np.einsum("ij,njk->nik", sim.R, np.asarray(est_c2w, np.float64)[:, :3, :3])
    R_gt = np.asarray(gt_c2w, np.float64)[:, :3, :3]
    return rotation_angle_deg(np.einsum("nji,njk->nik", R_gt, R_est))


def aligned_centres(est_c2w: np.ndarray, sim: Sim3) -> np.ndarray:
    return sim.apply(camera_centers(est_c2w).reshape(-1, 3).astype(np.float64)).astype(np.float64)


def loop_gap(est_c2w: np.ndarray, gt_c2w: np.ndarray, sim: Sim3) -> float:
    """How far the estimate's last camera is from where it should be relative to the first (in true units):
    |(c_last - c_first)_est - (c_last - c_first)_true| after sim. For a path that comes back to its start this is
    the visible gap in the map; for any path, 0 when the estimate is exact up to the similarity."""
    c = aligned_centres(est_c2w, sim)
    g = camera_centers(gt_c2w).reshape(-1, 3).astype(np.float64)
    return float(np.linalg.norm((c[-1] - c[0]) - (g[-1] - g[0])))


def drift(est_c2w: np.ndarray, gt_c2w: np.ndarray, fraction: float = 0.1) -> float:
    """RMS error of the last `fraction` of camera centres after a Sim(3) fitted on the first `fraction` only."""
    n = len(est_c2w)
    k = max(3, int(n * fraction))
    gt = camera_centers(gt_c2w).reshape(-1, 3).astype(np.float64)
    first = align_trajectory(np.asarray(est_c2w)[:k], np.asarray(gt_c2w)[:k])
    d = aligned_centres(np.asarray(est_c2w)[-k:], first) - gt[-k:]
    return float(np.sqrt((np.linalg.norm(d, axis=1) ** 2).mean()))


@dataclass
class TrajectoryMetrics:
    ate_pct: float  # camera-centre RMSE after the global Sim(3), % of path length
    rot_median_deg: float
    rot_max_deg: float
    drift_pct: float
    loop_gap_pct: float
    length: float  # true path length
    frames: int

    def as_dict(self) -> dict:
        return asdict(self)


def trajectory_metrics(est_c2w: np.ndarray, gt_c2w: np.ndarray) -> tuple[TrajectoryMetrics, Sim3]:
    """All trajectory figures, and the global Sim(3) (to bring the estimated map into the true frame too)."""
    est, gt = np.asarray(est_c2w, np.float64), np.asarray(gt_c2w, np.float64)
    sim = align_trajectory(est, gt)
    length = trajectory_length(gt)
    if length <= 0:
        raise ValueError("the true trajectory has zero length")
    err = np.linalg.norm(aligned_centres(est, sim) - camera_centers(gt).reshape(-1, 3), axis=1)
    rot = rotation_errors_deg(est, gt, sim)
    return TrajectoryMetrics(
        ate_pct=100.0 * float(np.sqrt((err ** 2).mean())) / length,
        rot_median_deg=float(np.median(rot)), rot_max_deg=float(rot.max()),
        drift_pct=100.0 * drift(est, gt) / length, loop_gap_pct=100.0 * loop_gap(est, gt, sim) / length,
        length=length, frames=len(est)), sim


def segment_ate_pct(est_c2w: np.ndarray, gt_c2w: np.ndarray, sim: Sim3, segments: int) -> list[float]:
    """ATE (% of the whole path) of each of `segments` equal consecutive parts, under the global sim: for a
    path that goes round `segments` times, whether the error grows from lap to lap."""
    err = np.linalg.norm(aligned_centres(est_c2w, sim) - camera_centers(gt_c2w).reshape(-1, 3), axis=1)
    length = trajectory_length(gt_c2w)
    return [100.0 * float(np.sqrt((e ** 2).mean())) / length for e in np.array_split(err, segments)]


def rotation_only_errors_deg(est_c2w: np.ndarray, gt_c2w: np.ndarray) -> np.ndarray:
    """Per frame: rotation error after the best single rotation taking the estimated orientations onto the true
    ones (chordal least squares), i.e. how consistent the orientations are among themselves. The Sim(3) fitted
    on camera centres also tilts a nearly planar path by its small height errors; this figure does not."""
    R_est = np.asarray(est_c2w, np.float64)[:, :3, :3]
    R_gt = np.asarray(gt_c2w, np.float64)[:, :3, :3]
    u, _, vt = np.linalg.svd(np.einsum("nij,nkj->ik", R_gt, R_est))  # argmax_R sum tr(R_gt^T R R_est)
    R = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    return rotation_angle_deg(np.einsum("nji,jk,nkl->nil", R_gt, R, R_est))


def segment_median(values: np.ndarray, segments: int) -> list[float]:
    """Median of each of `segments` equal consecutive parts of per-frame values (e.g. rotation errors per lap)."""
    return [float(np.median(v)) for v in np.array_split(np.asarray(values, np.float64), segments)]


def _prep(p: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64).reshape(-1, 3)
    p = p[np.isfinite(p).all(1)]
    if len(p) > max_points:
        p = p[rng.choice(len(p), size=max_points, replace=False)]
    return p


def cloud_metrics(points: np.ndarray, surface: np.ndarray, max_points: int = 20000, seed: int = 0
                  ) -> tuple[float, float]:
    """(accuracy, completeness): mean distance from the map's points to the true surface sample, and from the
    surface sample to the map (a map with a doubled wall is inaccurate; one with holes is incomplete). At most
    max_points of each, drawn with `seed`. NaN for an empty cloud."""
    rng = np.random.default_rng(seed)
    a, b = _prep(points, max_points, rng), _prep(surface, max_points, rng)
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    centre = b.mean(0)  # keeps |x|^2 small so the distance expansion stays accurate
    a, b = a - centre, b - centre
    return float(nearest_distances(a, b).mean()), float(nearest_distances(b, a).mean())


def extent(surface: np.ndarray) -> float:
    """Diagonal of the bounding box of a (true) surface sample."""
    s = np.asarray(surface, np.float64).reshape(-1, 3)
    return float(np.linalg.norm(s.max(0) - s.min(0)))
