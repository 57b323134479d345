"""The session store's persistence runs off its event loop (issue 19): a journal write that hangs (here: the
record file is a FIFO nobody reads yet, a real file sink that blocks the writer) stalls only its own session's
later writes, in order; every other call of the actor is answered meanwhile. No Ray: SessionActor is driven as a
plain object on an event loop, with the real journal backend."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np

from serve_app.config import LimitsConfig
from serve_app.deployments.session_actor import SessionActor
from serve_app.recon.reconstruction import FrameInput
from serve_app.sessions.serial_io import SerialRunner
from serve_app.sessions.session_journal import SessionJournal

LIMITS = LimitsConfig(max_in_flight=64).model_dump()
RELEASE_AFTER_S = 20.0  # a watchdog releases the sink after this: a blocked loop fails the test, never hangs it


def _frame(i: int) -> FrameInput:
    return FrameInput(index=i, frame_id=i, image=None, original_size=(28, 14), encoded=b"\xff\xd8jpeg%d" % i)


def _window(actor, sid, epoch, w, indices):
    frames = [{"index": i, "frame_id": i, "pose": np.eye(4).tolist()} for i in indices]
    pts = np.full((40, 3), w, np.float32)
    return actor.commit_window(sid, {"window": w}, frames, pts, np.zeros((40, 3), np.uint8), {"w": w},
                               epoch=epoch)


class FifoSink:
    """`path` becomes a FIFO: a writer blocks in open() until `release` reads it (or the watchdog does)."""

    def __init__(self, path):
        self.path = path
        os.mkfifo(path)
        self.data = b""
        self.by_watchdog = False
        self.released_at: float | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(RELEASE_AFTER_S, self._watchdog)
        self._timer.daemon = True
        self._timer.start()

    def _read(self) -> None:
        with self._lock:
            if self.released_at is not None:
                return
            self.released_at = time.monotonic()
            with open(self.path, "rb") as f:  # returns once the writer has written and closed
                self.data = f.read()

    def _watchdog(self) -> None:
        self.by_watchdog = True
        self._read()

    async def release(self) -> None:
        self._timer.cancel()
        await asyncio.to_thread(self._read)
        os.unlink(self.path)  # later appends go to a plain file


def test_a_hanging_journal_write_stalls_no_other_call(tmp_path):
    state_dir = tmp_path / "journal"

    async def run():
        actor = SessionActor(LIMITS, None, backend={"backend": "journal", "state_dir": str(state_dir)})
        a = (await actor.create({}, None))["session_id"]
        b = (await actor.create({}, None))["session_id"]
        ea = (await actor.take_worker(a)).epoch
        eb = (await actor.take_worker(b)).epoch
        await actor.accept_frame(a, None, ea, _frame(0), 0)
        sink = FifoSink(state_dir / f"{a}.rec")
        commit_a = asyncio.create_task(_window(actor, a, ea, 0, [0]))
        await asyncio.sleep(0.3)  # the commit's thread is now blocked opening the FIFO
        later_a = asyncio.create_task(actor.accept_frame(a, None, ea, _frame(1), 1))  # queued behind it

        # Session B, and A's in-memory state, are served meanwhile.
        t0 = time.monotonic()
        for i in range(4):
            assert await actor.accept_frame(b, None, eb, _frame(i), i) == i
        seq_b = (await _window(actor, b, eb, 0, range(4))).seq
        conn = "c1"
        await actor.attach(b, None, conn)
        got = await actor.wait_records(b, 0, conn, 5.0)
        info_a = await actor.info(a, None)
        listed = await actor.list(None)
        served_s = time.monotonic() - t0
        stalled = (not commit_a.done(), not later_a.done())

        await sink.release()
        seq_a = (await asyncio.wait_for(commit_a, 30)).seq
        assert await asyncio.wait_for(later_a, 30) == 1
        return a, b, sink, {"seq_b": seq_b, "got": got, "info_a": info_a, "listed": listed,
                            "served_s": served_s, "stalled": stalled, "seq_a": seq_a}

    a, b, sink, r = asyncio.run(run())
    assert not sink.by_watchdog, "the actor's loop was blocked until the watchdog released the write"
    assert r["stalled"] == (True, True)  # A's commit hung, and A's next write waited behind it (order)
    assert r["seq_b"] == 1 and [x.seq for x in r["got"].records] == [1]
    assert r["info_a"]["frames_received"] == 2 and len(r["listed"]["sessions"]) == 2
    assert r["served_s"] < RELEASE_AFTER_S
    assert r["seq_a"] == 1
    # What went through the FIFO is A's record, whole; the rest of A's state is on disk as usual.
    (tmp_path / "seen.rec").write_bytes(sink.data)
    recs = SessionJournal.read_records(tmp_path / "seen.rec")
    assert [x.seq for x in recs] == [1] and recs[0].frames[0]["index"] == 0
    reloaded = SessionActor(LIMITS, None, backend={"backend": "journal", "state_dir": str(tmp_path / "journal")})
    s = reloaded.store.sessions[a]
    assert s.frames_received == 2 and sorted(s.pending) == [1] and s.stream_state == {"w": 0}
    assert reloaded.store.sessions[b].frames_processed == 4


def test_serial_runner_keeps_call_order_per_key_and_runs_keys_in_parallel():
    log: list[tuple[str, int]] = []
    gate = threading.Event()

    def work(key: str, i: int, wait: bool) -> int:
        if wait:
            assert gate.wait(20)
        log.append((key, i))
        return i

    async def run():
        runner = SerialRunner(threads=4)
        first = asyncio.create_task(runner.run("a", work, "a", 0, True))  # blocks its thread until the gate
        await asyncio.sleep(0.05)
        rest_a = [asyncio.create_task(runner.run("a", work, "a", i, False)) for i in range(1, 6)]
        b = await asyncio.wait_for(runner.run("b", work, "b", 0, False), 10)  # another key: not held up
        held = runner.pending("a")
        gate.set()
        out = await asyncio.gather(first, *rest_a)
        runner.close()
        return b, held, out, runner.pending("a")

    b, held, out, left = asyncio.run(run())
    assert b == 0 and held == 6 and out == [0, 1, 2, 3, 4, 5] and left == 0
    assert log[0] == ("b", 0) and [i for k, i in log if k == "a"] == [0, 1, 2, 3, 4, 5]
