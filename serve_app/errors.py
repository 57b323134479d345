"""Stable error codes shared by HTTP routes, the WebSocket protocol and the clients.

POLICY below is the one declaration of what each code means on each transport; docs/WEBSOCKET_API.md's tables
and the clients' constants are generated from it (`make protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class ErrorCode(str, Enum):
    INVALID_MESSAGE = "INVALID_MESSAGE"  # unparsable / unknown / malformed client message
    MESSAGE_TOO_LARGE = "MESSAGE_TOO_LARGE"  # message over the configured byte limit
    INVALID_IMAGE = "INVALID_IMAGE"  # bytes that do not decode to an image
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"  # image format not in the allowed list
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"  # image bytes over max_image_bytes
    TOO_MANY_PIXELS = "TOO_MANY_PIXELS"  # declared or decoded pixels over max_image_pixels (decompression bombs)
    INVALID_PARAMS = "INVALID_PARAMS"  # session parameters rejected
    QUEUE_FULL = "QUEUE_FULL"  # client sent more frames than the advertised in-flight window
    FRAME_LIMIT_EXCEEDED = "FRAME_LIMIT_EXCEEDED"  # session's max_frames reached
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    SESSION_EXPIRED = "SESSION_EXPIRED"
    SESSION_LOST = "SESSION_LOST"  # the session store restarted without this session's state
    SESSION_FINALIZED = "SESSION_FINALIZED"  # frames after finalize
    SESSION_LIMIT = "SESSION_LIMIT"  # the server is at max_sessions
    KEY_SESSION_LIMIT = "KEY_SESSION_LIMIT"  # this API key is at max_sessions_per_key
    SESSION_BUSY = "SESSION_BUSY"  # another connection holds the session
    ALIGNMENT_FAILED = "ALIGNMENT_FAILED"  # a window could not be placed in the world (map left untouched)
    MODEL_UNAVAILABLE = "MODEL_UNAVAILABLE"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"  # operator route without an operator key; Host, client address or Origin refused
    RATE_LIMITED = "RATE_LIMITED"  # session creations per key per minute
    FRAME_RATE_LIMITED = "FRAME_RATE_LIMITED"  # frames per second of one session
    BYTE_RATE_LIMITED = "BYTE_RATE_LIMITED"  # upload bytes per second of one session
    SLOW_CONSUMER = "SLOW_CONSUMER"  # results unacknowledged past the byte limit for slow_reader_timeout_s
    DECODE_BUDGET_EXCEEDED = "DECODE_BUDGET_EXCEEDED"  # the session's image-decode CPU budget is spent for now
    VIDEO_TOO_LARGE = "VIDEO_TOO_LARGE"  # a video decodes to more bytes or takes longer than the limits allow
    INVALID_PRIOR = "INVALID_PRIOR"  # a frame's pose/intrinsics prior is unusable (non-finite in float32, no rotation)
    TOO_MANY_ERRORS = "TOO_MANY_ERRORS"  # max_protocol_errors malformed messages on one WebSocket: closed (4400)
    IDLE_TIMEOUT = "IDLE_TIMEOUT"  # WebSocket without work for ws_idle_timeout_s: closed (4420)
    EXPORT_BUSY = "EXPORT_BUSY"  # max_concurrent_exports running: retry after details.retry_after_s
    INTERNAL_ERROR = "INTERNAL_ERROR"


@dataclass(frozen=True)
class Policy:
    """How one code behaves on each transport. The one declaration: `python -m serve_app.protocol.codegen` writes
    the clients' tables and docs/WEBSOCKET_API.md's from it (tests/protocol/test_protocol_codegen.py checks they match)."""

    http: int  # status when an HTTP route returns it
    meaning: str  # the docs' sentence
    close: int | None = None  # WebSocket close code when it ends a stream
    fatal: str = "no"  # on a stream: "yes", "no", "-" (never sent on a stream) or a sentence
    per_frame: bool = False  # answers one frame message, which was not accepted (carries its frame_id)
    resend: bool = False  # the frame was refused for now: clients send it again
    retry_after: bool = False  # carries details.retry_after_s
    no_more_frames: bool = False  # the session takes no more frames
    protocol_error: bool = False  # a client mistake: counts towards limits.max_protocol_errors
    reconnect: bool = False  # a handshake refusal worth retrying while reconnecting
    close_meaning: str = ""  # the close-code table's text (codes with `close`)
    close_action: str = "stop"


_C = ErrorCode
POLICY: dict[ErrorCode, Policy] = {
    _C.INVALID_MESSAGE: Policy(
        400, "unparsable, unknown or malformed client message (bad DA3F header, JSON, type, field)",
        per_frame=True, protocol_error=True),
    _C.MESSAGE_TOO_LARGE: Policy(
        413, "the message or the frame header is over the byte limit", per_frame=True, protocol_error=True),
    _C.INVALID_IMAGE: Policy(
        400, "the bytes do not decode to an image (empty, truncated, corrupt)", per_frame=True, protocol_error=True),
    _C.UNSUPPORTED_FORMAT: Policy(
        415, "the image format is not in `allowed_formats` (default JPEG, PNG, WEBP), e.g. BMP or GIF, or its bit "
        "depth is over `max_image_bit_depth`; on the one-shot route, a file sent as a video whose bytes are no "
        "supported container", per_frame=True, protocol_error=True),
    _C.IMAGE_TOO_LARGE: Policy(
        413, "the image is over `max_image_bytes`, or would decode to more than `max_image_decoded_bytes` (from the "
        "header, then checked on the result)", per_frame=True, protocol_error=True),
    _C.TOO_MANY_PIXELS: Policy(
        413, "the image (or video) header declares more than `max_image_pixels`, checked before decoding "
        "(decompression bombs); for a video, also any decoded frame over it, whatever its header said",
        per_frame=True, protocol_error=True),
    _C.INVALID_PARAMS: Policy(422, "session parameters rejected; the message names the field", fatal="-"),
    _C.QUEUE_FULL: Policy(
        429, "the frame arrived while `in_flight >= max_in_flight`; send it again after results arrive",
        per_frame=True, resend=True),
    _C.FRAME_LIMIT_EXCEEDED: Policy(
        409, "the session has reached `max_frames`; later frames are rejected", per_frame=True, no_more_frames=True),
    _C.SESSION_NOT_FOUND: Policy(
        404, "no such session (or not yours)", close=4404, fatal="yes", close_meaning="session not found"),
    _C.SESSION_EXPIRED: Policy(
        410, "the session reached `idle_ttl_s` or `ttl_s`", close=4410, fatal="yes",
        close_meaning="session expired"),
    _C.SESSION_LOST: Policy(
        410, "the session store restarted and had no journal for this session", close=4412, fatal="yes",
        close_meaning="session lost: the session store restarted without a journal (`session_actor.state_dir`)",
        close_action="start a new session"),
    _C.SESSION_FINALIZED: Policy(
        409, "a frame arrived after `finalize`", per_frame=True, no_more_frames=True),
    _C.SESSION_LIMIT: Policy(429, "the server has `max_sessions` open sessions", fatal="-"),
    _C.KEY_SESSION_LIMIT: Policy(
        429, "this API key has `max_sessions_per_key` open sessions (default `max_sessions // 8`; keys only: with "
        "auth `none`, `max_sessions` is the limit)", fatal="-"),
    _C.SESSION_BUSY: Policy(
        409, "another connection took the session over (or, on a frame, another server replica did, or the frame's "
        "index is out of step with the session store)", close=4409, fatal="yes", reconnect=True,
        close_meaning="session busy: another live connection holds it",
        close_action="stop (or reconnect if that connection was your own stale one)"),
    _C.ALIGNMENT_FAILED: Policy(
        422, "a window could not be placed in the world; the map is left untouched and its frames report "
        "`pose: null`"),
    _C.MODEL_UNAVAILABLE: Policy(
        503, "model calls failed after retries", close=4503, fatal="no for one window, yes when the stream stops",
        reconnect=True, close_meaning="model unavailable", close_action="retry later"),
    _C.UNAUTHORIZED: Policy(
        401, "missing or invalid API key", close=4401, fatal="yes", close_meaning="unauthorized"),
    _C.FORBIDDEN: Policy(
        403, "an operator route without an operator key; a `Host` header, client address or WebSocket `Origin` the "
        "server does not take (`details.reason`: `operator`, `host`, `remote_client`, `origin`)", close=4403,
        fatal="yes", close_meaning="forbidden: Host, client address or Origin refused (section 1)"),
    _C.RATE_LIMITED: Policy(
        429, "over `sessions_per_minute` session creations for this key; `details.retry_after_s`", close=4429,
        fatal="-", retry_after=True, close_meaning="rate limited", close_action="retry later"),
    _C.FRAME_RATE_LIMITED: Policy(
        429, "the session is over `frames_per_s` (burst 2x); the frame is not accepted; `details.retry_after_s`",
        per_frame=True, resend=True, retry_after=True),
    _C.BYTE_RATE_LIMITED: Policy(
        429, "the session is over `bytes_per_s` of uploads (burst 2x); the frame is not accepted; "
        "`details.retry_after_s`", per_frame=True, resend=True, retry_after=True),
    _C.SLOW_CONSUMER: Policy(
        429, "results unacknowledged past `max_unacked_result_bytes` for `slow_reader_timeout_s`, or other messages "
        "unacknowledged past `max_unacked_result_bytes` (3.7)", close=4408, fatal="yes",
        close_meaning="slow consumer: results unacknowledged past the limit (3.7)",
        close_action="reconnect with `resume_from` and send `received`"),
    _C.DECODE_BUDGET_EXCEEDED: Policy(
        429, "the session spent its image decode CPU (`decode_cpu_s_per_s`, burst `decode_cpu_burst_s`): costly "
        "images (large, 16-bit) are refused until it refills; the frame is not accepted; `details.retry_after_s`. "
        "The one-shot route waits instead", per_frame=True, resend=True, retry_after=True),
    _C.VIDEO_TOO_LARGE: Policy(
        413, "one-shot route: a video decodes to more than `max_video_decoded_bytes` or takes more than "
        "`max_video_decode_s` to decode", fatal="-"),
    _C.INVALID_PRIOR: Policy(
        422, "a frame's `pose` or `intrinsics` prior is unusable as float32 or not a rotation (3.2); carries "
        "`frame_id` and `details.field`", per_frame=True, protocol_error=True),
    _C.TOO_MANY_ERRORS: Policy(
        400, "`max_protocol_errors` malformed messages on one connection (3.3)", close=4400, fatal="yes",
        close_meaning="too many errors: `limits.max_protocol_errors` malformed messages on this connection (3.3)",
        close_action="fix the client; a new connection starts from zero"),
    _C.IDLE_TIMEOUT: Policy(
        408, "no frames for `ws_idle_timeout_s` and nothing in flight (3.3)", close=4420, fatal="yes",
        close_meaning="idle timeout: no frames for `limits.ws_idle_timeout_s` and nothing in flight (3.3)",
        close_action="reconnect when there is something to send"),
    _C.EXPORT_BUSY: Policy(
        503, "`max_concurrent_exports` PLY/GLB exports are running on this replica; `details.retry_after_s` and a "
        "`Retry-After` header", fatal="-", retry_after=True),
    _C.INTERNAL_ERROR: Policy(
        500, "server bug or a failed internal component; with `fatal:false`, placing one window raised: its frames "
        "fail as with `ALIGNMENT_FAILED` and the stream goes on", close=4500, fatal="yes (no for one window)",
        reconnect=True, close_meaning="internal error", close_action="stop, or reconnect once"),
}
del _C

# HTTP status for each code when it is returned by an HTTP route; WebSocket close code (4000-4999 are
# application-defined) when it ends a stream. Both from POLICY.
HTTP_STATUS: dict[ErrorCode, int] = {code: p.http for code, p in POLICY.items()}
WS_CLOSE: dict[ErrorCode, int] = {code: p.close for code, p in POLICY.items() if p.close is not None}
WS_CLOSE_NORMAL = 1000  # finalized or deleted by the client
WS_CLOSE_GOING_AWAY = 1001  # server going away: clients reconnect
WS_CLOSE_SERVICE_RESTART = 1012  # this replica is draining (redeploy, downscale): clients reconnect
WS_CLOSE_SESSION_DELETED = 4000  # deleted through DELETE /ws/session/{id}


@dataclass(frozen=True)
class Close:
    """A close code that is not an error code's (those are in POLICY)."""

    code: int
    name: str
    meaning: str
    action: str
    reconnect: bool = False  # reconnecting with resume_from can help


