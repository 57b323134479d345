"""Admission for expensive HTTP work (map exports): a cap on how many run at once. Plain Python, no FastAPI/Ray.

The ingress is one event loop, so a counter is enough; a request over the cap is answered at once with
EXPORT_BUSY and a retry hint rather than queued (queued exports would hold their maps in memory meanwhile).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from serve_app.errors import ErrorCode, ServiceError


class ConcurrencyGate:
    def __init__(self, limit: int, retry_after_s: float = 1.0, what: str = "exports"):
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.what = what
        self.running = 0
        self.refused = 0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of `limit` slots for the block; raises EXPORT_BUSY (details.retry_after_s) when none is free."""
        if self.running >= self.limit:
            self.refused += 1
            raise ServiceError(ErrorCode.EXPORT_BUSY, f"{self.running} {self.what} running (limit {self.limit}); "
                               f"retry in {self.retry_after_s:g}s", details={"retry_after_s": self.retry_after_s})
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
