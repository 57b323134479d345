"""WebSocket side of the client: one StreamSession per connection to /ws/reconstruct/{id}.

Flow control: at most `max_in_flight` frames (from `ready` / acks) may be accepted-but-unprocessed on the server;
the client counts frames it sent but has no answer for, plus the server's last reported in-flight count, and
waits before sending more. Reconnects (close 1001/1012 or an abnormal drop) resume with `resume_from=last_seq`
and resend frames the server never acknowledged; frames answered QUEUE_FULL (or a rate limit, after its
retry_after_s) are resent in their original order.
Each points message and each `correction` is answered with `received` (result flow control,
docs/WEBSOCKET_API.md 3.7); corrections are applied to `reconstruction` (3.5.1).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Self

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidHandshake

try:
    from websockets.asyncio.client import connect as ws_connect
    HEADERS_KW = "additional_headers"
except ImportError:  # websockets < 13
    from websockets.client import connect as ws_connect  # type: ignore[no-redef]
    HEADERS_KW = "extra_headers"

from da3_client._protocol import FRAME_ERRORS, NO_MORE_FRAMES, RECONNECT_CODES, RETRY_LATER, WS_SUBPROTOCOL
from da3_client.errors import CLOSE_CODES, CLOSE_NORMAL, RETRYABLE_CLOSES, Da3Error
from da3_client.reconstruction import Reconstruction
from da3_client.wire import PointChunk, decode_points, encode_frame, encode_jpeg, frame_header

log = logging.getLogger("da3_client")

# The server's code sets (generated from its error policy, da3_client/_protocol.py): FRAME_ERRORS answer one frame
# message (the frame was not accepted); RETRY_LATER frames are sent again (after details.retry_after_s for the rate
# limits); after NO_MORE_FRAMES send_frame raises.
# Handshake refusals worth retrying during a reconnect (our own stale connection may still hold the session).
RETRYABLE_CODES = frozenset({"CONNECTION_ERROR", "TIMEOUT"}) | RECONNECT_CODES
MAX_PROBE_S = 8.0


class Endpoint(Protocol):
    """What a stream needs from its client (Da3Client is one). Declared here so stream.py never imports
    client.py: the package's imports go one way, wire/errors/sources/reconstruction -> stream -> client."""

    timeout: float

    @property
    def headers(self) -> dict[str, str]: ...

    def websocket_url(self, session_id: str, resume_from: int | None = None) -> str: ...


@dataclass
class _Pending:
    order: int  # send order, kept across resends
    frame_id: Any
    data: bytes
    attempts: int = 0


