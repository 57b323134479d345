"""The client's one exception type, carrying the server's stable error code."""

from __future__ import annotations

from typing import Any

# WebSocket close codes of the protocol (docs/WEBSOCKET_API.md 3.9), generated from the server's declaration.
from da3_client._protocol import (  # noqa: F401 - the client's names for them
    CLOSE_CODES,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_SESSION_DELETED,
    RETRYABLE_CLOSES,
)


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
