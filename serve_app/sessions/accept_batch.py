"""Group commit of accepted frames: one store call for the frames that arrive while the last call is out.

Profiled under load (bench/README.md, issue 19's third pass), a store shard spends ~2-3 ms of CPU per actor
call on Ray's own work (the RPC, the fiber and event-loop hand-offs, the arguments) and ~0.01 ms on the
session rules, so the calls, not the frames, are what a shard runs out of. An ingress replica holds one
`AcceptBatcher` per shard: a frame that finds no call of its replica in flight to that shard goes at once
(no added latency when the shard keeps up); frames that arrive meanwhile, from any of the replica's sessions,
go together in the next call (`SessionActor.accept_frames`), which answers each frame on its own. Each caller
gets its own answer only once the store has taken (or refused) its frame, so the ack rule is unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

# (session_id, owner, epoch, frame, index): the arguments of one SessionActor.accept_frame call
AcceptItem = tuple[str, "str | None", int, Any, "int | None"]


class AcceptBatcher:
    def __init__(self, send: Callable[[list[AcceptItem]], Awaitable[list[Any]]], max_batch: int = 32):
        """`send(items)` makes one store call and returns, per item in order, its index or the exception that
        refused it; `max_batch` caps the frames (and so the bytes) of one call."""
        self._send, self.max_batch = send, max(1, max_batch)
        self._queue: list[tuple[AcceptItem, asyncio.Future]] = []
        self._draining = False
        self.calls = 0  # store calls made, and frames sent in them (for /stats and the bench)
        self.frames = 0

    async def accept(self, sid: str, owner: str | None, epoch: int, frame: Any, index: int | None) -> int:
        """The frame's index once the store holds it; raises what the store refused it with."""
        fut = asyncio.get_running_loop().create_future()
        self._queue.append(((sid, owner, epoch, frame, index), fut))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
                self.calls += 1
                self.frames += len(batch)
                try:
                    answers = await self._send([item for item, _ in batch])
                    if len(answers) != len(batch):
                        raise RuntimeError(f"store answered {len(answers)} of {len(batch)} frames")
                except BaseException as exc:  # the whole call failed (store gone, cancelled): every frame of it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, fut), ans in zip(batch, answers, strict=True):
                    if fut.done():  # its caller went away; the frame is stored all the same
                        continue
                    if isinstance(ans, BaseException):
                        fut.set_exception(ans)
                    else:
                        fut.set_result(ans)
        finally:
            self._draining = False
            for _, fut in self._queue:  # only left here if this task was cancelled
                if not fut.done():
                    fut.set_exception(RuntimeError("accept batcher stopped"))
            self._queue = []