class StreamSession:
    """A live stream for one session. Use `async with client.stream(session_id) as s:`.

    on_message:     called (sync or async) with every server JSON message (dict) and every points chunk
                    (PointChunk) after the Reconstruction has been updated
    reconstruction: accumulator to feed (default: a new one, as `s.reconstruction`)
    resume_from:    first connection's resume_from (default: none, so the server replays everything
                    after the session's last_seq; pass 0 to get every record of an existing session again)
    jpeg_quality:   for frames given as numpy arrays
    max_reconnects: reconnect attempts per drop (exponential backoff from backoff_s)
    credit_timeout: longest wait for in-flight credit before send_frame raises Da3Error("TIMEOUT")
    compression:    offer permessage-deflate. Off by default: point chunks are float16/uint8 and shrink ~10%,
                    while deflating and inflating them adds ~10 ms per window on loopback (see WEBSOCKET_API.md)
    """

    def __init__(self, client: Endpoint, session_id: str, *, on_message: Callable[[Any], Any] | None = None,
                 reconstruction: Reconstruction | None = None, resume_from: int | None = None,
                 jpeg_quality: int = 90, max_reconnects: int = 5, backoff_s: float = 0.5,
                 credit_timeout: float = 600.0, compression: bool = False):
        self.client = client
        self.session_id = session_id
        self.on_message = on_message
        self.reconstruction = reconstruction or Reconstruction()
        self.jpeg_quality = jpeg_quality
        self.max_reconnects = max_reconnects
        self.backoff_s = backoff_s
        self.credit_timeout = credit_timeout
        self.compression = "deflate" if compression else None
        self._initial_resume = resume_from

        self.ready: dict | None = None
        self.summary: dict | None = None
        self.progress: dict = {}
        self.max_in_flight = 1
        self.server_in_flight = 0
        self.frames_sent = 0  # distinct frames handed to send_frame
        self.frames_acked = 0
        self.frames_processed = 0  # frame_result messages received on this object
        self.reconnects = 0
        self.reconnect_codes: list[int] = []  # close code of each drop that was followed by a reconnect
        self.rejected: list[dict] = []  # error messages of frames rejected for good
        self.errors: list[dict] = []  # every error message received

        self._ws: Any = None
        self._recv_task: asyncio.Task | None = None
        self._cond = asyncio.Condition()
        self._connected = asyncio.Event()
        self._outbox: deque[_Pending] = deque()  # to send (new frames and resends), in order
        self._unacked: deque[_Pending] = deque()  # sent, not yet acked or rejected
        self._order = itertools.count()
        self._send_lock = asyncio.Lock()
        self._accepted_total = 0  # the server's frames_received as last reported
        self._next_id: int | None = None
        self._fatal: Da3Error | None = None
        self._no_more_frames: Da3Error | None = None
        self._closing = False
        self._done = False
        self._finalize_sent = False
        self._probe_s = 1.0
        self._hold_until = 0.0  # loop time before which no frame is sent (rate limited)
        self._pongs: dict[str, asyncio.Future] = {}

    # --- context manager ------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def last_seq(self) -> int:
        return self.reconstruction.last_seq

    @property
    def pending(self) -> int:
        """Frames given to send_frame that the server has not answered yet."""
        return len(self._outbox) + len(self._unacked)

    async def connect(self) -> dict:
        """Open the WebSocket and wait for `ready`; raises Da3Error with the server's code on refusal."""
        ws, ready = await self._open(self._initial_resume)
        self._ws = ws
        self._on_ready(ready, first=True)
        self._recv_task = asyncio.create_task(self._recv_loop(), name=f"da3-recv-{self.session_id}")
        return ready

    async def close(self) -> None:
        """Close the connection (code 1000) without finalizing; the session stays on the server."""
        self._closing = True
        if self._ws is not None:
            try:
                await self._ws.close()
            except Exception:  # noqa: BLE001, S110 - already closed
                pass
        if self._recv_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._recv_task), 5)
            except (TimeoutError, Exception):  # noqa: BLE001
                self._recv_task.cancel()
        self._done = True

    # --- public operations ----------------------------------------------------------------------------------
    async def send_frame(self, image: bytes | np.ndarray, frame_id: int | str | None = None,
                         timestamp: float | None = None, intrinsics: Any = None, pose: Any = None) -> Any:
        """Send one frame (encoded bytes, or an (H, W, 3) uint8 RGB array encoded as JPEG here).

        Waits for in-flight credit first. Without frame_id the client numbers frames itself (continuing from
        the session's frames_received), so acks and errors can be matched. Returns the frame_id used.
        Raises Da3Error after a fatal server error, or once the session takes no more frames
        (FRAME_LIMIT_EXCEEDED / SESSION_FINALIZED).
        """
        self._check()
        if self._no_more_frames is not None:
            raise self._no_more_frames
        if isinstance(image, np.ndarray):
            image = await asyncio.to_thread(encode_jpeg, image, self.jpeg_quality)
        if frame_id is None:
            frame_id = self._next_id or 0
            self._next_id = frame_id + 1
        data = encode_frame(image, frame_header(frame_id, timestamp, intrinsics, pose))
        self._outbox.append(_Pending(next(self._order), frame_id, data))
        self.frames_sent += 1
        await self._drain()
        return frame_id

    async def flush(self) -> None:
        """Ask the server to process buffered frames now, even if a window is not full."""
        await self._drain()
        await self._send_json({"type": "flush"})

    async def ping(self, timeout: float = 10.0) -> dict:
        """Round trip a ping; returns the pong message."""
        token = f"{time.time():.6f}-{id(self)}-{len(self._pongs)}"
        fut = asyncio.get_running_loop().create_future()
        self._pongs[token] = fut
        try:
            await self._send_json({"type": "ping", "t": token})
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise Da3Error("TIMEOUT", "no pong", fatal=False) from None
        finally:
            self._pongs.pop(token, None)

    async def finalize(self, timeout: float | None = 600.0) -> dict:
        """Send everything still queued, wait until every frame is answered, then finalize: waits for the
        server's summary (all results received) and returns it."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while self._outbox or self._unacked:
            if self._outbox:
                await self._drain()
            else:
                await self._wait(lambda: not self._unacked or bool(self._outbox), deadline, "frame answers")
        self._finalize_sent = True
        await self._send_json({"type": "finalize"})
        await self._wait(lambda: self.summary is not None, deadline, "the summary", allow_done=True)
        if self.summary is None:
            self._check()
            raise Da3Error("CONNECTION_ERROR", "stream closed before the summary arrived")
        if self._recv_task is not None:  # the server closes with 1000 right after the summary
            try:
                await asyncio.wait_for(asyncio.shield(self._recv_task), 5)
            except Exception:  # noqa: BLE001, S110 - the summary is already here
                pass
        return self.summary

    # --- internals: waiting and sending ---------------------------------------------------------------------
    def _check(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._done and self.summary is None and not self._closing:
            raise Da3Error("CONNECTION_ERROR", "the stream is closed")

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _wait(self, pred: Callable[[], bool], deadline: float | None, what: str, *,
                    allow_done: bool = False, poll: float | None = None) -> bool:
        """Wait until pred() holds; False if `poll` seconds passed quietly. Raises on fatal error / deadline."""
        loop = asyncio.get_running_loop()
        async with self._cond:
            while not pred():
                if self._fatal is not None:
                    raise self._fatal
                if self._done:
                    if allow_done:
                        return False
                    self._check()
                    raise Da3Error("CONNECTION_ERROR", f"stream closed while waiting for {what}")
                wait = None if deadline is None else deadline - loop.time()
                if wait is not None and wait <= 0:
                    raise Da3Error("TIMEOUT", f"timed out waiting for {what}", fatal=False)
                if poll is not None:
                    wait = poll if wait is None else min(wait, poll)
                try:
                    await asyncio.wait_for(self._cond.wait(), wait)
                except TimeoutError:
                    if poll is not None:
                        return False
        return True

    def _has_credit(self) -> bool:
        return self._connected.is_set() and len(self._unacked) + self.server_in_flight < self.max_in_flight

    async def _drain(self) -> None:
        """Send queued frames in order, each after in-flight credit is available."""
        async with self._send_lock:
            deadline = asyncio.get_running_loop().time() + self.credit_timeout
            while self._outbox:
                self._check()
                got = await self._wait(self._has_credit, deadline, "in-flight credit", poll=self._probe_s)
                # Quiet for a while: our count may be stale (acks race with results). Probe with one frame;
                # a QUEUE_FULL answer re-queues it and lengthens the next quiet period.
                if not got and (not self._connected.is_set() or self._unacked):
                    continue
                if not self._outbox:
                    break
                hold = self._hold_until - asyncio.get_running_loop().time()
                if hold > 0:  # the server asked us to slow down (frames or bytes per second)
                    await asyncio.sleep(hold)
                    continue
                p = self._outbox.popleft()
                p.attempts += 1
                self._unacked.append(p)
                try:
                    await self._ws.send(p.data)
                except ConnectionClosed:
                    pass  # still unacked: the receive loop reconnects and re-queues it

    async def _send_json(self, msg: dict) -> None:
        text = json.dumps(msg, separators=(",", ":"))
        for _ in range(self.max_reconnects + 1):
            self._check()
            await self._wait(self._connected.is_set, None, "a connection")
            ws = self._ws
            try:
                await ws.send(text)
                return
            except ConnectionClosed:  # wait for the receive loop to notice and reconnect
                await self._wait(lambda old=ws: self._ws is not old and self._connected.is_set(), None, "a reconnect")
        raise Da3Error("CONNECTION_ERROR", f"could not send {msg.get('type')}")

    # --- internals: connection ------------------------------------------------------------------------------
    async def _open(self, resume_from: int | None) -> tuple[Any, dict]:
        url = self.client.websocket_url(self.session_id, resume_from)
        timeout = self.client.timeout
        try:
            ws = await asyncio.wait_for(ws_connect(url, max_size=None, open_timeout=timeout,
                                                      compression=self.compression, subprotocols=[WS_SUBPROTOCOL],
                                                      # session affinity (Serve's consistent-hash router)
                                                      **{HEADERS_KW: {**self.client.headers,
                                                                      "x-session-id": self.session_id}}), timeout)
        except (TimeoutError, OSError, InvalidHandshake) as exc:
            raise Da3Error("CONNECTION_ERROR", f"cannot connect to {url.split('?')[0]}: {exc!r}",
                           fatal=False) from exc
        try:
            first = await asyncio.wait_for(ws.recv(), timeout)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            raise Da3Error(CLOSE_CODES.get(code, "CONNECTION_ERROR"), f"closed before ready ({code})", code,
                           fatal=code not in RETRYABLE_CLOSES) from None
        except TimeoutError:
            await ws.close()
            raise Da3Error("TIMEOUT", "no ready message", fatal=False) from None
        msg = json.loads(first) if isinstance(first, str) else {}
        if msg.get("type") == "ready":
            return ws, msg
        close_code = None
        try:  # the server closes right after an error: pick up its close code
            await asyncio.wait_for(ws.wait_closed(), 2)
            close_code = ws.close_code
        except Exception:  # noqa: BLE001
            await ws.close()
        if msg.get("type") == "error":
            raise Da3Error(str(msg.get("code")), str(msg.get("message", "")), close_code, fatal=True)
        raise Da3Error("PROTOCOL_ERROR", f"expected ready, got {str(first)[:100]!r}", close_code)

    def _on_ready(self, msg: dict, first: bool) -> None:
        self.ready = msg
        self.max_in_flight = max(1, int(msg.get("max_in_flight", 1)))
        self.server_in_flight = int(msg.get("in_flight", 0))
        received = int(msg.get("frames_received", 0))
        if self._next_id is None:
            self._next_id = received
        if not first:
            # The server accepted some frames whose acks were lost with the connection: they are the oldest.
            for _ in range(min(max(0, received - self._accepted_total), len(self._unacked))):
                self._unacked.popleft()
                self.frames_acked += 1
            self._requeue(list(self._unacked))
            self._unacked.clear()
        self._accepted_total = max(self._accepted_total, received)
        self._connected.set()

    def _requeue(self, items: list[_Pending]) -> None:
        self._outbox = deque(sorted([*self._outbox, *items], key=lambda p: p.order))

    async def _recv_loop(self) -> None:
        try:
            while True:
                code, reason = await self._read_until_closed()
                self._connected.clear()
                await self._notify()
                if self._closing or self._fatal is not None:
                    return
                if code == CLOSE_NORMAL:
                    return  # finalized (summary already received) or closed by the server for good
                if code not in RETRYABLE_CLOSES and (code in CLOSE_CODES or 4000 <= code < 5000):
                    if self._fatal is None:
                        self._fatal = Da3Error(CLOSE_CODES.get(code, "INTERNAL_ERROR"),
                                               reason or f"closed with {code}", code)
                    return
                if not await self._reconnect(code):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("receive loop failed")
            if self._fatal is None:
                self._fatal = Da3Error("PROTOCOL_ERROR", f"receive loop failed: {exc!r}")
        finally:
            self._done = True
            self._connected.clear()
            for fut in self._pongs.values():
                if not fut.done():
                    fut.cancel()
            await self._notify()

    async def _read_until_closed(self) -> tuple[int, str]:
        try:
            async for raw in self._ws:
                await self._handle(raw)
        except ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
        code = getattr(self._ws, "close_code", None)
        return (code if code is not None else 1006), (getattr(self._ws, "close_reason", "") or "")

    async def _reconnect(self, code: int) -> bool:
        last: Da3Error | None = None
        for attempt in range(self.max_reconnects):
            await asyncio.sleep(self.backoff_s * (2 ** attempt))
            if self._closing:
                return False
            try:
                ws, ready = await self._open(self.last_seq)
            except Da3Error as exc:
                last = exc
                if exc.code in RETRYABLE_CODES or not exc.fatal:
                    continue
                self._fatal = exc
                return False
            log.info("reconnected to %s after close %s (resume_from=%d)", self.session_id, code, self.last_seq)
            self.reconnect_codes.append(code)
            self._ws = ws
            self.reconnects += 1
            self._on_ready(ready, first=False)
            if self._finalize_sent and ready.get("state") not in ("complete", "failed"):
                await ws.send(json.dumps({"type": "finalize"}))
            await self._notify()
            return True
        self._fatal = Da3Error("CONNECTION_ERROR", f"gave up after {self.max_reconnects} reconnect attempts "
                                                   f"(close {code}; last: {last})")
        return False

    def _take(self, frame_id: Any, fallback_oldest: bool) -> _Pending | None:
        for i, p in enumerate(self._unacked):
            if p.frame_id == frame_id and type(p.frame_id) is type(frame_id):
                del self._unacked[i]
                return p
        if fallback_oldest and self._unacked:
            return self._unacked.popleft()
        return None

    async def _handle(self, raw: str | bytes) -> None:
        if isinstance(raw, (bytes, bytearray)):
            chunk = decode_points(raw)
            self.reconstruction.apply(chunk)
            await self._callback(chunk)
            try:  # result flow control: the server pauses after max_unacked_result_bytes without this
                await self._ws.send(json.dumps({"type": "received", "seq": chunk.seq}))
            except ConnectionClosed:
                pass  # the reconnect resumes from last_seq anyway
            await self._notify()
            return
        msg = json.loads(raw)
        kind = msg.get("type")
        if kind == "ack":
            # Acks come in the order frames were read; match by id, else the oldest.
            self._take(msg.get("frame_id"), fallback_oldest=True)
            self.frames_acked += 1
            self._accepted_total = max(self._accepted_total, int(msg.get("frames_received", 0)))
            self.server_in_flight = int(msg.get("in_flight", self.server_in_flight))
            self.max_in_flight = max(1, int(msg.get("max_in_flight", self.max_in_flight)))
            self._probe_s = 1.0
        elif kind == "error":
            self.errors.append(msg)
            code = str(msg.get("code"))
            if msg.get("fatal"):
                self._fatal = Da3Error(code, str(msg.get("message", "")), fatal=True)
            elif code in FRAME_ERRORS:
                p = self._take(msg.get("frame_id"), fallback_oldest="frame_id" not in msg)
                if p is not None and code in RETRY_LATER:
                    self._requeue([p])
                    if code == "QUEUE_FULL":
                        self._probe_s = min(MAX_PROBE_S, self._probe_s * 2)
                    else:
                        wait = float((msg.get("details") or {}).get("retry_after_s", 0.5))
                        self._hold_until = max(self._hold_until, asyncio.get_running_loop().time() + wait)
                elif p is not None:
                    self.rejected.append(msg)
                if code in NO_MORE_FRAMES:
                    self._no_more_frames = Da3Error(code, str(msg.get("message", "")), fatal=False)
        elif kind in ("window", "frame_result"):
            self.reconstruction.apply(msg)
            if kind == "frame_result":
                self.frames_processed += 1
                self.server_in_flight = max(0, self.server_in_flight - 1)
        elif kind == "correction":  # a whole record in one message: apply it and acknowledge it like points
            self.reconstruction.apply(msg)
            try:
                await self._ws.send(json.dumps({"type": "received", "seq": msg.get("seq")}))
            except ConnectionClosed:
                pass
        elif kind == "progress":
            self.progress = msg
            self.server_in_flight = int(msg.get("in_flight", self.server_in_flight))
        elif kind == "summary":
            self.summary = msg
        elif kind == "pong":
            fut = self._pongs.get(msg.get("t"))
            if fut is not None and not fut.done():
                fut.set_result(msg)
        await self._callback(msg)
        await self._notify()

    async def _callback(self, item: dict | PointChunk) -> None:
        if self.on_message is None:
            return
        try:
            res = self.on_message(item)
            if inspect.isawaitable(res):
                await res
        except Exception:
            log.exception("on_message callback failed")
