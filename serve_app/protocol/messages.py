"""Every server -> client JSON message of the WebSocket protocol (docs/WEBSOCKET_API.md 3.4-3.5), one model each,
and the `GET /ws/sessions` reply. The code that sends a message builds its model; `wire()` is the JSON object.

The wire form is the fields that were set, in declaration order (an optional field left out is not sent), with
`type` first; extra keys (the docs say "more keys may be added") follow in the order given. Numbers keep their
Python type (an int is not turned into 1.0), so the bytes are what `json.dumps` of the old dicts gave.
"""

from __future__ import annotations

import json
import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr

from serve_app.errors import ErrorCode
from serve_app.protocol.framing import PROTOCOL_VERSION

Number = StrictInt | StrictFloat  # kept as sent: the union picks the exact type
FrameId = StrictInt | StrictStr
Matrix = list[list[Number]]


class ServerMessage(BaseModel):
    """A JSON message the server sends on a stream."""

    model_config = ConfigDict(extra="forbid")
    TYPE: ClassVar[str]

    def wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, **self.model_dump(exclude_unset=True, exclude={"type"})}

    def json_text(self) -> str:
        return json.dumps(self.wire(), separators=(",", ":"))


class Ready(ServerMessage):
    """First message of every stream (3.1)."""

    TYPE: ClassVar[str] = "ready"
    type: Literal["ready"] = "ready"
    protocol: StrictInt = PROTOCOL_VERSION
    session_id: StrictStr
    params: dict[str, Any]
    state: StrictStr
    frames_received: StrictInt
    frames_processed: StrictInt
    points_total: StrictInt
    last_seq: StrictInt
    max_in_flight: StrictInt
    in_flight: StrictInt

    def wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, **self.model_dump(exclude={"type"})}  # protocol always goes out


class Ack(ServerMessage):
    """One per accepted frame (3.4)."""

    TYPE: ClassVar[str] = "ack"
    type: Literal["ack"] = "ack"
    frame_id: Any
    index: StrictInt
    frames_received: StrictInt
    in_flight: StrictInt
    max_in_flight: StrictInt

    @classmethod
    def of(cls, frame_id: Any, index: int, *, in_flight: int, max_in_flight: int) -> Ack:
        return cls(frame_id=frame_id, index=index, frames_received=index + 1, in_flight=in_flight,
                   max_in_flight=max_in_flight)


class Error(ServerMessage):
    """An error on a stream (3.4; codes and their policy: serve_app/errors.py POLICY)."""

    TYPE: ClassVar[str] = "error"
    type: Literal["error"] = "error"
    code: StrictStr
    message: StrictStr
    fatal: StrictBool
    frame_id: Any = None  # sent only when the error answers a frame that had one
    details: dict[str, Any] | None = None  # sent only when non-empty

    @classmethod
    def of(cls, code: Any, message: str, fatal: bool = False, frame_id: Any = None,
           details: dict | None = None) -> Error:
        kw: dict[str, Any] = {}
        if frame_id is not None:
            kw["frame_id"] = frame_id
        if details:
            kw["details"] = details
        return cls(code=ErrorCode(code).value, message=message, fatal=bool(fatal), **kw)


class Progress(ServerMessage):
    """Sent when a window starts inference (3.4); may carry more fields."""

    model_config = ConfigDict(extra="allow")
    TYPE: ClassVar[str] = "progress"
    type: Literal["progress"] = "progress"
    stage: StrictStr | None = None
    window: StrictInt | None = None
    frames_received: StrictInt
    frames_processed: StrictInt
    in_flight: StrictInt
    windows_pending: StrictInt


class Pong(ServerMessage):
    """The answer to a ping (3.3)."""

    TYPE: ClassVar[str] = "pong"
    type: Literal["pong"] = "pong"
    t: Any
    server_time: StrictFloat

    @classmethod
    def of(cls, t: Any) -> Pong:
        return cls(t=t, server_time=time.time())


