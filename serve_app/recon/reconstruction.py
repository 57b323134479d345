"""Streaming reconstruction of one session: window planning and alignment into one world. Pure numpy.

Frames arrive already resized to the model's input size. Windows are `overlap` context frames (already placed in
the world) followed by new frames. Each window comes back from the model in its own gauge (first view at the
origin, arbitrary scale) and is placed in the world by one Sim(3):

- client pose priors: when every frame of the window has a pose prior (and the world is the client's), the
  predicted cameras are fitted onto the priors (rotation from the orientations, scale and translation from the
  camera centres, both robust). Windows whose priors cannot fix the scale (fewer than two distinct centres, i.e.
  a baseline under PRIOR_MIN_BASELINE of the depth) or disagree with the prediction fall back to the dense
  alignment below. The world is then the client's world (metric when the client's poses are).
- otherwise the context frames' dense points, pixel for pixel, give a robust Sim(3) onto the world.

The world is the gauge of the first placed window: the client's world if that window was placed by its priors,
otherwise that window's own gauge (and priors are then only sent to the model, not used for placement). A
first window with priors but no baseline (static start) is placed rigidly (scale 1) in the client's world.

Keyframes: a placed frame is a keyframe when its camera moved at least `keyframe_translation` x the last
keyframe's median depth, or turned at least `keyframe_rotation_deg`, since the last keyframe. Every frame gets a
frame_result (with "keyframe"), but only keyframes add points, so a static camera does not grow the map.

Context choice: the last `overlap - 1` keyframes *known at plan time* plus the most recently planned frame. The
most recent frame keeps the largest overlap with the new frames (continuity); keyframes keep a baseline through
a static stretch, so the model still sees parallax and the alignment is not chained through near-identical
frames. The keyframes are the newest ones at least `context_reach_windows` windows' worth of new frames
older than the most recent frame (when there are such): each window then shares a frame with a window further
back, not only with the previous one, which ties the chain of placements (and the pose graph) across windows.
A client streaming in real time is planned one window ahead, so without the reach both context views came from
the previous window: on the realistic error model (bench/accuracy.py --plan-ahead 1, seeds 1-5) the reach of 2
windows took Chamfer accuracy from 0.65-0.91 % to 0.55-0.64 % and the rotation median from 1.5-2.0 to 0.6-1.0
degrees. Planning runs ahead of integration (pipelined model calls), so keyframe flags are those of windows
already integrated; while there are not enough (stream start), the rest comes from the last planned frames
(newest first), which is exactly the plain "last `overlap` frames" rule. With every frame a keyframe and no
pipelining the two rules coincide; tests/recon/test_keyframes.py checks the keyframe rule is as accurate.

Map dedupe: a per-session voxel occupancy (sorted packed int64 keys) of everything emitted. New points are
averaged per voxel within the window, and a voxel already occupied by an earlier window drops the new point
(first observation wins), so revisiting a place adds nothing. The occupancy holds at most `max_points` voxels;
beyond it the oldest are forgotten, in the same order the session store evicts the oldest points.

Planning and integration are split so the ingress can send window k+1 to the model before window k is aligned:
planning needs only images; integration (strictly in window order) needs the context frames' world points.

Over 400 lines because it is one class on purpose: planning, integration, the global-consistency hooks and
snapshot/restore all read and write the session's world state. What does not need that state lives apart:
plan.py (the types), occupancy.py, prior.py, alignment.py, depth_refine.py, consistency.py, loops.py,
loop_snapshot.py.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from serve_app.config import SessionParams
from serve_app.prediction import WindowPrediction
from serve_app.recon.alignment import robust_scale_translation, robust_sim3
from serve_app.recon.consistency import Consistency, SolveJob, scale_sim
from serve_app.recon.corrections import Correction
from serve_app.recon.depth_refine import refine_window
from serve_app.recon.fusion import fuse_points
from serve_app.recon.geometry import (
    Sim3,
    confidence_mask,
    finite_rows,
    invert_pose,
    median,
    orthonormalize,
    positive_depths,
    rotation_angle_deg,
    sample_indices,
    unproject_pixels,
)
from serve_app.recon.loop_snapshot import LoopCarry
from serve_app.recon.loops import Keyframe, depth_scale, image_descriptor, normalise, verify_loop
from serve_app.recon.occupancy import VoxelOccupancy, voxel_centres, voxel_keys
from serve_app.recon.plan import (
    ALIGN_POINTS_PER_FRAME,
    FrameInput,
    WindowOutput,
    WindowPlan,
    WorldFrame,
    world_part_key,
)
from serve_app.recon.posegraph import GraphParams
from serve_app.recon.prior import prior_sim3
from serve_app.sessions import stream_state
from serve_app.sessions.stream_state import INCREMENTAL

log = logging.getLogger("ray.serve.da3.recon")  # child of ray.serve: goes to the replica log files

AUTO_VOXEL_PIXELS = 2.0  # auto voxel = footprint of this many pixels at the first window's median depth
ALIGN_MAX_POINTS = 4000  # dense alignment subsample: plenty for 7 parameters, keeps geometry time flat
CAMERA_ROTATION_MAX_DEG = 10.0  # camera-based rotation used while within this of the dense fit's
LOOP_EXTRA_EDGES = 2  # after an accepted loop, the query's preceding keyframes verified against its candidate
LOOP_RETRIES = 1  # a candidate whose model call failed goes back to the queue this many times, then is dropped
MIN_WINDOW_POINTS = 50  # a window with fewer usable depth pixels is refused (it could anchor nothing)


# --- pure helpers ---------------------------------------------------------------------------------------------

def is_keyframe(c2w: np.ndarray, ref_c2w: np.ndarray | None, ref_depth: float, translation: float,
                rotation_deg: float) -> bool:
    """Did the camera move `translation` x ref_depth or turn `rotation_deg` since the reference keyframe?"""
    if ref_c2w is None:
        return True
    c2w, ref_c2w = np.asarray(c2w, np.float64), np.asarray(ref_c2w, np.float64)
    moved = float(np.linalg.norm(c2w[:3, 3] - ref_c2w[:3, 3]))
    turned = float(rotation_angle_deg(ref_c2w[:3, :3].T @ c2w[:3, :3]))
    return moved >= translation * ref_depth or turned >= rotation_deg


# --- the session reconstructor ------------------------------------------------------------------------------

class StreamReconstructor:
    def __init__(self, params: SessionParams, seed: int = 0):
        self.params = params
        self.pending: deque[FrameInput] = deque()
        self.world: dict[int, WorldFrame] = {}
        self.voxel_size: float | None = params.voxel_size
        self.windows_planned = 0
        self.windows_integrated = 0
        self.last_planned: list[FrameInput] = []  # frames of the latest planned window (context source)
        self.outstanding: dict[int, WindowPlan] = {}
        self.lost = False  # last alignment failed: re-anchor on known-good frames
        self.input_size: tuple[int, int] | None = None  # (w, h) fixed by the first frame
        self.rng = np.random.default_rng(seed)
        self.placed = False  # some window has been placed: the world gauge is fixed
        self.prior_world = False  # the world is the client's (the first placed window was placed by priors)
        # Latest known keyframe indices: enough to reach `context_reach_windows` back (see _context).
        self.keyframes: deque[int] = deque(maxlen=max(params.overlap, 1) + self._reach_frames())
        self.last_keyframe: tuple[np.ndarray, float] | None = None  # (c2w, median depth) of the newest one
        self.occupancy = VoxelOccupancy(params.max_points)
        self.num_keyframes = 0
        # Global consistency (params.global_consistency; None = off, exactly the chained placement).
        self.consistency: Consistency | None = Consistency(params) if params.global_consistency else None
        self.last_keyframe_window = -1
        self.loops_planned = 0
        self.loops_in_flight: dict[int, WindowPlan] = {}  # loop windows handed out, by (negative) window number
        self.loop_attempts: dict[tuple[int, int], int] = {}  # (query, candidate) -> failed model calls
        self.loop_carry = LoopCarry(params.loop_snapshot_keyframes)  # loop keyframes the snapshot carries
        self.world_sent: set[int] = set()  # world frames whose parts the session store holds (snapshot)
        self.occ_windows: list[tuple[int, int]] = []  # (first occupancy counter, window), in counter order
        self.occ_corr: dict[int, Sim3] = {}  # window -> correction its occupancy keys were built with
        self.occ_dirty = False
        self._obs: list = []

    # --- planning -----------------------------------------------------------------------------------
    def add_frame(self, frame: FrameInput) -> None:
        self.pending.append(frame)

    def _reach_frames(self) -> int:
        return self.params.context_reach_windows * max(self.params.window_size - self.params.overlap, 1)

    def _context(self) -> list[FrameInput]:
        """Last overlap-1 known keyframes at least `_reach_frames` older than the most recent frame (else the
        newest ones) + the most recent frame, filled up with recent frames (see module doc)."""
        k = self.params.overlap
        if self.lost and self.world:
            pool = [self.world[i].as_input() for i in sorted(self.world)]
        elif self.lost and not self.outstanding:
            return []  # nothing placed and nothing in flight: the next window starts a new reference
        else:  # (a window in flight may still become the reference: chain to it)
            pool = list(self.last_planned)
        if not pool or k <= 0:
            return []
        chosen = {pool[-1].index: pool[-1]}
        known = [i for i in reversed(self.keyframes) if i in self.world and i not in chosen]
        far = [i for i in known if i <= pool[-1].index - self._reach_frames()]
        for idx in far + [i for i in known if i not in far]:
            if len(chosen) >= k:
                break
            chosen[idx] = self.world[idx].as_input()
        for f in reversed(pool[:-1]):
            if len(chosen) >= k:
                break
            chosen.setdefault(f.index, f)
        return sorted(chosen.values(), key=lambda f: f.index)

    def next_window(self, force: bool = False) -> WindowPlan | None:
        """The next window if enough frames are pending (or any are, when forced by flush/finalize)."""
        if not self.pending:
            return None
        context = self._context() if self.windows_planned else []
        need = self.params.window_size - len(context)
        if len(self.pending) < need and not force:
            return None
        new = [self.pending.popleft() for _ in range(min(need, len(self.pending)))]
        plan = WindowPlan(window=self.windows_planned, context=context, new=new)
        self.windows_planned += 1
        self.last_planned = plan.frames
        self.outstanding[plan.window] = plan
        return plan

    # --- integration --------------------------------------------------------------------------------
    def _dense_alignment(self, plan: WindowPlan, pred: WindowPrediction, c2w_win, conf, keep
                         ) -> tuple[Sim3 | None, dict]:
        src, dst, w, rots = [], [], [], []
        for j, f in enumerate(plan.context):
            wf = self.world.get(f.index)
            if wf is None or wf.image.shape[:2] != pred.depth.shape[1:]:
                continue
            m = keep[j].reshape(-1)[wf.pix]  # the frame's stored samples this window is also confident about
            pix = wf.pix[m]
            src.append(unproject_pixels(pred.depth[j], pred.intrinsics[j], c2w_win[j], pix))
            dst.append(wf.points[m])
            w.append(np.sqrt(conf[j].reshape(-1)[pix] * wf.conf[m]))
            if self.consistency is not None:
                rots.append(np.asarray(wf.c2w, np.float64)[:3, :3] @ np.asarray(c2w_win[j], np.float64)[:3, :3].T)
                if wf.window in self.consistency.graph.nodes:
                    # The same points in the earlier window's normalised gauge: an odometry edge, fitted later.
                    owner = self.consistency.graph.nodes[wf.window].inverse()
                    self._obs.append((wf.window, src[-1], owner.apply(dst[-1]), w[-1], owner.R @ rots[-1]))
        if not src:
            return None, {"reason": "no context frame has world geometry"}
        res = robust_sim3(np.concatenate(src), np.concatenate(dst), np.concatenate(w),
                          max_points=ALIGN_MAX_POINTS, seed=plan.window)
        if not res.ok:
            return None, {"reason": res.reason}
        info = {"ok": True, "mode": "dense", "scale": float(res.scale), "rmse": float(res.rmse),
                "inlier_ratio": float(res.inlier_ratio), "num_points": int(res.num_points)}
        if rots:
            # Global consistency: the rotation from the context cameras (a depth warp tilts the points, not the
            # cameras), scale and translation from the points; unless the two rotations disagree grossly.
            R = orthonormalize(np.sum(rots, axis=0))
            if float(rotation_angle_deg(R.T @ res.sim3.R)) <= CAMERA_ROTATION_MAX_DEG:
                fit = robust_scale_translation(np.concatenate(src), np.concatenate(dst), R, np.concatenate(w))
                if fit.ok:
                    res = fit
                    info.update(scale=float(res.scale), rmse=float(res.rmse), inlier_ratio=float(res.inlier_ratio),
                                rotation="cameras")
        return res.sim3, info

    def _place(self, plan: WindowPlan, pred: WindowPrediction, c2w_win, conf, keep
               ) -> tuple[Sim3 | None, dict]:
        """The window's Sim(3) onto the world and the "alignment" report; (None, {"reason"}) if it cannot."""
        reason = None
        if plan.has_pose_priors and (self.prior_world or not self.placed):
            valid = positive_depths(pred.depth)
            depth = median(valid) if valid.size else 1.0
            priors = np.stack([np.asarray(f.pose, np.float64) for f in plan.frames])
            sim, info = prior_sim3(c2w_win, priors, depth)
            if sim is not None:
                self.prior_world = True
                return sim, {"ok": True, "mode": "priors", "scale": info["scale"], "rmse": info["rmse"],
                             "inlier_ratio": info["inlier_ratio"], "num_points": 0,
                             "num_cameras": info["num_cameras"], "rotation_rmse_deg": info["rotation_rmse_deg"]}
            reason = info["reason"]
            if not self.placed:
                # No world yet to align densely to: put the window in the client's world at the model's scale.
                self.prior_world = True
                return info["rigid"], {"ok": True, "mode": "priors_rigid", "scale": 1.0, "rmse": 0.0,
                                       "inlier_ratio": 1.0, "num_points": 0, "prior_fallback": reason}
        if not self.placed:
            return Sim3.identity(), {"ok": True, "mode": "reference", "scale": 1.0, "rmse": 0.0,
                                     "inlier_ratio": 1.0, "num_points": 0, "reference": True}
        sim, align = self._dense_alignment(plan, pred, c2w_win, conf, keep)
        if sim is not None and reason:
            align["prior_fallback"] = reason
        return sim, align

    def integrate(self, plan: WindowPlan, pred: WindowPrediction) -> WindowOutput:
        """Place a predicted window in the world. Must be called in window order."""
        t0 = time.perf_counter()
        n_ctx = len(plan.context)
        c2w_win = invert_pose(pred.extrinsics)  # (N, 4, 4) in the window's gauge
        conf = pred.conf.astype(np.float32)
        keep = confidence_mask(conf, self.params.conf_percentile, depth=pred.depth)
        # Finite positive depth (in the mask) through a finite camera gives a finite point; only the pixels
        # used below are unprojected.
        cams_ok = np.isfinite(c2w_win).all(axis=(1, 2)) & np.isfinite(pred.intrinsics).all(axis=(1, 2))
        keep[~cams_ok] = False
        if int(keep.sum()) < MIN_WINDOW_POINTS:
            return self.fail(plan, f"window has {int(keep.sum())} confident finite depth pixels "
                             f"(need {MIN_WINDOW_POINTS})", time.perf_counter() - t0)
        refine_info = None
        if self.params.depth_refine != "off" and pred.num_views > 1:
            pred, c2w_win, refine_info = self._refine(plan, pred, c2w_win, keep)
        self._obs = []
        sim, align = self._place(plan, pred, c2w_win, conf, keep)
        if sim is None:
            return self.fail(plan, align["reason"], time.perf_counter() - t0)
        cons = self.consistency
        if refine_info is not None:
            align["depth_refine"] = refine_info
        if cons is not None:
            gdepth = depth_scale(pred.depth[n_ctx:])
            cons.record_window(plan.window, sim, gdepth, self._obs)
            self._obs = []
            norm = scale_sim(1.0 / gdepth)  # window gauge -> its normalised gauge
            align["loops_accepted"] = cons.loops_accepted
        if self.voxel_size is None:
            valid = positive_depths(pred.depth)
            med = median(valid) * sim.s if valid.size else 1.0
            focal = float(np.median(pred.intrinsics[:, [0, 1], [0, 1]]))
            self.voxel_size = max(AUTO_VOXEL_PIXELS * med / max(focal, 1e-6), 1e-9)
        self.placed = True
        self.lost = False

        now = time.time()
        frames, all_pts, all_cols, owner = [], [], [], []
        p = self.params
        matched = False  # a keyframe of this window looks like an old keyframe
        for j in range(n_ctx, len(plan.frames)):
            f = plan.frames[j]
            c2w = sim.transform_c2w(c2w_win[j])
            confident = np.flatnonzero(keep[j])
            pix = sample_indices(confident, ALIGN_POINTS_PER_FRAME, self.rng).astype(np.int32)
            world_pts = sim.apply(unproject_pixels(pred.depth[j], pred.intrinsics[j], c2w_win[j], pix))
            d = positive_depths(pred.depth[j]) * sim.s
            med = median(d) if d.size else None
            ref_c2w, ref_depth = self.last_keyframe if self.last_keyframe else (None, 0.0)
            kf = is_keyframe(c2w, ref_c2w, ref_depth, p.keyframe_translation, p.keyframe_rotation_deg)
            fdesc = None
            if cons is not None:
                desc = getattr(pred, "descriptors", None)
                fdesc = normalise(desc[j]) if desc is not None else image_descriptor(f.image)
                # A frame that looks like an old keyframe is a loop candidate: unless a keyframe of this window
                # already does, make it a keyframe (so it is queried and verified) whatever the keyframe spacing
                # says, or a loop that is only recognisable for a frame or two (the stream's last frames) is
                # missed when those fall between keyframes. At most one such frame per window.
                if not matched and cons.detector.matches(fdesc, f.index):
                    kf = matched = True
            if kf:
                self.last_keyframe = (c2w, med if med is not None else ref_depth)
                self.last_keyframe_window = plan.window
                if cons is not None:
                    cons.new_keyframes.append(Keyframe(
                        f.index, plan.window, fdesc,
                        f, pix, norm.apply(unproject_pixels(pred.depth[j], pred.intrinsics[j], c2w_win[j], pix)),
                        norm.transform_c2w(c2w_win[j])))
                self.keyframes.append(f.index)
                self.num_keyframes += 1
                idx = sample_indices(confident, p.max_points_per_frame, self.rng)
                local = unproject_pixels(pred.depth[j], pred.intrinsics[j], c2w_win[j], idx)
                if cons is not None and p.multiview_depth_tol > 0:
                    local, ok = self._multiview(pred, j, local)
                    idx, local = idx[ok], local[ok]
                all_pts.append(sim.apply(local))
                all_cols.append(f.image.reshape(-1, 3)[idx])
                owner.append(np.full(len(idx), len(frames)))
            self.world_sent.discard(f.index)
            self.world[f.index] = WorldFrame(f.index, f.frame_id, f.image, pix, world_pts,
                                             conf[j].reshape(-1)[pix], c2w, source=f, keyframe=kf,
                                             encoded=f.encoded, window=plan.window)
            frames.append({
                "frame_id": f.frame_id, "index": f.index, "window": plan.window,
                "timestamp": f.timestamp,
                "pose": c2w.tolist(), "intrinsics": pred.intrinsics[j].tolist(),
                "image_size": [int(f.image.shape[1]), int(f.image.shape[0])],
                "original_size": list(f.original_size),
                "depth": ({"min": float(d.min()), "max": float(d.max()), "median": med}
                          if d.size else {"min": None, "max": None, "median": None}),
                "points_added": 0, "keyframe": kf, "latency_ms": round((now - f.received_at) * 1000.0, 2),
            })
        if cons is not None:
            self.occ_windows.append((self.occupancy.inserted, plan.window))
        pts, cols, counts = self._new_map_points(all_pts, all_cols, owner, len(frames))
        for fr, c in zip(frames, counts):
            fr["points_added"] = int(c)
        self._finish(plan)
        window = {"window": plan.window, "frame_ids": [f.frame_id for f in plan.new],
                  "context_frame_ids": [f.frame_id for f in plan.context], "alignment": align,
                  "keyframes": int(sum(fr["keyframe"] for fr in frames)),
                  "geometry_ms": round((time.perf_counter() - t0) * 1000.0, 2)}
        return WindowOutput(window=window, frames=frames, points=pts, colors=cols, ok=True)

    def _refine(self, plan: WindowPlan, pred: WindowPrediction, c2w_win, keep
                ) -> tuple[WindowPrediction, np.ndarray, dict]:
        """The window's depth (and cameras) made consistent across its views (serve_app/recon/depth_refine.py)."""
        p = self.params
        res = refine_window(pred.depth, pred.intrinsics, c2w_win, keep, samples_per_view=p.depth_refine_samples,
                            prior_std=p.depth_refine_prior, fit_poses=p.depth_refine == "field+poses",
                            frame_index=np.array([f.index for f in plan.frames]), max_gap=p.depth_refine_max_gap,
                            seed=plan.window)
        info = {"ok": res.ok, **{k: round(v, 5) if np.isfinite(v) else None
                                 for k, v in (("rms_before", res.rms_before), ("rms_after", res.rms_after))}}
        if not res.ok:
            info["reason"] = res.reason
            return pred, c2w_win, info
        extr = invert_pose(res.c2w)[:, :3, :].astype(np.float32)
        return replace(pred, depth=res.depth, extrinsics=extr), res.c2w, info

    def _multiview(self, pred: WindowPrediction, j: int, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """View j's map points (window gauge) checked against, and fused with, the views of its window at most
        `multiview_views` away (serve_app/recon/fusion.py): (points, keep)."""
        p = self.params
        others = [k for k in range(j - p.multiview_views, j + p.multiview_views + 1) if k != j and 0 <= k < pred.num_views]
        out, keep, _ = fuse_points(pts, pred.depth, pred.intrinsics, pred.extrinsics, others, p.multiview_depth_tol,
                                   fuse=p.multiview_fuse, min_agree=p.multiview_min_agree)
        return out, keep

    def _new_map_points(self, all_pts, all_cols, owner, n_frames) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One point per voxel not yet in the map (window mean position and colour), the occupancy updated,
        and how many each frame added (a voxel belongs to the frame that saw it first)."""
        if not all_pts or not sum(len(x) for x in all_pts):
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), np.zeros(n_frames, np.int64)
        pts = np.concatenate(all_pts)
        cols = np.concatenate(all_cols)
        own = np.concatenate(owner)
        fin = finite_rows(pts)
        if not fin.all():  # (unprojected confident pixels always are; row masks of (n, 3) arrays are slow)
            pts, cols, own = pts[fin], cols[fin], own[fin]
        keys = voxel_keys(pts, self.voxel_size)
        # One sort gives the voxels (sorted, for the occupancy) and each voxel's first sight (its earliest point,
        # for the emission order, which the store's eviction follows); the rest are linear passes. (A stable
        # argsort would give first sights as order[start], but costs ~2x the default one plus reduceat.)
        order = np.argsort(keys)
        ks = keys[order]
        start = np.ones(len(ks), bool)
        start[1:] = ks[1:] != ks[:-1]
        gid = np.empty(len(ks), np.int64)
        gid[order] = np.cumsum(start) - 1  # voxel of each point, numbered in key order
        ukeys, first = ks[start], np.minimum.reduceat(order, np.flatnonzero(start))
        nv = len(ukeys)
        sighted = np.zeros(len(ks), bool)
        sighted[first] = True
        emit = gid[np.flatnonzero(sighted)]  # voxels in first-sight order
        emit = emit[~self.occupancy.contains(ukeys)[emit]]  # only voxels the map does not have yet
        # Per-axis 1-D passes: gathering rows of (n, 3) arrays costs several times more.
        cnt = np.bincount(gid, minlength=nv)[emit]
        out_p = np.empty((len(emit), 3), np.float32)
        out_c = np.empty((len(emit), 3), np.uint8)
        for k in range(3):
            out_p[:, k] = np.bincount(gid, weights=pts[:, k], minlength=nv)[emit] / cnt
            out_c[:, k] = np.clip(np.rint(np.bincount(gid, weights=cols[:, k], minlength=nv)[emit] / cnt), 0, 255)
        rank = np.empty(nv, np.int64)
        rank[emit] = np.arange(len(emit))
        is_new = np.zeros(nv, bool)
        is_new[emit] = True
        by_key = np.flatnonzero(is_new)  # the same voxels in key order
        self.occupancy.add_sorted(ukeys[by_key], rank[by_key])
        counts = np.bincount(own[first[emit]], minlength=n_frames)
        return out_p, out_c, counts

    def fail(self, plan: WindowPlan, reason: str | None, elapsed: float = 0.0) -> WindowOutput:
        """Report a window that could not be placed (model error or alignment); the map is untouched."""
        self.lost = True
        self._finish(plan)
        frames = [{"frame_id": f.frame_id, "index": f.index, "window": plan.window, "timestamp": f.timestamp,
                   "pose": None, "intrinsics": None, "image_size": [int(f.image.shape[1]), int(f.image.shape[0])],
                   "original_size": list(f.original_size), "depth": None, "points_added": 0,
                   "keyframe": False, "latency_ms": round((time.time() - f.received_at) * 1000.0, 2),
                   "failed": True}
                  for f in plan.new]
        window = {"window": plan.window, "frame_ids": [f.frame_id for f in plan.new],
                  "context_frame_ids": [f.frame_id for f in plan.context],
                  "alignment": {"ok": False, "reason": reason}, "keyframes": 0,
                  "geometry_ms": round(elapsed * 1000.0, 2)}
        return WindowOutput(window=window, frames=frames, points=np.zeros((0, 3), np.float32),
                            colors=np.zeros((0, 3), np.uint8), ok=False, reason=reason)

    def _finish(self, plan: WindowPlan) -> None:
        self.outstanding.pop(plan.window, None)
        self.windows_integrated += 1
        # Keep world data only for frames a future or outstanding window can still use as context.
        k = self.params.overlap
        needed = {f.index for p in self.outstanding.values() for f in p.context}
        needed |= {f.index for f in self.last_planned[-k:]}
        kfs = list(self.keyframes)
        needed |= set(kfs[-k:])
        if self.last_planned and self._reach_frames():  # keyframes a later window can still reach back to
            edge = self.last_planned[-1].index - self._reach_frames()
            # The next windows' edges lie a window's new frames apart: edge, edge + step, ... A keyframe is only
            # ever chosen as one of the newest k-1 behind one of them, so those of each step are enough (the
            # snapshot carries them; keeping every keyframe in reach made it 5x larger when most frames are
            # keyframes).
            step = max(self.params.window_size - k, 1)
            buckets: dict[int, list[int]] = {}
            for i in kfs:
                buckets.setdefault(max(-(-(i - edge) // step), 0), []).append(i)
            needed |= set(buckets.pop(0, [])[-k:])
            needed |= {i for b in buckets.values() for i in b[-max(k - 1, 1):]}
        if self.world:
            needed |= set(sorted(self.world)[-k:])  # re-anchoring after a failure
        for idx in [i for i in self.world if i not in needed]:
            del self.world[idx]

    def memory_bytes(self) -> int:
        """Session geometry held here: world frames kept for context, the voxel occupancy, queued images."""
        # list() copies in one step, so a caller outside the worker's lock does not see a dict mid-change.
        return (sum(wf.nbytes for wf in list(self.world.values())) + self.occupancy.nbytes
                + sum(f.image.nbytes for f in list(self.pending)))

    @property
    def idle(self) -> bool:
        return not self.pending and not self.outstanding

    @property
    def maintenance_due(self) -> bool:
        return self.occupancy.compaction_due or self.occ_dirty

    def maintain(self) -> None:
        """Upkeep kept off integrate()'s latency path (the voxel occupancy's O(map) merge, its move to the corrected
        world after a correction); call between windows."""
        if self.occ_dirty:
            self._move_occupancy()
        self.occupancy.compact()

    # --- global consistency (params.global_consistency) ---------------------------------------------------
    @property
    def graph_params(self) -> GraphParams:
        return self.consistency.graph.params

    def graph_prepare(self) -> SolveJob | None:
        """After a window's commit (pool, under the worker's lock): odometry edges, loop retrieval, the solve job;
        the new keyframes the snapshot is to carry are encoded here, off the windows' path."""
        cons = self.consistency
        if cons is None:
            return None
        new = list(cons.new_keyframes)
        job = cons.prepare()
        for kf in new:
            self.loop_carry.offer(kf)
        self.loop_carry.keep_only({k.index for k in cons.detector.keyframes})
        return job

    def graph_apply(self, job: SolveJob, poses: dict[int, Sim3]) -> Correction | None:
        """Take a solve's result (under the lock): move the world frames and the last keyframe of every window
        whose pose changed; the occupancy follows in maintain(). The correction message's content, or None."""
        cons = self.consistency
        deltas, absolute = cons.apply(job, poses)
        if not deltas:
            return None
        for wf in self.world.values():
            d = deltas.get(wf.window)
            if d is not None:
                wf.points = d.apply(wf.points)
                wf.c2w = d.transform_c2w(wf.c2w)
        d = deltas.get(self.last_keyframe_window)
        if d is not None and self.last_keyframe is not None:
            self.last_keyframe = (d.transform_c2w(self.last_keyframe[0]), self.last_keyframe[1] * d.s)
        self.occ_dirty = True
        return Correction(version=cons.version, transforms=absolute, loops_accepted=cons.loops_accepted)

    def _move_occupancy(self) -> None:
        """Re-key the occupied voxels of every corrected window (voxel centre moved by the change of its window's
        correction since its keys were made), keeping insertion order; voxels whose window is unknown (restored
        from the stored map) stay."""
        self.occ_dirty = False
        cons = self.consistency
        if cons is None or not self.occ_windows or not self.voxel_size:
            return
        keys, order = self.occupancy.kept()
        starts = np.array([a for a, _ in self.occ_windows], np.int64)
        wins = np.array([w for _, w in self.occ_windows], np.int64)
        slot = np.searchsorted(starts, order, side="right") - 1
        keys = keys.copy()
        for i in np.unique(slot[slot >= 0]):
            win = int(wins[i])
            cur = cons.correction(win)
            prev = self.occ_corr.get(win, Sim3.identity())
            d = cur.compose(prev.inverse())
            if np.allclose(d.matrix(), np.eye(4), atol=1e-9):
                continue
            sel = np.flatnonzero(slot == i)
            keys[sel] = voxel_keys(d.apply(voxel_centres(keys[sel], self.voxel_size)), self.voxel_size)
            self.occ_corr[win] = cur
        s = np.lexsort((order, keys))
        keys, order = keys[s], order[s]
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]  # two voxels moved onto one: the older stays
        occ = self.occupancy
        occ.main_keys, occ.main_order = keys[first], order[first]

    def next_loops(self, limit: int | None = None) -> list[WindowPlan]:
        """Loop-verification windows for the oldest pending candidates, so that at most `limit` (default
        params.loop_batch) are in flight; each candidate is handed out once (a repeat of one in flight is
        skipped). The worker sends them to the model together and verifies them in any order."""
        cons = self.consistency
        if cons is None:
            return []
        room = (self.params.loop_batch if limit is None else limit) - len(self.loops_in_flight)
        busy = {p.loop for p in self.loops_in_flight.values()}
        plans: list[WindowPlan] = []
        while room > 0 and cons.detector.pending:
            q, c, *root = cons.detector.pending.pop(0)
            kq, kc = cons.detector.get(q), cons.detector.get(c)
            if kq is None or kc is None or kq.window == kc.window or (q, c) in busy:
                continue
            plan = WindowPlan(window=-1 - self.loops_planned, context=[], new=[kc.source, kq.source], kind="loop",
                              loop=(q, c), loop_root=root[0] if root else q)
            self.loops_planned += 1
            self.loops_in_flight[plan.window] = plan
            busy.add((q, c))
            plans.append(plan)
            room -= 1
        return plans

    def loop_abandoned(self, plan: WindowPlan) -> None:
        """A handed-out loop window that will never be integrated (its verification raised)."""
        self.loops_in_flight.pop(plan.window, None)

    def integrate_loop(self, plan: WindowPlan, pred: WindowPrediction | None) -> dict[str, Any]:
        """Verify a loop window (under the lock); an accepted loop adds its edge and makes the next solve global.
        Returns a report (accepted, reason, figures). `pred` None: the model call failed; the candidate goes back
        to the queue LOOP_RETRIES times, then is dropped (a missed loop, never a false one)."""
        self.loops_in_flight.pop(plan.window, None)
        cons = self.consistency
        q, c = plan.loop
        report: dict[str, Any] = {"query": q, "candidate": c, "accepted": False}
        kq, kc = cons.detector.get(q), cons.detector.get(c)
        if kq is None or kc is None:
            self.loop_attempts.pop((q, c), None)
            report["reason"] = "keyframe dropped"
            return report
        if pred is None:
            failed = self.loop_attempts.get((q, c), 0) + 1
            if failed <= LOOP_RETRIES:
                self.loop_attempts[(q, c)] = failed
                cons.detector.pending.append((q, c, plan.loop_root))
                report.update(reason="model unavailable", requeued=True)
            else:
                self.loop_attempts.pop((q, c), None)
                report.update(reason="model unavailable", dropped=True)
            return report
        self.loop_attempts.pop((q, c), None)
        c2w = invert_pose(pred.extrinsics)
        conf = pred.conf.astype(np.float32)
        keep = confidence_mask(conf, self.params.conf_percentile, depth=pred.depth)
        p = self.params
        if p.depth_refine != "off":  # the two views see one place: compare them whatever their frame gap
            res = refine_window(pred.depth, pred.intrinsics, c2w, keep, samples_per_view=p.depth_refine_samples,
                                prior_std=p.depth_refine_prior, fit_poses=p.depth_refine == "field+poses",
                                seed=q)
            if res.ok:
                pred, c2w = replace(pred, depth=res.depth), res.c2w
        chk = verify_loop(kq, kc, pred.depth, pred.intrinsics, c2w, keep, min_inliers=p.loop_min_inlier_ratio,
                          max_rmse=p.loop_max_rel_rmse, min_overlap=p.loop_min_overlap, seed=q,
                          pin_cameras=p.loop_edge_at_cameras)
        report.update(chk.info)
        if not chk.ok:
            cons.loops_rejected += 1
            report["reason"] = chk.reason
            return report
        ok, reason, disc = cons.accept_loop(kq.window, kc.window, chk.z)
        report.update(accepted=ok, discrepancy=round(disc, 2))
        if reason:
            report["reason"] = reason
        elif q == plan.loop_root:
            # A confirmed place: the query's preceding keyframes (other windows) against the same candidate give
            # more loop edges, each verified like the first, so one closure does not hang on one measurement.
            near = [k for k in cons.detector.keyframes
                    if k.index < q and k.window != kq.window and k.index - c >= p.loop_min_gap]
            for k in near[-LOOP_EXTRA_EDGES:]:
                cons.detector.pending.append((k.index, c, q))
        return report

    # --- snapshot / restore -------------------------------------------------------------------------------
    _SNAPSHOT_FIELDS = ("voxel_size", "windows_planned", "windows_integrated", "lost", "input_size", "placed",
                        "prior_world", "last_keyframe", "num_keyframes")
    _CONSISTENCY_FIELDS = ("last_keyframe_window", "loops_planned", "occ_corr")

    def snapshot(self) -> dict[str, Any]:
        """What the next window needs, taken after an integration: the world frames that can serve as context
        and the gauge/keyframe state. Pending and in-flight frames are not included; the occupancy is rebuilt
        from the stored map on restore (it grows with the map, this stays small)."""
        snap = {k: getattr(self, k) for k in self._SNAPSHOT_FIELDS}
        # A world frame's image and sample travel once, as incremental items (WorldFrame.parts); marked sent
        # here: the worker commits snapshots in order, and a commit that fails stops the worker.
        snap["world"] = [w.without_parts() for w in self.world.values()]
        inc = {"keep": [world_part_key(i) for i in self.world],
               "new": {world_part_key(i): w.parts() for i, w in self.world.items() if i not in self.world_sent}}
        self.world_sent = set(self.world)
        snap["keyframes"] = list(self.keyframes)
        snap["last_planned"] = [f.index for f in self.last_planned]
        if self.consistency is not None:
            snap["consistency"] = self.consistency.state()
            snap.update({k: getattr(self, k) for k in self._CONSISTENCY_FIELDS})
            # Loop keyframes (bounded, each sent to the store once: loop_snapshot.py) and the candidates still to
            # verify, those in flight included, so a takeover can still close loops to places seen before it.
            det = self.consistency.detector
            snap["loop_detector"] = {"since_query": det.since_query, "pending": [tuple(p) for p in det.pending] + [
                (*p.loop, p.loop_root) for p in self.loops_in_flight.values()]}
            snap["loop_carry"] = self.loop_carry.state()
            loops = self.loop_carry.snapshot()
            inc = {"keep": [*loops["keep"], *inc["keep"]], "new": {**loops["new"], **inc["new"]}}
        snap[INCREMENTAL] = inc
        return snap

    @classmethod
    def restore(cls, params: SessionParams, snap: dict[str, Any], map_points: np.ndarray | None = None,
                decode: Callable[[bytes], np.ndarray] | None = None) -> StreamReconstructor:
        """Continue a session elsewhere (another ingress replica, or after this one restarted). `decode` turns a
        world frame's client encoding back into the model-size image (the snapshot carries only the encoding)."""
        rec = cls(params)
        for k in cls._SNAPSHOT_FIELDS:
            setattr(rec, k, snap[k])
        parts = stream_state.items(snap)
        world = []
        for w in snap["world"]:
            p = parts.get(world_part_key(w.index))
            if p is not None:
                w = w.with_parts(p)
            elif getattr(w, "conf", None) is None:  # its parts never reached the store: not a context frame now
                log.warning("snapshot frame %d has no stored image; left out of the context", w.index)
                continue
            if getattr(w, "pix", None) is None:
                w = WorldFrame.from_dense(w, rec.rng)
            if w.image is None:
                if decode is None or w.encoded is None:
                    raise ValueError(f"snapshot frame {w.index} has no image and nothing to decode it with")
                w = replace(w, image=decode(w.encoded))
            world.append(w)
        rec.world = {w.index: w for w in world}
        rec.world_sent = set(rec.world)  # they came from the store
        rec.keyframes.extend(snap["keyframes"])
        rec.last_planned = [rec.world[i].as_input() for i in snap["last_planned"] if i in rec.world]
        rec.windows_planned = rec.windows_integrated  # outstanding windows died with their replica
        if rec.consistency is not None and "consistency" in snap:
            rec.consistency = Consistency.from_state(params, snap["consistency"])
            for k in cls._CONSISTENCY_FIELDS:
                setattr(rec, k, snap[k])
            rec.loop_carry, carried = LoopCarry.restore(params.loop_snapshot_keyframes, snap)
            det = rec.consistency.detector
            det.keyframes = sorted(carried, key=lambda k: k.index)
            ld = snap.get("loop_detector") or {}
            det.since_query = int(ld.get("since_query", 0))
            det.pending = [tuple(p) for p in ld.get("pending", [])]
        if map_points is not None and len(map_points) and rec.voxel_size:
            keys = np.unique(voxel_keys(map_points, rec.voxel_size))
            rec.occupancy.add(keys)
            rec.occupancy.compact()
        return rec
