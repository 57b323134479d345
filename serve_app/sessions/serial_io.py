"""Blocking work (file writes, encoding) off an asyncio loop, in order per key.

The session store's actor serves every session of its shard from one event loop: a journal write or the
encoding of a large record done on that loop stalls every other session's calls (acks, long-polls). A
`SerialRunner` runs such work on a small thread pool instead. Calls with the same key (a session id) run one at
a time, in the order they were made, so a session's writes land in the order its calls happened (a later
metadata file never lands before the frame it counts); different keys run in parallel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class SerialRunner:
    def __init__(self, threads: int = 4, name: str = "da3-store-io"):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        # key -> the last call queued for it (asyncio.Lock is FIFO: waiters acquire in the order they asked)
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    async def run(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a pool thread, after every earlier call for `key` has finished."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                fut = asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
                try:
                    return await asyncio.shield(fut)
                except asyncio.CancelledError:
                    # the caller went away, the thread did not: the next call for this key waits for it
                    await asyncio.wait({fut})
                    raise
        finally:
            self._users[key] -= 1
            if not self._users[key]:  # nobody queued: forget the key (sessions come and go)
                del self._users[key]
                self._locks.pop(key, None)

    def pending(self, key: str) -> int:
        """Calls for `key` running or queued."""
        return self._users.get(key, 0)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
