"""The WebSocket wire protocol (docs/WEBSOCKET_API.md is the contract; keep the two in step).

Pure Python + numpy + pydantic, importable without Ray. Every parser here raises only `ServiceError`
(INVALID_MESSAGE, MESSAGE_TOO_LARGE or INVALID_PRIOR, never fatal): a malformed client message must never take down a stream.

Over 400 lines because every parser of untrusted client input is kept in this one module (with framing.py's
constants), so the strict rules are read and tested in one place.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from serve_app.errors import ErrorCode, ServiceError
from serve_app.protocol import messages as M
from serve_app.protocol.framing import (
    ENC_FLOAT16,
    ENC_FLOAT32,
    ENCODINGS,
    FRAME_FLAGS,
    FRAME_MAGIC,
    MAX_FRAME_ID_CHARS,
    POINTS_ALIGN,
    POINTS_MAGIC,
    PREFIX_BYTES,
    PREFIX_FORMAT,
    PROTOCOL_VERSION,
)

_ENC_DTYPE = {ENC_FLOAT16: np.dtype("<f2"), ENC_FLOAT32: np.dtype("<f4")}
_PREFIX = struct.Struct(PREFIX_FORMAT)
_F16_MAX = 65000.0  # keep clear of float16's 65504 limit


def _bad(message: str, code: ErrorCode = ErrorCode.INVALID_MESSAGE) -> ServiceError:
    return ServiceError(code, message, fatal=False)


# --- client -> server ---------------------------------------------------------------------------------------
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Row3 = Annotated[list[FiniteFloat], Field(min_length=3, max_length=3)]
Row4 = Annotated[list[FiniteFloat], Field(min_length=4, max_length=4)]
PRIOR_MAX_ABS = 1e7  # largest |value| of a prior's entry (pixels, world units): far from float32 overflow
ROTATION_TOLERANCE = 1e-3  # max |R^T R - I| of a pose prior's rotation


def _as_used(rows: list[list[float]]) -> np.ndarray:
    """A prior as the server uses it (float32), back in float64 for the checks; raises on non-finite or huge."""
    a = np.asarray(rows, np.float64)
    if not (np.abs(a) <= PRIOR_MAX_ABS).all():  # also catches what float32 would turn into inf
        raise ValueError(f"entries must be finite with |value| <= {PRIOR_MAX_ABS:g}")
    return a.astype(np.float32).astype(np.float64)


FrameId = Annotated[StrictInt, Field(ge=0)] | Annotated[StrictStr, Field(min_length=1,
                                                                          max_length=MAX_FRAME_ID_CHARS)]


class FrameMeta(BaseModel):
    """Optional per-frame metadata (binary header or JSON frame fields). Unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    frame_id: FrameId | None = None
    timestamp: FiniteFloat | None = None
    intrinsics: Annotated[list[Row3], Field(min_length=3, max_length=3)] | None = None  # original-image pixels
    pose: Annotated[list[Row4], Field(min_length=4, max_length=4)] | None = None  # camera-to-world prior

    # Priors are used as float32 (the ingress converts them), so they are checked as float32: 1e39 is finite
    # as a float64 and inf as a float32.
    @field_validator("intrinsics")
    @classmethod
    def _k(cls, v):
        if v is None:
            return v
        k = _as_used(v)
        if not (k[0, 0] > 0 and k[1, 1] > 0):
            raise ValueError("focal lengths K[0][0] and K[1][1] must be positive")
        if np.abs(k[2] - (0.0, 0.0, 1.0)).max() > 1e-4:
            raise ValueError("the last row of K must be [0, 0, 1]")
        return v

    @field_validator("pose")
    @classmethod
    def _pose(cls, v):
        if v is None:
            return v
        m = _as_used(v)
        if np.abs(m[3] - (0.0, 0.0, 0.0, 1.0)).max() > 1e-4:
            raise ValueError("the last row of a 4x4 pose must be [0, 0, 0, 1]")
        r = m[:3, :3]
        if np.abs(r.T @ r - np.eye(3)).max() > ROTATION_TOLERANCE or np.linalg.det(r) <= 0:
            raise ValueError(f"the pose's upper 3x3 must be a rotation (orthonormal within {ROTATION_TOLERANCE:g}, "
                             "determinant +1)")
        return v


@dataclass
class IncomingFrame:
    meta: FrameMeta
    image: bytes  # encoded JPEG / PNG / WebP, not yet decoded


class FrameJson(FrameMeta):
    type: Literal["frame"]
    image: StrictStr  # base64 (a `data:image/...;base64,` prefix is accepted)


