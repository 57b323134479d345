"""The ingress's result streaming and flow control without FastAPI or Ray: the ResultStreaming room driven against
the session-store actor's class in this process, over an in-memory socket (the interface Connection writes to)."""

import asyncio
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import InProcess

from serve_app.config import AppArgs, LimitsConfig
from serve_app.deployments.session_actor import SessionActor
from serve_app.ingress.connection import Connection, LocalRecords
from serve_app.ingress.results import ResultStreaming
from serve_app.recon import corrections as C
from serve_app.recon.geometry import Sim3
from serve_app.recon.plan import FrameInput
from serve_app.sessions.session_store import ResultRecord


class MemorySocket:
    """What Connection needs of a WebSocket: sends and a close, recorded in order."""

    def __init__(self):
        self.sent: list = []
        self.closed_with: int | None = None
        self.changed = asyncio.Event()

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))
        self.changed.set()

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)
        self.changed.set()

    async def close(self, code: int, reason: str = "") -> None:
        self.closed_with = code
        self.changed.set()


class Shards:
    def __init__(self, actor):
        self.handle = InProcess(actor)

    def of(self, sid):
        return self.handle


class Streamer(ResultStreaming):
    """The state the room reads from its Ingress replica."""

    def __init__(self, actor, limits: LimitsConfig):
        self.args = AppArgs.model_validate({"limits": limits.model_dump()})
        self.store = Shards(actor)
        self.pool = ThreadPoolExecutor(2)
        self.records_sent: Counter = Counter()
        self.errors: Counter = Counter()

    def _count_error(self, code, session_id=None):
        self.errors[code] += 1


async def _session(actor, windows: int, points: int = 50):
    sid = (await actor.create({}, None))["session_id"]
    epoch = (await actor.take_worker(sid)).epoch
    for w in range(windows):
        i = await actor.accept_frame(sid, None, epoch, FrameInput(index=w, frame_id=f"f{w}", image=None,
                                                                  original_size=(8, 4), encoded=b"x"), index=w)
        pts = np.full((points, 3), w, np.float32)
        reply = await actor.commit_window(sid, {"window": w, "frame_ids": [f"f{w}"]},
                                          [{"index": i, "frame_id": f"f{w}"}], pts, np.zeros((points, 3), np.uint8),
                                          None, epoch=epoch)
        assert reply.stored
    return sid, epoch


def _kinds(sent) -> list:
    return ["points" if isinstance(m, bytes) else m["type"] for m in sent]


def test_records_replay_in_seq_order_then_the_summary_closes_the_stream():
    async def run():
        actor = SessionActor(LimitsConfig().model_dump())
        sid, epoch = await _session(actor, 3)
        msg = C.to_message(C.Correction(1, {0: Sim3(1.0, np.eye(3), np.ones(3))}))
        assert (await actor.commit_correction(sid, msg, epoch)).seq == 4
        await actor.set_state(sid, "complete")
        host = Streamer(actor, LimitsConfig())
        sock = MemorySocket()
        conn = Connection(sock, limits=host.args.limits)
        await actor.attach(sid, None, conn.id)
        local = LocalRecords(host.args.limits.max_unacked_result_bytes)
        await asyncio.wait_for(host._send_results(conn, sid, 0, "float16", local, epoch), 30)
        return sock, host

    sock, host = asyncio.run(run())
    assert _kinds(sock.sent) == ["window", "frame_result", "points"] * 3 + ["correction", "summary"]
    assert [m["seq"] for m in sock.sent if isinstance(m, dict) and m["type"] == "window"] == [1, 2, 3]
    assert sock.sent[-1]["frames_processed"] == 3 and sock.closed_with == 1000
    assert host.records_sent["long_poll"] == 4


def test_the_sender_pauses_until_the_client_acknowledges():
    """max_unacked_result_bytes (1 KiB) below one record (about 4 KB): one record at a time, the next only after
    `received`."""
    async def run():
        actor = SessionActor(LimitsConfig().model_dump())
        sid, epoch = await _session(actor, 3, points=600)
        limits = LimitsConfig(max_unacked_result_bytes=1024, slow_reader_timeout_s=30)
        host = Streamer(actor, limits)
        sock = MemorySocket()
        conn = Connection(sock, limits=limits)
        await actor.attach(sid, None, conn.id)
        sender = asyncio.ensure_future(host._send_results(conn, sid, 0, "float16", LocalRecords(1024), epoch))
        seen = []
        for seq in (1, 2, 3):
            while sum(1 for m in sock.sent if isinstance(m, bytes)) < seq:
                sock.changed.clear()
                await asyncio.wait_for(sock.changed.wait(), 10)
            await asyncio.sleep(0.2)  # room to (wrongly) send the next record before the ack
            seen.append(sum(1 for m in sock.sent if isinstance(m, bytes)))
            conn.on_received(seq)
        await actor.set_state(sid, "complete")
        await asyncio.wait_for(sender, 30)
        return seen, sock

    seen, sock = asyncio.run(run())
    assert seen == [1, 2, 3]  # never ahead of the acknowledgements
    assert sock.sent[-1]["type"] == "summary"


def test_local_records_over_their_byte_budget_are_left_to_the_long_poll():
    recs = [ResultRecord(seq=i, window={"window": i}, frames=[], points=np.zeros((100, 3), np.float32),
                         colors=np.zeros((100, 3), np.uint8)) for i in (1, 2)]
    local = LocalRecords(max_bytes=recs[0].nbytes)
    local.put(recs[0])
    local.put(recs[1])  # over the budget: not queued, and the sender is told to ask the actor for everything
    assert local.missed and local.get_nowait() is recs[0] and local.queue.empty() and local.nbytes == 0
