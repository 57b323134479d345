"""One WebSocket as the ingress sees it: serialised sends counted by flow control, and the queue of records this
replica's worker committed for it. No FastAPI or Ray: the socket is anything with send_text/send_bytes/close."""


import asyncio
import logging
import time
import uuid
from typing import Any

from fastapi import WebSocket

from serve_app.config import LimitsConfig
from serve_app.errors import (
    WS_CLOSE,
    ErrorCode,
    ServiceError,
)
from serve_app.ingress.flow_control import FlowControl
from serve_app.protocol import framing
from serve_app.protocol import messages as wire
from serve_app.sessions.session_store import ResultRecord

log = logging.getLogger("ray.serve.da3.ingress")  # child of ray.serve: goes to the replica log files


WS_SUBPROTOCOL = framing.WS_SUBPROTOCOL


class LocalRecords:
    """Records this replica's session worker committed, waiting for one stream's sender. Bounded by bytes: a stream
    that falls behind (a slow reader) leaves the rest in the session actor, and its sender fetches them there."""

    def __init__(self, max_bytes: int):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.missed = False  # a record was not queued: the sender must ask the actor for everything

    def put(self, rec: ResultRecord) -> None:
        if self.nbytes and self.nbytes + rec.nbytes > self.max_bytes:
            self.missed = True
            return
        self.nbytes += rec.nbytes
        self.queue.put_nowait(rec)

    def get_nowait(self) -> ResultRecord:
        rec = self.queue.get_nowait()
        self.nbytes -= rec.nbytes
        return rec


class Connection:
    """One WebSocket; sends are serialised because the receive loop, the sender and workers all write.

    Flow control (serve_app/ingress/flow_control.py): Serve queues whatever the replica sends without limit, so every
    message sent is counted until the client's `received` covers it; the result sender pauses at
    max_unacked_result_bytes, and a client that leaves that much of other messages unread is closed."""

    def __init__(self, ws: WebSocket, acked_seq: int = 0, limits: LimitsConfig | None = None,
                 sid: str | None = None):
        self.ws = ws
        self.id = uuid.uuid4().hex
        self.sid = sid  # the session streamed (its streams are closed together when the store is lost)
        self.lock = asyncio.Lock()
        self.closed = False
        lim = limits or LimitsConfig()
        self.flow = FlowControl(lim.max_unacked_result_bytes, lim.max_protocol_errors, acked_seq)
        self.acked = asyncio.Event()
        self.last_work = time.monotonic()  # last frame/flush/finalize: the idle timeout counts from here
        self.overflowed = False

    @property
    def acked_seq(self) -> int:
        return self.flow.acked_seq

    @property
    def unacked_bytes(self) -> int:
        return self.flow.unacked_bytes

    def on_received(self, seq: int) -> None:
        self.flow.received(seq)  # raises INVALID_MESSAGE beyond the last record sent
        self.acked.set()

    def _count(self, nbytes: int, seq: int | None) -> None:
        if seq is not None:
            self.last_work = time.monotonic()  # results still flowing (a long replay) is not idle
        if not self.flow.sent(nbytes, seq) and not self.overflowed:
            self.overflowed = True  # the client reads nothing: stop producing for it
            asyncio.ensure_future(self._overflow())

    async def _overflow(self) -> None:
        await self.fail(ServiceError(
            ErrorCode.SLOW_CONSUMER, f"{self.flow.unacked_other_bytes} bytes of replies sent without `received` "
            f"(limit {self.flow.hard_limit}); reconnect with resume_from={self.flow.acked_seq}", fatal=True))
        await self.close(WS_CLOSE[ErrorCode.SLOW_CONSUMER], ErrorCode.SLOW_CONSUMER.value)

    async def send_msg(self, msg: wire.ServerMessage, seq: int | None = None) -> None:
        await self.send_text(msg.json_text(), seq)

    # Counted before the send: the client's `received` for it may arrive while the send is still awaited.
    async def send_text(self, text: str, seq: int | None = None) -> None:
        if self.closed:
            return
        async with self.lock:
            self._count(len(text), seq)
            await self.ws.send_text(text)

    async def send_bytes(self, data: bytes, seq: int | None = None) -> None:
        if self.closed:
            return
        async with self.lock:
            self._count(len(data), seq)
            await self.ws.send_bytes(data)

    async def close(self, code: int, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            async with self.lock:
                await self.ws.close(code=code, reason=reason[:120])
        except Exception:  # noqa: BLE001, S110 - already gone
            pass

    async def fail(self, exc: ServiceError, frame_id: Any = None) -> None:
        await self.send_msg(wire.Error.of(exc.code, exc.message, fatal=exc.fatal, frame_id=frame_id,
                                          details=exc.details))