OTHER_CLOSES: tuple[Close, ...] = (
    Close(WS_CLOSE_NORMAL, "NORMAL", "finalized (after `summary`) or normal close", "done"),
    Close(WS_CLOSE_GOING_AWAY, "GOING_AWAY", "server going away", "reconnect with `resume_from`", True),
    Close(1005, "NO_STATUS", "closed without a status code", "reconnect with `resume_from`", True),
    Close(1006, "ABNORMAL", "abnormal drop (no close frame)", "reconnect with `resume_from`", True),
    Close(1011, "SERVER_ERROR", "unexpected server condition (sent by proxies and WebSocket servers)",
          "reconnect with `resume_from`", True),
    Close(WS_CLOSE_SERVICE_RESTART, "SERVICE_RESTART",
          "service restart: this server replica is being drained (redeploy, downscale), or the session store "
          "failed a call (its actor restarting, its node lost)",
          "reconnect with `resume_from`", True),
    Close(1013, "TRY_AGAIN_LATER", "try again later (sent by proxies)", "reconnect with `resume_from`", True),
    Close(1014, "BAD_GATEWAY", "bad gateway (sent by proxies)", "reconnect with `resume_from`", True),
    Close(WS_CLOSE_SESSION_DELETED, "SESSION_DELETED", "session deleted (`DELETE /ws/session/{id}`)", "stop"),
)


def close_table() -> list[Close]:
    """Every close code of the protocol, by number: OTHER_CLOSES and the error codes' (named by their code)."""
    rows = list(OTHER_CLOSES) + [Close(p.close, code.value, p.close_meaning or code.value, p.close_action)
                                 for code, p in POLICY.items() if p.close is not None]
    return sorted(rows, key=lambda c: c.code)


def codes_where(flag: str) -> frozenset[ErrorCode]:
    """The codes whose Policy has `flag` set (e.g. "per_frame", "resend")."""
    return frozenset(code for code, p in POLICY.items() if getattr(p, flag))


class ServiceError(Exception):
    """An error with a stable code; `fatal` means the stream cannot continue."""

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool = False, details: dict | None = None):
        super().__init__(f"{code.value}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.fatal = fatal
        self.details = details or {}

    def __reduce__(self):
        # Survives Ray's pickling across actors/replicas with its code intact.
        return (_rebuild_service_error, (self.code.value, self.message, self.fatal, self.details))

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)

    def to_dict(self) -> dict:
        body = {"code": self.code.value, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


def _rebuild_service_error(code: str, message: str, fatal: bool, details: dict) -> ServiceError:
    return ServiceError(ErrorCode(code), message, fatal=fatal, details=details)
