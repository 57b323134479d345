"""Client side of the binary formats (DA3F frames out, DA3P points in). Independent of serve_app on purpose:
the client installs without the server; tests check the two implementations against each other."""

from __future__ import annotations

import io
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from da3_client._protocol import (  # generated from serve_app/protocol/framing.py
    ENC_FLOAT16,
    ENC_FLOAT32,
    FRAME_FLAGS,
    FRAME_MAGIC,
    MAX_FRAME_ID_CHARS,
    MAX_HEADER_BYTES,
    POINTS_MAGIC,
    PREFIX_FORMAT,
    PROTOCOL_VERSION,
)
from da3_client.errors import Da3Error

_PREFIX = struct.Struct(PREFIX_FORMAT)  # magic, version, flags (frames) / encoding (points), header_len
_DTYPES = {ENC_FLOAT16: np.dtype("<f2"), ENC_FLOAT32: np.dtype("<f4")}


@dataclass
class PointChunk:
    """One DA3P message: the points a result record added to the map."""

    seq: int
    window: int
    frame_ids: list
    points: np.ndarray  # (M, 3) float32 world
    colors: np.ndarray  # (M, 3) uint8 RGB
    encoding: int
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def count(self) -> int:
        return int(self.points.shape[0])


def _matrix(value: Any, shape: tuple[int, int], name: str) -> list[list[float]]:
    a = np.asarray(value, dtype=np.float64)
    if a.shape != shape or not np.isfinite(a).all():
        raise ValueError(f"{name} must be a finite {shape[0]}x{shape[1]} matrix, got shape {a.shape}")
    return a.tolist()


def frame_header(frame_id: int | str | None = None, timestamp: float | None = None, intrinsics: Any = None,
                 pose: Any = None) -> dict:
    """The JSON header of a frame; validated here so a bad value fails locally with ValueError."""
    header: dict[str, Any] = {}
    if frame_id is not None:
        if isinstance(frame_id, bool) or not isinstance(frame_id, (int, str)):
            raise ValueError("frame_id must be an int >= 0 or a string")
        if isinstance(frame_id, int) and frame_id < 0:
            raise ValueError("frame_id must be >= 0")
        if isinstance(frame_id, str) and not 1 <= len(frame_id) <= MAX_FRAME_ID_CHARS:
            raise ValueError(f"a string frame_id must have 1..{MAX_FRAME_ID_CHARS} characters")
        header["frame_id"] = frame_id
    if timestamp is not None:
        t = float(timestamp)
        if not math.isfinite(t):
            raise ValueError("timestamp must be finite")
        header["timestamp"] = t
    if intrinsics is not None:
        header["intrinsics"] = _matrix(intrinsics, (3, 3), "intrinsics")
    if pose is not None:
        header["pose"] = _matrix(pose, (4, 4), "pose")
    return header


def encode_frame(image: bytes, header: dict | None = None) -> bytes:
    """b"DA3F" | u8 version | u8 flags=0 | u16 LE header_len | JSON header | encoded image."""
    if not image:
        raise ValueError("image bytes are empty")
    h = json.dumps(header, separators=(",", ":")).encode() if header else b""
    if len(h) > MAX_HEADER_BYTES:
        raise ValueError("frame header too long")
    return _PREFIX.pack(FRAME_MAGIC, PROTOCOL_VERSION, FRAME_FLAGS, len(h)) + h + bytes(image)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    from PIL import Image

    a = np.asarray(image)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {a.shape} {a.dtype}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def decode_points(data: bytes) -> PointChunk:
    """Parse a DA3P points message (world = origin + value). Raises Da3Error(PROTOCOL_ERROR) if malformed."""
    data = bytes(data)

    def bad(msg: str) -> Da3Error:
        return Da3Error("PROTOCOL_ERROR", msg, fatal=False)

    if len(data) < _PREFIX.size or not data.startswith(POINTS_MAGIC):
        raise bad("not a DA3P points message")
    _, version, enc, header_len = _PREFIX.unpack_from(data)
    if version != PROTOCOL_VERSION or enc not in _DTYPES:
        raise bad(f"unsupported DA3P version {version} / encoding {enc}")
    start = _PREFIX.size + header_len
    try:
        header = json.loads(data[_PREFIX.size:start].decode("utf-8"))
    except ValueError:
        raise bad("DA3P header is not JSON") from None
    count = header.get("count") if isinstance(header, dict) else None
    if not isinstance(count, int) or count < 0 or start > len(data):
        raise bad("DA3P header needs an integer count >= 0")
    dt = _DTYPES[enc]
    pos_bytes = count * 3 * dt.itemsize
    if len(data) != start + pos_bytes + count * 3:
        raise bad(f"DA3P body size does not match {count} points")
    origin = np.asarray(header.get("origin", [0.0, 0.0, 0.0]), np.float32).reshape(3)
    offsets = np.frombuffer(data, dt, count * 3, start).reshape(count, 3)
    points = (offsets.astype(np.float32) + origin).astype(np.float32)
    colors = np.frombuffer(data, np.uint8, count * 3, start + pos_bytes).reshape(count, 3).copy()
    return PointChunk(seq=int(header.get("seq", 0)), window=int(header.get("window", 0)),
                      frame_ids=list(header.get("frame_ids", [])), points=points, colors=colors, encoding=enc,
                      origin=(float(origin[0]), float(origin[1]), float(origin[2])))
