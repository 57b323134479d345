"""Stable error codes shared by HTTP routes, the WebSocket protocol and the clients.

docs/WEBSOCKET_API.md lists each code with its meaning; keep the two in step.
"""

from __future__ import annotations

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


# HTTP status for each code when it is returned by an HTTP route.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_MESSAGE: 400,
    ErrorCode.MESSAGE_TOO_LARGE: 413,
    ErrorCode.INVALID_IMAGE: 400,
    ErrorCode.UNSUPPORTED_FORMAT: 415,
    ErrorCode.IMAGE_TOO_LARGE: 413,
    ErrorCode.TOO_MANY_PIXELS: 413,
    ErrorCode.INVALID_PARAMS: 422,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.FRAME_LIMIT_EXCEEDED: 409,
    ErrorCode.SESSION_NOT_FOUND: 404,
    ErrorCode.SESSION_EXPIRED: 410,
    ErrorCode.SESSION_LOST: 410,
    ErrorCode.SESSION_FINALIZED: 409,
    ErrorCode.SESSION_LIMIT: 429,
    ErrorCode.KEY_SESSION_LIMIT: 429,
    ErrorCode.SESSION_BUSY: 409,
    ErrorCode.ALIGNMENT_FAILED: 422,
    ErrorCode.MODEL_UNAVAILABLE: 503,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.FRAME_RATE_LIMITED: 429,
    ErrorCode.BYTE_RATE_LIMITED: 429,
    ErrorCode.SLOW_CONSUMER: 429,
    ErrorCode.DECODE_BUDGET_EXCEEDED: 429,
    ErrorCode.VIDEO_TOO_LARGE: 413,
    ErrorCode.INVALID_PRIOR: 422,
    ErrorCode.TOO_MANY_ERRORS: 400,
    ErrorCode.IDLE_TIMEOUT: 408,
    ErrorCode.EXPORT_BUSY: 503,
    ErrorCode.INTERNAL_ERROR: 500,
}

# WebSocket close codes (4000-4999 are application-defined).
WS_CLOSE: dict[ErrorCode, int] = {
    ErrorCode.UNAUTHORIZED: 4401,
    ErrorCode.FORBIDDEN: 4403,
    ErrorCode.SESSION_NOT_FOUND: 4404,
    ErrorCode.SESSION_EXPIRED: 4410,
    ErrorCode.SESSION_LOST: 4412,
    ErrorCode.SESSION_BUSY: 4409,
    ErrorCode.RATE_LIMITED: 4429,
    ErrorCode.SLOW_CONSUMER: 4408,
    ErrorCode.INTERNAL_ERROR: 4500,
    ErrorCode.MODEL_UNAVAILABLE: 4503,
    ErrorCode.TOO_MANY_ERRORS: 4400,
    ErrorCode.IDLE_TIMEOUT: 4420,
}
WS_CLOSE_NORMAL = 1000  # finalized or deleted by the client
WS_CLOSE_GOING_AWAY = 1001  # server going away: clients reconnect
WS_CLOSE_SERVICE_RESTART = 1012  # this replica is draining (redeploy, downscale): clients reconnect
WS_CLOSE_SESSION_DELETED = 4000  # deleted through DELETE /ws/session/{id}


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
