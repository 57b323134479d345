"""Accumulates the server's result records into poses, intrinsics and a point cloud, with the global
optimisation's per-window corrections applied (docs/WEBSOCKET_API.md 3.5, `correction`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from da3_client.corrections import Transform, parse_correction
from da3_client.wire import PointChunk, decode_points


class Reconstruction:
    """Feed it every server message (`apply`); it keeps what a result record carries.

    A record (seq) is a "window" message, one "frame_result" per new frame, then a DA3P points message;
    A `correction` record is one JSON message: absolute per-window transforms that `points()`, `poses` and
    `trajectory()` apply to each window's points and cameras as first received (kept in `chunks` and
    `original_poses`). `last_seq` is the last complete record, i.e. the `resume_from` to reconnect with.
    """

    def __init__(self) -> None:
        self.windows: dict[int, dict] = {}  # seq -> window message
        self.frames: dict[Any, dict] = {}  # frame_id -> latest frame_result message
        self.original_poses: dict[Any, np.ndarray] = {}  # frame_id -> (4, 4) float64 c2w, as first received
        self.frame_windows: dict[Any, int] = {}  # frame_id -> its window
        self.intrinsics: dict[Any, np.ndarray] = {}  # frame_id -> (3, 3) float64, processed-image pixels
        self.failed_frames: list[Any] = []  # frames the server could not place (pose null)
        self.chunks: list[PointChunk] = []  # as received (original coordinates), chunk.window = its window
        self.transforms: dict[int, Transform] = {}  # window -> current absolute correction
        self.correction_version = 0
        self.corrections = 0  # correction records applied
        self.loops_accepted: int | None = None  # loop closures the server reported (None: global consistency off)
        self.last_seq = 0

    def _count_loops(self, n) -> None:
        if isinstance(n, int) and not isinstance(n, bool):  # cumulative on the server: the largest is the latest
            self.loops_accepted = max(n, self.loops_accepted or 0)

    def apply(self, msg: dict | bytes | PointChunk) -> PointChunk | None:
        """Apply one message (JSON dict, raw DA3P bytes or a decoded chunk); other message types are ignored.
        Returns the chunk when the message was points."""
        if isinstance(msg, (bytes, bytearray, memoryview)):
            msg = decode_points(msg)
        if isinstance(msg, PointChunk):
            if msg.seq and msg.seq <= self.last_seq:
                return msg  # replayed record already complete
            self.chunks.append(msg)
            self.last_seq = max(self.last_seq, msg.seq)
            return msg
        kind = msg.get("type")
        seq = int(msg.get("seq") or 0)
        if kind == "correction":
            if not seq or seq > self.last_seq:  # a replayed one is already in the state
                self.transforms.update(parse_correction(msg))
                self.correction_version = max(self.correction_version, int(msg.get("version") or 0))
                self.corrections += 1
                self.last_seq = max(self.last_seq, seq)
            self._count_loops(msg.get("loops_accepted"))
            return None
        if kind not in ("window", "frame_result") or (seq and seq <= self.last_seq):
            return None
        if kind == "window":
            self.windows[seq] = msg
            self._count_loops((msg.get("alignment") or {}).get("loops_accepted"))
        else:
            fid = msg.get("frame_id")
            self.frames[fid] = msg
            self.frame_windows[fid] = int(msg.get("window") or 0)
            if msg.get("pose") is None:
                self.failed_frames.append(fid)
                self.original_poses.pop(fid, None)
                self.intrinsics.pop(fid, None)
            else:
                self.original_poses[fid] = np.asarray(msg["pose"], np.float64).reshape(4, 4)
                if msg.get("intrinsics") is not None:
                    self.intrinsics[fid] = np.asarray(msg["intrinsics"], np.float64).reshape(3, 3)
        return None

    @property
    def num_points(self) -> int:
        return sum(c.count for c in self.chunks)

    @property
    def poses(self) -> dict[Any, np.ndarray]:
        """frame_id -> (4, 4) float64 camera-to-world, corrected."""
        out = {}
        for fid, pose in self.original_poses.items():
            T = self.transforms.get(self.frame_windows.get(fid, 0))
            out[fid] = pose if T is None else T.apply_c2w(pose)
        return out

    def points(self, corrected: bool = True) -> np.ndarray:
        """(P, 3) float32 world points of every chunk received, in arrival order; each window's mapped by its
        current correction unless `corrected` is False."""
        if not self.chunks:
            return np.zeros((0, 3), np.float32)
        parts = []
        for c in self.chunks:
            T = self.transforms.get(c.window) if corrected else None
            parts.append(c.points if T is None else T.apply(c.points))
        return np.concatenate(parts).astype(np.float32, copy=False)

    def colors(self) -> np.ndarray:
        """(P, 3) uint8 RGB, aligned with `points()`."""
        if not self.chunks:
            return np.zeros((0, 3), np.uint8)
        return np.concatenate([c.colors for c in self.chunks])

    def trajectory(self) -> list[dict]:
        """Placed frames in acceptance order: frame_id, index, timestamp, pose (4x4 c2w), intrinsics."""
        out = []
        poses = self.poses
        for fid, fr in sorted(self.frames.items(), key=lambda kv: kv[1].get("index", 0)):
            if fid not in poses:
                continue
            out.append({"frame_id": fid, "index": fr.get("index"), "timestamp": fr.get("timestamp"),
                        "pose": poses[fid].tolist(),
                        "intrinsics": self.intrinsics[fid].tolist() if fid in self.intrinsics else None,
                        "image_size": fr.get("image_size")})
        return out

    def write_trajectory(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"convention": "OpenCV camera-to-world", "correction_version":
                                    self.correction_version, "frames": self.trajectory()}, indent=1))
        return path

    def write_ply(self, path: str | Path) -> Path:
        """Binary little-endian PLY with float x, y, z and uchar red, green, blue."""
        from plyfile import PlyData, PlyElement

        pts, cols = self.points(), self.colors()
        vertex = np.empty(len(pts), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                           ("red", "u1"), ("green", "u1"), ("blue", "u1")])
        vertex["x"], vertex["y"], vertex["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
        vertex["red"], vertex["green"], vertex["blue"] = cols[:, 0], cols[:, 1], cols[:, 2]
        path = Path(path)
        PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<").write(str(path))
        return path
