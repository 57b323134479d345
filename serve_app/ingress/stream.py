"""The WebSocket stream: accept, attach, the receive loop, frame admission, the idle watch (a mixin of the
Ingress deployment). Results go out through serve_app/ingress/results.py."""


import asyncio
import dataclasses
import logging
import time
from typing import Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from serve_app import protocol
from serve_app.config import SessionParams
from serve_app.deployments.session_actor import call, store_unavailable
from serve_app.deployments.session_worker import SessionWorker
from serve_app.errors import (
    WS_CLOSE,
    WS_CLOSE_SERVICE_RESTART,
    ErrorCode,
    ServiceError,
)
from serve_app.ingress.connection import WS_SUBPROTOCOL, Connection, LocalRecords
from serve_app.limits import FrameRateLimiter
from serve_app.protocol import messages as wire
from serve_app.recon.reconstruction import FrameInput

log = logging.getLogger("ray.serve.da3.ingress")  # child of ray.serve: goes to the replica log files


class StreamRoute:
    """/ws/reconstruct/{session_id} and what a received frame goes through."""

    async def reconstruct(self, websocket: WebSocket, session_id: str) -> None:
        offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",")]
        await websocket.accept(subprotocol=WS_SUBPROTOCOL if WS_SUBPROTOCOL in offered else None)
        conn = Connection(websocket, limits=self.args.limits, sid=session_id)
        if self.draining:  # routed here just before Serve took this replica out of rotation
            await conn.close(WS_CLOSE_SERVICE_RESTART, "server restarting; reconnect")
            return
        self._watch_drain()
        try:
            owner = self._owner(self._bearer(websocket))
        except ServiceError as exc:
            await self._refuse(conn, session_id, exc)
            return
        att = await self._handshake_step(conn, session_id, call(self.store.of(session_id).attach, session_id,
                                                                 owner, conn.id))
        if att is None:
            return
        info = att.info
        params = SessionParams.model_validate(info["params"])
        # the session may be deleted or expire between attach and takeover
        worker = await self._handshake_step(conn, session_id, self._worker(session_id, params, owner, info))
        if worker is None:
            return
        try:
            resume_from = int(websocket.query_params.get("resume_from", info["last_seq"]))
        except ValueError:
            resume_from = info["last_seq"]
        conn.flow.resume(resume_from)
        self.connections.add(conn)

        def listener(msg: wire.ServerMessage) -> None:
            asyncio.ensure_future(conn.send_msg(msg))

        local = LocalRecords(self.args.limits.max_unacked_result_bytes)
        worker.listeners.append(listener)
        worker.record_listeners.append(local.put)
        self.streams += 1
        self.metrics.active_sessions.set(self.streams)
        await conn.send_msg(wire.Ready(
            session_id=session_id, params=info["params"], state=info["state"],
            frames_received=info["frames_received"], frames_processed=info["frames_processed"],
            points_total=info["points_total"], last_seq=info["last_seq"],
            max_in_flight=self.args.limits.max_in_flight, in_flight=worker.in_flight))
        log.info("session %s: stream connected (resume_from=%s)", session_id, resume_from,
                 extra={"session_id": session_id, "connection_id": conn.id})
        sender = asyncio.create_task(self._send_results(conn, session_id, resume_from, params.point_encoding,
                                                        local, worker.epoch))
        idle_watch = asyncio.create_task(self._idle_watch(conn, session_id, worker))
        try:
            await self._receive_loop(conn, websocket, session_id, owner, worker)
        except WebSocketDisconnect:
            pass
        finally:
            if listener in worker.listeners:
                worker.listeners.remove(listener)
            if local.put in worker.record_listeners:
                worker.record_listeners.remove(local.put)
            worker.maybe_retire()
            sender.cancel()
            idle_watch.cancel()
            conn.closed = True
            self.connections.discard(conn)
            self.streams -= 1
            self.metrics.active_sessions.set(self.streams)
            log.info("session %s: stream closed (in flight %d)", session_id, worker.in_flight,
                     extra={"session_id": session_id, "connection_id": conn.id})
            try:
                await self.store.of(session_id).detach.remote(session_id, conn.id)
            except Exception:  # noqa: BLE001, S110 - actor restarting; attachment is advisory
                pass

    async def _handshake_step(self, conn: Connection, sid: str, step):
        """Await one store step of the handshake. A refusal closes the stream with its code, a store that is gone
        with 1012 (the client reconnects); either way None."""
        try:
            return await step
        except ServiceError as exc:
            await self._refuse(conn, sid, exc)
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            await self._close_store_gone(conn, sid)
        return None

    async def _refuse(self, conn: Connection, sid: str, exc: ServiceError) -> None:
        self._count_error(exc.code.value, sid)
        await conn.fail(exc)
        await conn.close(WS_CLOSE.get(exc.code, 4500), exc.code.value)

    async def _receive_loop(self, conn: Connection, websocket: WebSocket, sid: str, owner: str | None,
                            worker: SessionWorker) -> None:
        lim = self.args.limits
        while not conn.closed:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            try:
                if msg.get("bytes") is not None:
                    data = msg["bytes"]
                    if len(data) > lim.max_image_bytes + 65536:
                        raise ServiceError(ErrorCode.MESSAGE_TOO_LARGE,
                                           f"binary message of {len(data)} bytes exceeds the limit")
                    conn.last_work = time.monotonic()
                    await self._accept_frame(conn, sid, owner, worker, protocol.parse_binary_message(data))
                    continue
                text = msg.get("text")
                if text is None:
                    continue
                cmsg = protocol.parse_text_message(text, max_bytes=lim.max_text_message_bytes)
                kind = cmsg.type
                if kind in ("frame", "flush", "finalize"):
                    conn.last_work = time.monotonic()
                if kind == "frame":
                    await self._accept_frame(conn, sid, owner, worker, protocol.frame_from_json(cmsg))
                elif kind == "flush":
                    worker.flush()
                elif kind == "finalize":
                    await worker.finalize()
                elif kind == "ping":
                    await conn.send_msg(wire.Pong.of(cmsg.t))
                elif kind == "received":
                    conn.on_received(cmsg.seq)
            except ServiceError as exc:
                self._count_error(exc.code.value, sid)
                await conn.fail(exc, frame_id=getattr(exc, "frame_id", None))
                if exc.fatal:
                    await conn.close(WS_CLOSE.get(exc.code, 4500), exc.code.value)
                    return
                if conn.flow.protocol_error(exc.code):  # a client that keeps sending garbage gets closed
                    await self._close_with(conn, sid, ServiceError(
                        ErrorCode.TOO_MANY_ERRORS, f"{conn.flow.protocol_errors} malformed messages on this "
                        f"stream (limit {conn.flow.max_protocol_errors})", fatal=True))
                    return
            except Exception as exc:  # the frame was not acked: the client resends it after reconnecting
                if not store_unavailable(exc):
                    raise
                await self._close_store_gone(conn, sid)
                return

    # --- the session store gone (its actor restarting, its node lost) -----------------------------------------
    STORE_GONE_REASON = "session store restarting; reconnect with resume_from"

    def _on_store_lost(self, sid: str, worker: SessionWorker) -> None:
        """A session worker stopped because the store failed a call: its streams here reconnect (1012) and the
        worker that takes the session over redoes what was not committed."""
        for c in list(self.connections):
            if c.sid == sid:
                asyncio.ensure_future(self._close_store_gone(c, sid))

    async def _close_store_gone(self, conn: Connection, sid: str) -> None:
        """Close with 1012 (docs/WEBSOCKET_API.md 3.9: reconnect with resume_from), no fatal error: the session
        is intact in a durable store, and a memory-only store answers SESSION_LOST on the reconnect."""
        self._count_error("STORE_UNAVAILABLE", sid)
        log.warning("session %s: session store unavailable; closing the stream with 1012", sid,
                    extra={"session_id": sid, "connection_id": conn.id})
        await conn.close(WS_CLOSE_SERVICE_RESTART, self.STORE_GONE_REASON)

    async def _close_with(self, conn: Connection, sid: str, exc: ServiceError) -> None:
        self._count_error(exc.code.value, sid)
        await conn.fail(exc)
        await conn.close(WS_CLOSE[exc.code], exc.code.value)

    async def _idle_watch(self, conn: Connection, sid: str, worker: SessionWorker) -> None:
        """Close a stream that holds a connection slot without using it: no frame, flush or finalize for
        ws_idle_timeout_s and no work in flight (pings do not count)."""
        timeout = self.args.limits.ws_idle_timeout_s
        while not conn.closed:
            await asyncio.sleep(min(timeout / 4, 5.0))
            if worker.in_flight or not worker.idle:
                conn.last_work = time.monotonic()  # work in flight: the idle time starts when it is done
            elif time.monotonic() - conn.last_work >= timeout:
                await self._close_with(conn, sid, ServiceError(
                    ErrorCode.IDLE_TIMEOUT, f"no frames for {timeout:g}s and no work in flight; reconnect to "
                    "continue (the session is kept until its idle_ttl_s)", fatal=True))
                return

    async def _accept_frame(self, conn: Connection, sid: str, owner: str | None, worker: SessionWorker,
                            frame: protocol.IncomingFrame) -> None:
        try:
            self._rate_check(worker, len(frame.image))
            if worker.in_flight >= self.args.limits.max_in_flight:
                raise ServiceError(ErrorCode.QUEUE_FULL,
                                   f"{worker.in_flight} frames in flight (max {self.args.limits.max_in_flight}); "
                                   "wait for results before sending more")
            index, fid = await self._admit(sid, owner, worker, frame.image, frame.meta)
        except ServiceError as exc:
            exc.frame_id = frame.meta.frame_id
            raise
        await conn.send_msg(wire.Ack.of(fid, index, in_flight=worker.in_flight,
                                        max_in_flight=self.args.limits.max_in_flight))

    async def _admit(self, sid: str, owner: str | None, worker: SessionWorker, image: bytes | np.ndarray,
                     meta: protocol.FrameMeta) -> tuple[int, Any]:
        """Decode/resize off the loop, reserve an index in the actor, queue the frame. Returns (index, frame_id)."""
        rgb, resized = await self.decode_gate.run(worker, self._prepare, image, worker.params.process_res,
                                                  worker.recon.input_size)
        if worker.recon.input_size is None:
            worker.recon.input_size = (int(resized.shape[1]), int(resized.shape[0]))
        original = (int(rgb.shape[1]), int(rgb.shape[0]))
        K = None
        if meta.intrinsics is not None:
            sx, sy = resized.shape[1] / original[0], resized.shape[0] / original[1]
            K = np.asarray(meta.intrinsics, np.float32) * np.array([[sx], [sy], [1.0]], np.float32)
        encoded = bytes(image) if isinstance(image, (bytes, bytearray)) else None
        frame = FrameInput(index=-1, frame_id=meta.frame_id, image=resized, original_size=original,
                           timestamp=meta.timestamp, intrinsics=K,
                           pose=None if meta.pose is None else np.asarray(meta.pose, np.float32), encoded=encoded)
        # The worker numbers the frame (the store checks the number) and plans with it at once; the actor stores
        # it meanwhile, and we ack only once it has: an acked frame survives this replica. The actor keeps the
        # client's encoded bytes when there are some (decoded again only on a takeover), else the resized array.
        index = frame.index = worker.next_index()
        if frame.frame_id is None:
            frame.frame_id = index
        stored = dataclasses.replace(frame, image=None) if encoded is not None else frame
        storing = asyncio.ensure_future(self.store.accept_frame(sid, owner, worker.epoch, stored, index))
        worker.add_frame(frame, storing)
        try:
            # shield: a client leaving mid-call does not cancel the store, and the frame then stays queued
            await asyncio.shield(storing)
        except Exception:  # refused, or the actor call failed: not acked, so not kept either (if still possible)
            await worker.retract(frame)
            raise
        self.frames_in += 1
        self.metrics.frames_in.inc()
        return index, frame.frame_id

    def _rate_check(self, worker: SessionWorker, nbytes: int) -> None:
        lim, now = self.args.limits, time.monotonic()
        if worker.rate is None:
            worker.rate = FrameRateLimiter(lim.frames_per_s, lim.bytes_per_s, now)
        worker.rate.check(nbytes, now)
