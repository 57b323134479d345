"""Per-window corrections from global optimisation: the `correction` message (docs/WEBSOCKET_API.md 3.5.1) and
the pure maths to apply and merge it. Plain numpy, no Ray.

A window's points and poses as first emitted (its window/frame_result/points messages) are its "original"
coordinates. A correction carries, for some windows, the ABSOLUTE transform T (a Sim(3)) that maps those
originals to the current best estimate: corrected = T @ original. Windows it does not name keep their
transform (identity if none yet), so merging is a dict update: idempotent, and replaying every correction in
seq order ends in the same state as having received them live.

Wire form (compact; tests/recon/test_corrections.py::test_a_thousand_windows_fit_in_100_kB measures 85-90 bytes per
window, so 1,000 windows < 100 kB):
    {"type":"correction","seq":12,"version":3,"loops_accepted":2,"transforms":[[w, s, qx, qy, qz, qw, tx, ...]]}
Numbers are rounded to float32-level precision (see to_row) in their shortest form; the server keeps exactly the
transforms it sent (decoded from the message), so a client that applies them reproduces the server's exports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.recon.geometry import Sim3

MESSAGE_TYPE = "correction"
ROW = 9  # window, s, qx, qy, qz, qw, tx, ty, tz


@dataclass
class Correction:
    version: int  # increases with each optimisation of the session
    transforms: dict[int, Sim3] = field(default_factory=dict)  # window -> ABSOLUTE: corrected = T @ original
    # Loop closures accepted in the session so far (None: not reported). Loops verified after the last window
    # reach clients only here: each accepted batch of loops is followed by a global solve and its correction.
    loops_accepted: int | None = None


class CorrectionError(ValueError):
    """A malformed correction message."""


def _quat_from_R(R: np.ndarray) -> tuple[float, float, float, float]:
    """Rotation (3, 3) -> unit quaternion (x, y, z, w), w >= 0 (Shepperd: divide by the largest component)."""
    m = np.asarray(R, np.float64).tolist()  # Python floats: a few scalar operations, no numpy overhead
    tr = m[0][0] + m[1][1] + m[2][2]
    cands = (tr, m[0][0], m[1][1], m[2][2])
    k = cands.index(max(cands))
    if k == 0:
        r = 2.0 * math.sqrt(max(1.0 + tr, 1e-300))
        q = ((m[2][1] - m[1][2]) / r, (m[0][2] - m[2][0]) / r, (m[1][0] - m[0][1]) / r, 0.25 * r)
    elif k == 1:
        r = 2.0 * math.sqrt(max(1.0 + m[0][0] - m[1][1] - m[2][2], 1e-300))
        q = (0.25 * r, (m[0][1] + m[1][0]) / r, (m[0][2] + m[2][0]) / r, (m[2][1] - m[1][2]) / r)
    elif k == 2:
        r = 2.0 * math.sqrt(max(1.0 + m[1][1] - m[0][0] - m[2][2], 1e-300))
        q = ((m[0][1] + m[1][0]) / r, 0.25 * r, (m[1][2] + m[2][1]) / r, (m[0][2] - m[2][0]) / r)
    else:
        r = 2.0 * math.sqrt(max(1.0 + m[2][2] - m[0][0] - m[1][1], 1e-300))
        q = ((m[0][2] + m[2][0]) / r, (m[1][2] + m[2][1]) / r, 0.25 * r, (m[1][0] - m[0][1]) / r)
    n = math.sqrt(sum(v * v for v in q))
    sign = -1.0 if q[3] < 0 else 1.0
    return tuple(sign * v / n for v in q)  # type: ignore[return-value]


def _R_from_quat(q) -> np.ndarray:
    x, y, z, w = (float(v) for v in q)
    n = math.sqrt(x * x + y * y + z * z + w * w)
    x, y, z, w = x / n, y / n, z / n, w / n
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


# Rounding (float32-level precision in few characters): s to 7 significant digits; quaternion components to 7
# decimals (~1e-7 rad); translations to 7 significant digits of the message's largest one (a shared step: small
# shifts need no more digits than the large ones). Each is a float whose repr is that short; -0.0 becomes 0.0.
Q_DECIMALS = 7


def t_decimals(max_abs_t: float) -> int:
    if not max_abs_t > 0:
        return 0
    return max(0, min(12, 6 - math.floor(math.log10(max_abs_t))))


def to_row(window: int, T: Sim3, t_dec: int | None = None) -> list:
    t = T.t.tolist()
    if t_dec is None:
        t_dec = t_decimals(max(abs(v) for v in t))
    q = _quat_from_R(T.R)
    return [int(window), float(f"{T.s:.7g}"), *(round(v, Q_DECIMALS) + 0.0 for v in q),
            *(round(v, t_dec) + 0.0 for v in t)]


def from_row(row: Any) -> tuple[int, Sim3]:
    if not isinstance(row, list) or len(row) != ROW:
        raise CorrectionError(f"a transform is a list of {ROW} numbers: window, s, qx, qy, qz, qw, tx, ty, "
                              "tz")
    w = row[0]
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise CorrectionError("a transform's window must be an integer >= 0")
    vals = row[1:]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals):
        raise CorrectionError(f"window {w}: transform values must be finite numbers")
    s, q, t = float(vals[0]), vals[1:5], vals[5:8]
    if s <= 0:
        raise CorrectionError(f"window {w}: scale must be > 0")
    if not 0.5 < math.sqrt(sum(float(v) * float(v) for v in q)) < 1.5:
        raise CorrectionError(f"window {w}: quaternion must be (close to) unit length")
    return w, Sim3(s, _R_from_quat(q), np.asarray(t, np.float64))


def to_message(corr: Correction, seq: int = 0) -> dict:
    """The wire message (rows sorted by window). `seq` is the session store's, 0 until it is committed."""
    t_dec = t_decimals(max((max(abs(v) for v in T.t.tolist()) for T in corr.transforms.values()), default=0.0))
    rows = [to_row(w, corr.transforms[w], t_dec) for w in sorted(corr.transforms)]
    msg = {"type": MESSAGE_TYPE, "seq": int(seq), "version": int(corr.version), "transforms": rows}
    if corr.loops_accepted is not None:
        msg["loops_accepted"] = int(corr.loops_accepted)
    return msg


