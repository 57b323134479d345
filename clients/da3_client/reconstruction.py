"""Accumulates the server's result records into poses, intrinsics and a point cloud."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from da3_client.wire import PointChunk, decode_points


class Reconstruction:
    """Feed it every server message (`apply`); it keeps what a result record carries.

    A record (seq) is a "window" message, one "frame_result" per new frame, then a DA3P points message;
    `last_seq` is the last record whose points arrived, i.e. the `resume_from` to reconnect with.
    """

    def __init__(self) -> None:
        self.windows: dict[int, dict] = {}  # seq -> window message
        self.frames: dict[Any, dict] = {}  # frame_id -> latest frame_result message
        self.poses: dict[Any, np.ndarray] = {}  # frame_id -> (4, 4) float64 camera-to-world
        self.intrinsics: dict[Any, np.ndarray] = {}  # frame_id -> (3, 3) float64, processed-image pixels
        self.failed_frames: list[Any] = []  # frames the server could not place (pose null)
        self.chunks: list[PointChunk] = []
        self.last_seq = 0

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
        if kind not in ("window", "frame_result") or (seq and seq <= self.last_seq):
            return None
        if kind == "window":
            self.windows[seq] = msg
        else:
            fid = msg.get("frame_id")
            self.frames[fid] = msg
            if msg.get("pose") is None:
                self.failed_frames.append(fid)
                self.poses.pop(fid, None)
                self.intrinsics.pop(fid, None)
            else:
                self.poses[fid] = np.asarray(msg["pose"], np.float64).reshape(4, 4)
                if msg.get("intrinsics") is not None:
                    self.intrinsics[fid] = np.asarray(msg["intrinsics"], np.float64).reshape(3, 3)
        return None

    @property
    def num_points(self) -> int:
        return sum(c.count for c in self.chunks)

    def points(self) -> np.ndarray:
        """(P, 3) float32 world points of every chunk received, in arrival order."""
        if not self.chunks:
            return np.zeros((0, 3), np.float32)
        return np.concatenate([c.points for c in self.chunks]).astype(np.float32, copy=False)

    def colors(self) -> np.ndarray:
        """(P, 3) uint8 RGB, aligned with `points()`."""
        if not self.chunks:
            return np.zeros((0, 3), np.uint8)
        return np.concatenate([c.colors for c in self.chunks])

    def trajectory(self) -> list[dict]:
        """Placed frames in acceptance order: frame_id, index, timestamp, pose (4x4 c2w), intrinsics."""
        out = []
        for fid, fr in sorted(self.frames.items(), key=lambda kv: kv[1].get("index", 0)):
            if fid not in self.poses:
                continue
            out.append({"frame_id": fid, "index": fr.get("index"), "timestamp": fr.get("timestamp"),
                        "pose": self.poses[fid].tolist(),
                        "intrinsics": self.intrinsics[fid].tolist() if fid in self.intrinsics else None,
                        "image_size": fr.get("image_size")})
        return out

    def write_trajectory(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"convention": "OpenCV camera-to-world", "frames": self.trajectory()},
                                   indent=1))
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