class ExportPaths(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ply: StrictStr
    glb: StrictStr
    trajectory: StrictStr
    tum: StrictStr

    @classmethod
    def of(cls, session_id: str) -> ExportPaths:
        base = f"/ws/session/{session_id}"
        return cls(ply=f"{base}/reconstruction.ply", glb=f"{base}/reconstruction.glb",
                   trajectory=f"{base}/trajectory.json", tum=f"{base}/trajectory.txt")


class Summary(ServerMessage):
    """The last message after `finalize` (3.4)."""

    model_config = ConfigDict(extra="allow")
    TYPE: ClassVar[str] = "summary"
    type: Literal["summary"] = "summary"
    state: StrictStr | None = None
    frames_received: StrictInt
    frames_processed: StrictInt
    frames_failed: StrictInt | None = None
    points_total: StrictInt
    windows: StrictInt
    duration_s: Number
    exports: ExportPaths


class RecordMessage(ServerMessage):
    """A record message: the record's `seq` goes last, after any extra key (the body is built before the seq)."""

    def wire(self) -> dict[str, Any]:
        d = super().wire()
        d["seq"] = d.pop("seq")
        return d


class Window(RecordMessage):
    """A result record's first message (3.5); the body comes from the reconstruction, `seq` is added last."""

    model_config = ConfigDict(extra="allow")
    TYPE: ClassVar[str] = "window"
    type: Literal["window"] = "window"
    window: StrictInt
    frame_ids: list[FrameId] | None = None
    context_frame_ids: list[FrameId] | None = None
    alignment: dict[str, Any] | None = None
    keyframes: StrictInt | None = None
    timings_ms: dict[str, Any] | None = None
    server_time: Number | None = None
    batch_size: StrictInt | None = None
    seq: StrictInt

    @classmethod
    def of(cls, body: dict, seq: int | None = None) -> Window:
        return cls.model_validate(body if seq is None else {**body, "seq": seq})


class FrameResult(RecordMessage):
    """One per new frame of a result record (3.5)."""

    model_config = ConfigDict(extra="allow")
    TYPE: ClassVar[str] = "frame_result"
    type: Literal["frame_result"] = "frame_result"
    frame_id: Any
    index: StrictInt
    window: StrictInt | None = None
    timestamp: Number | None = None
    pose: Matrix | None = None
    intrinsics: Matrix | None = None
    image_size: list[StrictInt] | None = None
    original_size: list[StrictInt] | None = None
    depth: dict[str, Any] | None = None
    points_added: StrictInt | None = None
    keyframe: StrictBool | None = None
    latency_ms: Number | None = None
    failed: StrictBool | None = None
    seq: StrictInt

    @classmethod
    def of(cls, body: dict, seq: int | None = None) -> FrameResult:
        return cls.model_validate(body if seq is None else {**body, "seq": seq})


class Correction(ServerMessage):
    """A correction record (3.5.1): absolute per-window Sim(3) rows [window, s, qx, qy, qz, qw, tx, ty, tz]."""

    model_config = ConfigDict(extra="allow")
    TYPE: ClassVar[str] = "correction"
    type: Literal["correction"] = "correction"
    seq: StrictInt
    version: StrictInt
    transforms: list[list[Number]]


SERVER_MESSAGES: tuple[type[ServerMessage], ...] = (Ready, Ack, Error, Progress, Pong, Summary, Window, FrameResult,
                                                    Correction)


class SessionList(BaseModel):
    """`GET /ws/sessions`: the caller's sessions, their count by state (`total` and one per state) and the
    server's session limit; operators also get `ray_env` and, with several store shards, `shards`."""

    model_config = ConfigDict(extra="forbid")
    sessions: list[dict[str, Any]]
    counts: dict[str, StrictInt]
    limits: dict[str, Any]
    ray_env: dict[str, Any] | None = None  # operators only
    shards: list[StrictInt] | None = None  # operators only, with more than one shard

    def wire(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


OPERATOR_ONLY_LIST_FIELDS = ("ray_env", "shards")


def correction_text(message: dict) -> str:
    """A stored correction record's message as sent (validated; run it in a pool: 1,000 windows take ms)."""
    return Correction.model_validate(message).json_text()
