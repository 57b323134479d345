"""A blocking call (Serve's controller status) made off the event loop and reused for a while."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ray.serve.da3.status")


class CachedCall:
    """`await get()` runs `fn` in a thread at most once per `ttl_s` (callers meanwhile share the running call)
    and gives up waiting after `timeout_s`, answering the last value (or `default`). The loop never blocks."""

    def __init__(self, fn: Callable[[], Any], ttl_s: float, timeout_s: float = 5.0, default: Any = None):
        self.fn = fn
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.value = default
        self.stamp = float("-inf")
        self.calls = 0
        self._running: asyncio.Future | None = None

    async def get(self) -> Any:
        if time.monotonic() - self.stamp < self.ttl_s:
            return self.value
        if self._running is None or self._running.done():
            self.calls += 1
            self._running = asyncio.ensure_future(asyncio.to_thread(self.fn))
        try:
            self.value = await asyncio.wait_for(asyncio.shield(self._running), self.timeout_s)
            self.stamp = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - slow or failing controller: the last value is still useful
            log.warning("%s: %s (answering the last value)", getattr(self.fn, "__name__", "call"), repr(exc))
        return self.value