def from_message(msg: dict) -> Correction:
    """Parse a correction message; raises CorrectionError when malformed."""
    if not isinstance(msg, dict) or msg.get("type") != MESSAGE_TYPE:
        raise CorrectionError("not a correction message")
    version, rows = msg.get("version"), msg.get("transforms")
    if isinstance(version, bool) or not isinstance(version, int) or not isinstance(rows, list):
        raise CorrectionError("a correction needs an integer version and a list of transforms")
    loops = msg.get("loops_accepted")
    if loops is not None and (isinstance(loops, bool) or not isinstance(loops, int) or loops < 0):
        raise CorrectionError("loops_accepted must be an integer >= 0")
    out: dict[int, Sim3] = {}
    for row in rows:
        w, T = from_row(row)
        out[w] = T
    return Correction(version, out, loops)


def quantize(corr: Correction) -> Correction:
    """The correction exactly as a client decodes it from the wire."""
    return from_message(to_message(corr))


def merge(current: dict[int, Sim3], corr: Correction) -> dict[int, Sim3]:
    """The per-window state after `corr`: its windows take its (absolute) transforms, others keep theirs."""
    return {**current, **corr.transforms}


def transform_for(state: dict[int, Sim3], window: int) -> Sim3 | None:
    return state.get(int(window))


def apply_points(T: Sim3 | None, points: np.ndarray) -> np.ndarray:
    """(M, 3) original points of one window -> corrected float32 (unchanged when T is None)."""
    p = np.asarray(points, np.float32)
    if T is None or len(p) == 0:
        return p
    return T.apply(p.reshape(-1, 3))


def apply_c2w(T: Sim3 | None, c2w: np.ndarray) -> np.ndarray:
    """Original camera-to-world pose(s) (..., 4, 4) -> corrected float32."""
    if T is None:
        return np.asarray(c2w, np.float32)
    return T.transform_c2w(c2w)


def corrected_cloud(windows: list[tuple[int, np.ndarray]], state: dict[int, Sim3]) -> np.ndarray:
    """Concatenated corrected points of [(window, original points), ...] in the given order."""
    parts = [apply_points(state.get(int(w)), p) for w, p in windows]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros((0, 3), np.float32)


def corrected_frames(frames: list[dict], state: dict[int, Sim3]) -> list[dict]:
    """frame_result dicts with their `pose` (original c2w) replaced by the corrected one; others unchanged."""
    if not state:
        return list(frames)
    out = []
    for f in frames:
        T = state.get(f.get("window")) if f.get("pose") is not None else None
        out.append(f if T is None else {**f, "pose": apply_c2w(T, np.asarray(f["pose"], float)).tolist()})
    return out


def compact(older: list[dict], newer: dict) -> list[dict]:
    """Stored correction messages after `newer` is added: rows of older messages for windows `newer` names are
    dropped (the replay ends in the same state, and what a session stores stays one row per window)."""
    named = {row[0] for row in newer["transforms"]}
    out = []
    for m in older:
        rows = [r for r in m["transforms"] if r[0] not in named]
        out.append(m if len(rows) == len(m["transforms"]) else {**m, "transforms": rows})
    return out
