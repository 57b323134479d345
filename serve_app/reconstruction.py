"""Streaming reconstruction of one session: window planning and alignment into one world. Pure numpy.

Frames arrive already resized to the model's input size. Windows are `overlap` context frames (already placed in
the world) followed by new frames. Each window comes back from the model in its own gauge (first view at the
origin, arbitrary scale); the context frames' dense points, pixel for pixel, give a robust Sim(3) onto the
world, which places the new frames. The world is the first window's gauge (scale fixed by it).

Planning and integration are split so the ingress can send window k+1 to the model before window k is aligned:
planning needs only images; integration (strictly in window order) needs the context frames' world points.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.alignment import robust_sim3
from serve_app.config import SessionParams
from serve_app.geometry import (Sim3, confidence_mask, invert_pose, subsample, unproject_depths,
                                voxel_downsample)
from serve_app.prediction import WindowPrediction, WindowRequest

AUTO_VOXEL_FRACTION = 0.004  # auto voxel = this x median depth of the first window (about 2 px at 504)


@dataclass
class FrameInput:
    index: int  # server frame index (acceptance order)
    frame_id: Any  # client's id (defaults to index)
    image: np.ndarray  # (h, w, 3) uint8, model input size
    original_size: tuple[int, int]  # (W, H) as received
    received_at: float = field(default_factory=time.time)
    timestamp: float | None = None
    intrinsics: np.ndarray | None = None  # prior, processed pixels
    pose: np.ndarray | None = None  # prior c2w


@dataclass
class WorldFrame:
    """A processed frame that later windows may use as context."""

    index: int
    frame_id: Any
    image: np.ndarray
    points: np.ndarray  # (h, w, 3) float32 world
    conf: np.ndarray  # (h, w) float32
    c2w: np.ndarray  # (4, 4)


@dataclass
class WindowPlan:
    window: int
    context: list[FrameInput]
    new: list[FrameInput]
    planned_at: float = field(default_factory=time.time)

    @property
    def frames(self) -> list[FrameInput]:
        return self.context + self.new

    def request(self, tag: str = "") -> WindowRequest:
        return WindowRequest(images=np.stack([f.image for f in self.frames]), tag=tag)


@dataclass
class WindowOutput:
    window: dict[str, Any]  # the "window" message body (without seq)
    frames: list[dict[str, Any]]  # one "frame_result" body per new frame (without seq)
    points: np.ndarray
    colors: np.ndarray
    ok: bool
    reason: str | None = None


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

    # --- planning -----------------------------------------------------------------------------------
    def add_frame(self, frame: FrameInput) -> None:
        self.pending.append(frame)

    def _context(self) -> list[FrameInput]:
        k = self.params.overlap
        if self.lost and self.world:
            good = sorted(self.world.values(), key=lambda w: w.index)[-k:]
            return [FrameInput(index=w.index, frame_id=w.frame_id, image=w.image, original_size=(0, 0))
                    for w in good]
        return self.last_planned[-k:]

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
    def integrate(self, plan: WindowPlan, pred: WindowPrediction) -> WindowOutput:
        """Place a predicted window in the world. Must be called in window order."""
        t0 = time.perf_counter()
        n_ctx = len(plan.context)
        c2w_win = invert_pose(pred.extrinsics)  # (N, 4, 4) in the window's gauge
        pts_win = unproject_depths(pred.depth, pred.intrinsics, c2w_win)
        conf = pred.conf.astype(np.float32)
        keep = confidence_mask(conf, self.params.conf_percentile, depth=pred.depth)

        if self.windows_integrated == 0 and n_ctx == 0:
            sim = Sim3.identity()
            align = {"ok": True, "scale": 1.0, "rmse": 0.0, "inlier_ratio": 1.0, "num_points": 0,
                     "reference": True}
            if self.voxel_size is None:
                valid = pred.depth[np.isfinite(pred.depth) & (pred.depth > 0)]
                med = float(np.median(valid)) if valid.size else 1.0
                self.voxel_size = max(med * AUTO_VOXEL_FRACTION, 1e-6)
        else:
            src, dst, w = [], [], []
            for j, f in enumerate(plan.context):
                wf = self.world.get(f.index)
                if wf is None or wf.points.shape != pts_win[j].shape:
                    continue
                m = keep[j] & np.isfinite(wf.points).all(-1)
                src.append(pts_win[j][m])
                dst.append(wf.points[m])
                w.append(np.sqrt(conf[j][m] * wf.conf[m]))
            if src:
                res = robust_sim3(np.concatenate(src), np.concatenate(dst), np.concatenate(w))
            else:
                res = None
            if res is None or not res.ok:
                reason = "no context frame has world geometry" if res is None else res.reason
                return self.fail(plan, reason, time.perf_counter() - t0)
            sim = res.sim3
            align = {"ok": True, "scale": float(res.scale), "rmse": float(res.rmse),
                     "inlier_ratio": float(res.inlier_ratio), "num_points": int(res.num_points)}

        self.lost = False
        now = time.time()
        frames, all_pts, all_cols = [], [], []
        for j in range(n_ctx, len(plan.frames)):
            f = plan.frames[j]
            c2w = sim.transform_c2w(c2w_win[j])
            world_pts = sim.apply(pts_win[j].reshape(-1, 3)).reshape(pts_win[j].shape).astype(np.float32)
            self.world[f.index] = WorldFrame(f.index, f.frame_id, f.image, world_pts, conf[j], c2w)
            m = keep[j]
            p, c = subsample(world_pts[m], f.image[m], self.params.max_points_per_frame, self.rng)
            all_pts.append(p)
            all_cols.append(c)
            d = pred.depth[j][np.isfinite(pred.depth[j]) & (pred.depth[j] > 0)] * sim.s
            frames.append({
                "frame_id": f.frame_id, "index": f.index, "window": plan.window,
                "timestamp": f.timestamp,
                "pose": c2w.tolist(), "intrinsics": pred.intrinsics[j].tolist(),
                "image_size": [int(f.image.shape[1]), int(f.image.shape[0])],
                "original_size": list(f.original_size),
                "depth": ({"min": float(d.min()), "max": float(d.max()), "median": float(np.median(d))}
                          if d.size else {"min": None, "max": None, "median": None}),
                "points_added": 0, "latency_ms": round((now - f.received_at) * 1000.0, 2),
            })
        pts = np.concatenate(all_pts) if all_pts else np.zeros((0, 3), np.float32)
        cols = np.concatenate(all_cols) if all_cols else np.zeros((0, 3), np.uint8)
        counts = [len(p) for p in all_pts]
        if self.voxel_size and len(pts):
            pts, cols, _ = voxel_downsample(pts, cols, self.voxel_size)
            # Attribute the downsampled total to frames in proportion to what each contributed.
            total = max(sum(counts), 1)
            counts = [int(round(len(pts) * c / total)) for c in counts]
        for fr, c in zip(frames, counts):
            fr["points_added"] = c
        self._finish(plan)
        window = {"window": plan.window, "frame_ids": [f.frame_id for f in plan.new],
                  "context_frame_ids": [f.frame_id for f in plan.context], "alignment": align,
                  "geometry_ms": round((time.perf_counter() - t0) * 1000.0, 2)}
        return WindowOutput(window=window, frames=frames, points=pts.astype(np.float32),
                            colors=cols.astype(np.uint8), ok=True)

    def fail(self, plan: WindowPlan, reason: str | None, elapsed: float = 0.0) -> WindowOutput:
        """Report a window that could not be placed (model error or alignment); the map is untouched."""
        self.lost = True
        self._finish(plan)
        frames = [{"frame_id": f.frame_id, "index": f.index, "window": plan.window, "timestamp": f.timestamp,
                   "pose": None, "intrinsics": None, "image_size": [int(f.image.shape[1]), int(f.image.shape[0])],
                   "original_size": list(f.original_size), "depth": None, "points_added": 0,
                   "latency_ms": round((time.time() - f.received_at) * 1000.0, 2), "failed": True}
                  for f in plan.new]
        window = {"window": plan.window, "frame_ids": [f.frame_id for f in plan.new],
                  "context_frame_ids": [f.frame_id for f in plan.context],
                  "alignment": {"ok": False, "reason": reason}, "geometry_ms": round(elapsed * 1000.0, 2)}
        return WindowOutput(window=window, frames=frames, points=np.zeros((0, 3), np.float32),
                            colors=np.zeros((0, 3), np.uint8), ok=False, reason=reason)

    def _finish(self, plan: WindowPlan) -> None:
        self.outstanding.pop(plan.window, None)
        self.windows_integrated += 1
        # Keep world data only for frames a future or outstanding window can still use as context.
        needed = {f.index for p in self.outstanding.values() for f in p.context}
        needed |= {f.index for f in self.last_planned[-self.params.overlap:]}
        if self.world:
            newest = sorted(self.world)[-self.params.overlap:]  # re-anchoring after a failure
            needed |= set(newest)
        for idx in [i for i in self.world if i not in needed]:
            del self.world[idx]

    @property
    def idle(self) -> bool:
        return not self.pending and not self.outstanding
