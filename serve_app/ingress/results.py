"""Result streaming: records in seq order from this replica's worker and the session store's long-poll, paused
while the client has not read enough (a mixin of the Ingress deployment)."""


import asyncio
import json
import logging
import time

from serve_app import protocol
from serve_app.errors import (
    WS_CLOSE,
    WS_CLOSE_NORMAL,
    WS_CLOSE_SESSION_DELETED,
    ErrorCode,
    ServiceError,
)
from serve_app.ingress.connection import Connection, LocalRecords
from serve_app.sessions.session_store import CorrectionRecord

log = logging.getLogger("ray.serve.da3.ingress")  # child of ray.serve: goes to the replica log files


class ResultStreaming:
    """The sender task of one stream."""

    async def _wait_for_reader(self, conn: Connection, sid: str) -> bool:
        """Pause while the client holds more than max_unacked_result_bytes of unacknowledged results (one record
        always fits). False after slow_reader_timeout_s without progress: the stream is closed with
        SLOW_CONSUMER and the results wait in the session for a reconnect with resume_from."""
        lim = self.args.limits
        while conn.flow.must_pause:
            conn.acked.clear()
            try:
                await asyncio.wait_for(conn.acked.wait(), lim.slow_reader_timeout_s)
            except TimeoutError:
                self._count_error(ErrorCode.SLOW_CONSUMER.value, sid)
                await conn.fail(ServiceError(
                    ErrorCode.SLOW_CONSUMER,
                    f"{conn.unacked_bytes} bytes of results unacknowledged for {lim.slow_reader_timeout_s:g}s "
                    f"(limit {lim.max_unacked_result_bytes}); send `received` messages, reconnect with "
                    f"resume_from={conn.acked_seq} to continue", fatal=True))
                await conn.close(WS_CLOSE[ErrorCode.SLOW_CONSUMER], ErrorCode.SLOW_CONSUMER.value)
                return False
            if conn.closed:
                return False
        return not conn.closed

    async def _send_results(self, conn: Connection, sid: str, after: int, encoding: str,
                            local: LocalRecords, epoch: int) -> None:
        """Stream result records in seq order. Records this replica's worker (fencing epoch `epoch`) commits arrive
        on `local` right after the commit; the session actor's long-poll brings the rest (a resume, records of
        another worker) and status changes. The first poll and any poll after a gap in the local records ask
        for everything, later ones leave the local worker's records out; a record both bring is sent once."""
        seq = after
        loop = asyncio.get_running_loop()
        poll = got = None
        full = True
        try:
            while not conn.closed:
                if poll is None:
                    poll = asyncio.ensure_future(self.store.of(sid).wait_records.remote(
                        sid, seq, conn.id, 20.0, None if full else epoch))
                if local.queue.empty():
                    got = asyncio.ensure_future(local.queue.get())
                    await asyncio.wait({poll, got}, return_when=asyncio.FIRST_COMPLETED)
                    if not got.done():
                        got.cancel()
                    elif not got.cancelled():
                        local.queue.put_nowait(got.result())  # handled below, in order with the rest
                while not local.queue.empty():  # local records first: a poll answer may already say "complete"
                    rec = local.get_nowait()
                    if rec.seq == seq + 1:
                        if not await self._send_record(conn, sid, rec, encoding, loop):
                            return
                        seq = rec.seq
                        self.records_sent["local"] += 1
                    elif rec.seq > seq + 1 and not full:  # a gap: ask the actor for everything after seq
                        local.missed = True
                if local.missed and not full:
                    full, local.missed = True, False
                    poll.cancel()
                    poll = None
                if poll is None:
                    continue
                if not poll.done():
                    continue
                res, poll = poll.result(), None
                if res.gone is not None:
                    if res.gone in (ErrorCode.SESSION_EXPIRED.value, ErrorCode.SESSION_LOST.value):
                        code = ErrorCode(res.gone)
                        msg = ("session expired" if code is ErrorCode.SESSION_EXPIRED else
                               "the session store restarted without this session's state; start a new session")
                        await conn.fail(ServiceError(code, msg, fatal=True))
                        await conn.close(WS_CLOSE[code], code.value)
                    else:
                        await conn.fail(ServiceError(ErrorCode.SESSION_NOT_FOUND, "session was deleted",
                                                     fatal=True))
                        await conn.close(WS_CLOSE_SESSION_DELETED, "SESSION_DELETED")
                    return
                if res.displaced:
                    await conn.fail(ServiceError(ErrorCode.SESSION_BUSY,
                                                 "another connection took over this session", fatal=True))
                    await conn.close(WS_CLOSE[ErrorCode.SESSION_BUSY], "SESSION_BUSY")
                    return
                for rec in res.records:
                    if rec.seq <= seq:
                        continue  # already sent from the local queue
                    if not await self._send_record(conn, sid, rec, encoding, loop):
                        return
                    seq = rec.seq
                    self.records_sent["long_poll"] += 1
                info = res.info
                full = seq < info["last_seq"]  # the actor has a record this stream lacks: fetch it
                if info["state"] in ("complete", "failed") and seq >= info["last_seq"]:
                    dur = (info.get("updated_at") or time.time()) - info["created_at"]
                    await conn.send_json({
                        "type": "summary", "state": info["state"], "frames_received": info["frames_received"],
                        "frames_processed": info["frames_processed"], "frames_failed": info["frames_failed"],
                        "points_total": info["points_total"], "windows": info["windows"], "duration_s": dur,
                        "exports": protocol.export_paths(sid)})
                    await conn.close(WS_CLOSE_NORMAL, "complete")
                    return
        except asyncio.CancelledError:
            for fut in (poll, got):  # neither may outlive the stream (a pending queue.get would be left behind)
                if fut is not None:
                    fut.cancel()
            raise
        except Exception:
            log.exception("result sender failed for %s", sid)
            await conn.fail(ServiceError(ErrorCode.INTERNAL_ERROR, "result stream failed", fatal=True))
            await conn.close(4500, "INTERNAL_ERROR")

    async def _send_record(self, conn: Connection, sid: str, rec, encoding: str, loop) -> bool:
        """One result record: window JSON, frame_results, points. False if the stream closed meanwhile."""
        if not await self._wait_for_reader(conn, sid):
            return False
        if isinstance(rec, CorrectionRecord):  # a correction record is one JSON message (no points)
            text = rec.text or json.dumps(rec.message, separators=(",", ":"))
            await conn.send_text(text, rec.seq)
            return not conn.closed
        texts = [json.dumps({"type": "window", **rec.window}, separators=(",", ":"))]
        texts += [json.dumps({"type": "frame_result", **fr}, separators=(",", ":")) for fr in rec.frames]
        body = rec.body
        if body is None or body.requested != encoding:  # from the long-poll: encode here
            body = await loop.run_in_executor(self.pool, protocol.encode_point_body, rec.points, rec.colors,
                                              encoding)
        data = protocol.frame_points(body, seq=rec.seq, window=rec.window.get("window", 0),
                                     frame_ids=rec.window.get("frame_ids", []))
        for t in texts:
            await conn.send_text(t, rec.seq)
        await conn.send_bytes(data, rec.seq)
        return not conn.closed
