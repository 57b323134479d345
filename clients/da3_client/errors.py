"""The client's one exception type, carrying the server's stable error code."""

from __future__ import annotations

from typing import Any

# WebSocket close codes of the protocol (docs/WEBSOCKET_API.md, "Close codes").
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_SESSION_DELETED = 4000
CLOSE_CODES: dict[int, str] = {
    4000: "SESSION_DELETED",
    4400: "TOO_MANY_ERRORS",
    4401: "UNAUTHORIZED",
    4403: "FORBIDDEN",
    4404: "SESSION_NOT_FOUND",
    4408: "SLOW_CONSUMER",
    4409: "SESSION_BUSY",
    4410: "SESSION_EXPIRED",
    4412: "SESSION_LOST",
    4420: "IDLE_TIMEOUT",
    4429: "RATE_LIMITED",
    4500: "INTERNAL_ERROR",
    4503: "MODEL_UNAVAILABLE",
}
# Closes after which reconnecting with resume_from can help (going away, abnormal, restart, try again later).
RETRYABLE_CLOSES = {1001, 1005, 1006, 1011, 1012, 1013, 1014}


class Da3Error(Exception):
    """An error reported by da3-serve (or by this client on its behalf).

    code:    the server's stable code (e.g. "SESSION_NOT_FOUND", "QUEUE_FULL"), or a client-side one
             ("CONNECTION_ERROR", "TIMEOUT", "PROTOCOL_ERROR", "HTTP_<status>")
    status:  HTTP status for HTTP calls, WebSocket close code for stream closes, else None
    fatal:   the stream cannot continue
    """

    def __init__(self, code: str, message: str, status: int | None = None, *, fatal: bool = True,
                 details: dict[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.fatal = fatal
        self.details = details or {}
