"""Client side of the `correction` message (docs/WEBSOCKET_API.md 3.5): per-window absolute Sim(3) transforms
from the server's global optimisation. Independent of serve_app on purpose (tests check it against the
server's serve_app/recon/corrections.py).

corrected = T @ original for a window's points and camera poses as first received; a window no correction
named keeps its current transform (identity at first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from da3_client.errors import Da3Error


@dataclass(frozen=True)
class Transform:
    """x -> s R x + t."""

    s: float
    R: np.ndarray  # (3, 3) float64
    t: np.ndarray  # (3,) float64

    def matrix(self) -> np.ndarray:
        M = np.eye(4)
        M[:3, :3] = self.s * self.R
        M[:3, 3] = self.t
        return M

    def apply(self, points: np.ndarray) -> np.ndarray:
        """(M, 3) -> (M, 3) float32, in float64 like the server."""
        p = np.asarray(points, np.float64).reshape(-1, 3)
        out = (self.R @ p.T).T
        out *= self.s
        out += self.t
        return out.astype(np.float32)

    def apply_c2w(self, c2w: np.ndarray) -> np.ndarray:
        """A camera-to-world pose (4, 4) in the corrected world: rotation R Rc, centre s R c + t."""
        c2w = np.asarray(c2w, np.float64)
        out = np.eye(4)
        out[:3, :3] = self.R @ c2w[:3, :3]
        out[:3, 3] = self.s * (self.R @ c2w[:3, 3]) + self.t
        return out


def _rotation(x: float, y: float, z: float, w: float) -> np.ndarray:
    n = math.sqrt(x * x + y * y + z * z + w * w)
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def parse_correction(msg: dict) -> dict[int, Transform]:
    """{window: Transform} of a correction message; raises Da3Error(PROTOCOL_ERROR) if malformed."""
    rows: Any = msg.get("transforms")
    if not isinstance(rows, list):
        raise Da3Error("PROTOCOL_ERROR", "correction without a transforms list", fatal=False)
    out: dict[int, Transform] = {}
    for row in rows:
        if (not isinstance(row, list) or len(row) != 9 or not isinstance(row[0], int)
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in row[1:])):
            raise Da3Error("PROTOCOL_ERROR", f"bad correction transform {str(row)[:80]}", fatal=False)
        w, s, qx, qy, qz, qw, tx, ty, tz = row
        out[int(w)] = Transform(float(s), _rotation(qx, qy, qz, qw), np.array([tx, ty, tz], np.float64))
    return out