class Flush(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["flush"]


class Finalize(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["finalize"]


PingToken = Annotated[StrictInt, Field(ge=-(2**63), le=2**63)] | FiniteFloat | Annotated[
    StrictStr, Field(max_length=128)] | None


class Ping(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["ping"]
    t: PingToken = None  # echoed in the pong: small, so a ping cannot ask for a large reply


class Received(BaseModel):
    """Result flow control: the client has taken every result record up to `seq` off the socket."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["received"]
    seq: Annotated[StrictInt, Field(ge=0)]


ClientMessage = Annotated[FrameJson | Flush | Finalize | Ping | Received, Field(discriminator="type")]
_CLIENT_MESSAGE = TypeAdapter(ClientMessage)
CLIENT_TYPES = ("frame", "flush", "finalize", "ping", "received")


def _validation_message(exc: ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p) for p in err.get("loc", ())) or "message"
    return f"{loc}: {err.get('msg')}"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity would not survive a browser's JSON.parse


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # 1e400 is valid JSON syntax but overflows to inf
        raise ValueError(f"number {text[:40]} is not a finite double")
    return v


def strict_json_loads(text: str | bytes) -> Any:
    """json.loads without NaN, Infinity or numbers that overflow to inf (the strict JSON every parser of client
    input here uses). Raises ValueError (or RecursionError for absurd nesting)."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")  # never json's UTF-16/32 sniffing
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)


def _loads(raw: bytes | str) -> Any:
    try:
        return strict_json_loads(raw)
    except (ValueError, RecursionError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
        raise _bad(f"not valid UTF-8 JSON: {str(exc)[:100]}") from None


def parse_json_object(raw: bytes | str, what: str = "body") -> dict:
    """An HTTP JSON body or form field that must be an object (session params): strict JSON, empty = {}.
    Raises INVALID_PARAMS."""
    if not (raw.strip() if isinstance(raw, (bytes, str)) else raw):
        return {}
    try:
        obj = strict_json_loads(raw)
    except (ValueError, RecursionError, TypeError) as exc:
        raise ServiceError(ErrorCode.INVALID_PARAMS, f"{what} must be a JSON object of session params (strict "
                           f"JSON: no NaN or Infinity): {str(exc)[:100]}", details={"field": what}) from None
    if not isinstance(obj, dict):
        raise ServiceError(ErrorCode.INVALID_PARAMS, f"{what} must be a JSON object of session params",
                           details={"field": what})
    return obj


def _prior_error(exc: ValidationError, obj: dict, prefix: str) -> ServiceError:
    """INVALID_PRIOR (naming the frame when its id is readable) if a pose/intrinsics prior failed, else
    INVALID_MESSAGE."""
    errs = exc.errors(include_url=False, include_input=False)
    found = [(e, f) for e in errs for f in e.get("loc", ()) if f in ("pose", "intrinsics")]
    if not found:
        return _bad(f"{prefix}{_validation_message(exc)}")
    (bad, field), fid = found[0], obj.get("frame_id")
    err = ServiceError(ErrorCode.INVALID_PRIOR, f"{prefix}{'.'.join(str(p) for p in bad['loc'])}: {bad['msg']}",
                       details={"field": field})
    if (isinstance(fid, int) and not isinstance(fid, bool) and fid >= 0) or (
            isinstance(fid, str) and 0 < len(fid) <= MAX_FRAME_ID_CHARS):
        err.frame_id = fid
    return err


def parse_binary_message(data: bytes, *, max_header_bytes: int = 16384) -> IncomingFrame:
    """A binary client message: a DA3F frame (header + image) or a bare encoded image."""
    try:
        data = bytes(data)
    except Exception:  # noqa: BLE001 - not bytes-like at all
        raise _bad("binary message expected") from None
    if not data:
        raise _bad("empty binary message")
    if not data.startswith(FRAME_MAGIC):
        return IncomingFrame(FrameMeta(), data)
    if len(data) < PREFIX_BYTES:
        raise _bad(f"DA3F message shorter than its {PREFIX_BYTES}-byte prefix")
    _, version, flags, header_len = _PREFIX.unpack_from(data)
    if version != PROTOCOL_VERSION:
        raise _bad(f"unsupported DA3F version {version} (this server speaks {PROTOCOL_VERSION})")
    if flags != FRAME_FLAGS:
        raise _bad(f"DA3F flags must be {FRAME_FLAGS} (got {flags})")
    if header_len > max_header_bytes:
        raise _bad(f"frame header of {header_len} bytes exceeds {max_header_bytes}", ErrorCode.MESSAGE_TOO_LARGE)
    end = PREFIX_BYTES + header_len
    if end > len(data):
        raise _bad(f"header_len {header_len} runs past the end of the {len(data)}-byte message")
    image = data[end:]
    if not image:
        raise _bad("DA3F message carries no image bytes")
    meta = FrameMeta()
    if header_len:
        obj = _loads(data[PREFIX_BYTES:end])
        if not isinstance(obj, dict):
            raise _bad("frame header must be a JSON object")
        try:
            meta = FrameMeta.model_validate(obj)
        except ValidationError as exc:
            raise _prior_error(exc, obj, "frame header ") from None
        except Exception as exc:  # noqa: BLE001 - never leak another exception type
            raise _bad(f"frame header rejected: {type(exc).__name__}") from None
    return IncomingFrame(meta, image)


def parse_text_message(text: str | bytes, *, max_bytes: int) -> FrameJson | Flush | Finalize | Ping | Received:
    """A JSON text client message; the result's `.type` is one of CLIENT_TYPES."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        if len(raw) > max_bytes:
            raise _bad(f"text message of {len(raw)} bytes exceeds {max_bytes}", ErrorCode.MESSAGE_TOO_LARGE)
    elif isinstance(text, str):
        if len(text) > max_bytes:  # each character is at least one byte
            raise _bad(f"text message over {max_bytes} bytes", ErrorCode.MESSAGE_TOO_LARGE)
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:
            raise _bad("text message is not valid UTF-8 (lone surrogate)") from None
        if len(raw) > max_bytes:
            raise _bad(f"text message of {len(raw)} bytes exceeds {max_bytes}", ErrorCode.MESSAGE_TOO_LARGE)
    else:
        raise _bad("text message expected")
    obj = _loads(raw)
    if not isinstance(obj, dict):
        raise _bad("message must be a JSON object with a 'type'")
    kind = obj.get("type")
    if kind not in CLIENT_TYPES:
        raise _bad(f"unknown message type {str(kind)[:40]!r}; expected one of {', '.join(CLIENT_TYPES)}")
    try:
        return _CLIENT_MESSAGE.validate_python(obj)
    except ValidationError as exc:
        if kind == "frame":
            raise _prior_error(exc, obj, "frame message ") from None
        raise _bad(f"{kind} message {_validation_message(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise _bad(f"{kind} message rejected: {type(exc).__name__}") from None


def frame_from_json(msg: FrameJson) -> IncomingFrame:
    """Decode the base64 image of a JSON frame message."""
    b64 = msg.image
    if b64.startswith("data:"):
        b64 = b64.partition(",")[2]
    try:
        image = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("frame.image is not valid base64") from None
    if not image:
        raise _bad("frame.image is empty")
    return IncomingFrame(FrameMeta.model_validate(msg.model_dump(exclude={"type", "image"})), image)


def _meta_dict(meta: dict | FrameMeta | None) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, FrameMeta):
        meta = FrameMeta.model_validate(meta)
    return meta.model_dump(exclude_none=True)


def encode_frame_message(image: bytes, meta: dict | FrameMeta | None = None) -> bytes:
    """Client side: a DA3F binary frame message (meta is validated, so a bad one fails here, not on the server)."""
    if not image:
        raise ValueError("image bytes are empty")
    header = json.dumps(_meta_dict(meta), separators=(",", ":")).encode() if meta else b""
    if header == b"{}":
        header = b""
    return _PREFIX.pack(FRAME_MAGIC, PROTOCOL_VERSION, FRAME_FLAGS, len(header)) + header + bytes(image)


# --- server -> client: points --------------------------------------------------------------------------------
@dataclass
class PointChunk:
    seq: int
    window: int
    frame_ids: list
    points: np.ndarray  # (M, 3) float32 world coordinates
    colors: np.ndarray  # (M, 3) uint8 RGB
    encoding: int  # ENC_FLOAT16 or ENC_FLOAT32
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def count(self) -> int:
        return int(self.points.shape[0])


@dataclass(frozen=True)
class PointBody:
    """A DA3P message's positions and colours, encoded once; `frame_points` adds the header (which carries the
    record's seq), so the body can be encoded before the seq is known."""

    requested: str | int  # the encoding asked for; `encoding` is what was used (float16 may fall back)
    encoding: int
    origin: tuple[float, float, float]
    count: int
    data: bytes


def encode_point_body(points: np.ndarray, colors: np.ndarray, encoding: str | int = "float16") -> PointBody:
    """Positions relative to `origin` (the chunk's mean); a float16 chunk whose offsets would overflow float16
    is sent as float32 (the encoding byte says which)."""
    enc = ENCODINGS.get(encoding, encoding) if isinstance(encoding, str) else int(encoding)
    if enc not in _ENC_DTYPE:
        raise ValueError(f"unknown point encoding {encoding!r}")
    pts = np.asarray(points, np.float32).reshape(-1, 3)
    cols = np.asarray(colors, np.uint8).reshape(-1, 3)
    if len(pts) != len(cols):
        raise ValueError(f"{len(pts)} points but {len(cols)} colours")
    origin = np.zeros(3, np.float32)
    if len(pts):
        finite = np.isfinite(pts).all(axis=1)
        if finite.any():
            origin = pts[finite].mean(axis=0, dtype=np.float64).astype(np.float32)
    offsets = pts - origin
    if enc == ENC_FLOAT16 and len(pts) and not (np.abs(offsets) <= _F16_MAX).all():
        enc = ENC_FLOAT32
    return PointBody(encoding, enc, tuple(float(v) for v in origin), len(pts),
                     offsets.astype(_ENC_DTYPE[enc]).tobytes() + cols.tobytes())


def frame_points(body: PointBody, *, seq: int, window: int, frame_ids: list) -> bytes:
    """The DA3P message: prefix, JSON header, then the body."""
    header = json.dumps({"seq": int(seq), "window": int(window), "frame_ids": list(frame_ids),
                         "count": body.count, "origin": list(body.origin)}, separators=(",", ":")).encode()
    header += b" " * (-(PREFIX_BYTES + len(header)) % POINTS_ALIGN)  # typed arrays in browsers need 4-byte alignment
    return b"".join((_PREFIX.pack(POINTS_MAGIC, PROTOCOL_VERSION, body.encoding, len(header)), header, body.data))


def encode_points(points: np.ndarray, colors: np.ndarray, *, seq: int, window: int, frame_ids: list,
                  encoding: str | int = "float16") -> bytes:
    """A DA3P binary points message (docs/WEBSOCKET_API.md)."""
    return frame_points(encode_point_body(points, colors, encoding), seq=seq, window=window, frame_ids=frame_ids)


def decode_points(data: bytes) -> PointChunk:
    """Parse a DA3P message; raises ServiceError(INVALID_MESSAGE) when it is malformed."""
    data = bytes(data)
    if len(data) < PREFIX_BYTES or not data.startswith(POINTS_MAGIC):
        raise _bad("not a DA3P points message")
    _, version, enc, header_len = _PREFIX.unpack_from(data)
    if version != PROTOCOL_VERSION or enc not in _ENC_DTYPE:
        raise _bad(f"unsupported DA3P version {version} / encoding {enc}")
    start = PREFIX_BYTES + header_len
    if start > len(data):
        raise _bad("DA3P header_len runs past the message")
    header = _loads(data[PREFIX_BYTES:start])
    count = header.get("count") if isinstance(header, dict) else None
    origin = header.get("origin", [0, 0, 0]) if isinstance(header, dict) else None
    if (not isinstance(count, int) or isinstance(count, bool) or count < 0 or not isinstance(origin, list)
            or len(origin) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in origin)):
        raise _bad("DA3P header needs an integer count >= 0 and a 3-element origin")
    dt = _ENC_DTYPE[enc]
    pos_bytes = count * 3 * dt.itemsize
    if len(data) != start + pos_bytes + count * 3:
        raise _bad(f"DA3P body is {len(data) - start} bytes, expected {pos_bytes + count * 3} for {count} points")
    offsets = np.frombuffer(data, dt, count * 3, start).reshape(count, 3)
    org = np.asarray(origin, np.float32)
    points = (offsets.astype(np.float32) + org).astype(np.float32)
    colors = np.frombuffer(data, np.uint8, count * 3, start + pos_bytes).reshape(count, 3).copy()
    return PointChunk(seq=int(header.get("seq", 0)), window=int(header.get("window", 0)),
                      frame_ids=list(header.get("frame_ids", [])), points=points, colors=colors, encoding=enc,
                      origin=tuple(float(v) for v in org))


# --- server -> client: JSON messages (the models are in serve_app/protocol/messages.py) ------------------------
def msg_ready(**fields: Any) -> dict:
    return M.Ready(**fields).wire()


def msg_ack(frame_id: Any, index: int, *, in_flight: int, max_in_flight: int) -> dict:
    return M.Ack.of(frame_id, index, in_flight=in_flight, max_in_flight=max_in_flight).wire()


def msg_error(code: ErrorCode | str, message: str, fatal: bool = False, frame_id: Any = None,
              details: dict | None = None) -> dict:
    return M.Error.of(code, message, fatal, frame_id, details).wire()


def msg_progress(**fields: Any) -> dict:
    return M.Progress(**fields).wire()


def msg_window(seq: int, body: dict) -> dict:
    return M.Window.of(body, seq).wire()


def msg_frame_result(seq: int, body: dict) -> dict:
    return M.FrameResult.of(body, seq).wire()


def export_paths(session_id: str) -> dict:
    return M.ExportPaths.of(session_id).model_dump()


def msg_summary(session_id: str, **fields: Any) -> dict:
    return M.Summary(exports=M.ExportPaths.of(session_id), **fields).wire()


def msg_pong(t: Any) -> dict:
    return M.Pong.of(t).wire()
