"""Group commit of accepted frames (serve_app/sessions/accept_batch.py, issue 19): frames that several streams of
one ingress replica send while an accept call to their shard is out go together in one store call, and each
caller is answered for its own frame only once the store holds it. No Ray: the real SessionActor is driven in
this process through the ingress's own SessionShards, with the memory and the journal backends."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from conftest import InProcess

from serve_app.config import LimitsConfig
from serve_app.deployments.session_actor import SessionActor, SessionShards
from serve_app.errors import ErrorCode, ServiceError
from serve_app.recon.reconstruction import FrameInput
from serve_app.sessions.accept_batch import AcceptBatcher

LIMITS = LimitsConfig(max_in_flight=64).model_dump()


def _frame(sid: str, i: int) -> FrameInput:
    return FrameInput(index=-1, frame_id=f"{sid[-4:]}-{i}", image=None, original_size=(28, 14),
                      encoded=b"\xff\xd8jpeg-%s-%d" % (sid.encode(), i))


async def _sessions(actor: SessionActor, n: int) -> list[tuple[str, int]]:
    out = []
    for _ in range(n):
        sid = (await actor.create({}, None))["session_id"]
        out.append((sid, (await actor.take_worker(sid)).epoch))
    return out


async def _stream(shards: SessionShards, sid: str, epoch: int, frames: int, answers: list) -> None:
    """One stream as the ingress runs it: a frame is sent once the last one was acked (stored)."""
    for i in range(frames):
        answers.append(await shards.accept_frame(sid, None, epoch, _frame(sid, i), i))


def _check_stored(actor: SessionActor, sid: str, frames: int) -> None:
    s = actor.store.sessions[sid]
    assert s.frames_received == frames
    assert sorted(s.pending) == list(range(frames))
    for i in range(frames):  # every frame kept, at its own index, with its own bytes
        assert s.pending[i].encoded == _frame(sid, i).encoded and s.pending[i].index == i


def _backend(kind: str, request, tmp_path) -> dict | None:
    if kind == "journal":
        return {"backend": "journal", "state_dir": str(tmp_path / "j")}
    if kind == "redis":  # a real redis-server (conftest's redis_url), own key prefix
        return {"backend": "redis", "redis_url": request.getfixturevalue("redis_url"),
                "name": f"t_{uuid.uuid4().hex[:8]}", "namespace": "tests"}
    return None


@pytest.mark.parametrize("backend", ["memory", "journal", "redis"])
def test_batched_accepts_keep_every_frame_in_order_and_answer_each(backend, request, tmp_path):
    cfg = _backend(backend, request, tmp_path)

    async def run():
        actor = SessionActor(LIMITS, backend=cfg)
        sessions = await _sessions(actor, 6)
        shards = SessionShards([InProcess(actor)], accept_batch=4)
        answers = {sid: [] for sid, _ in sessions}
        await asyncio.gather(*[_stream(shards, sid, ep, 10, answers[sid]) for sid, ep in sessions])
        for sid, _ in sessions:
            assert answers[sid] == list(range(10))  # each caller got its own frame's index
            _check_stored(actor, sid, 10)
        return sessions, shards.accept_counts()

    sessions, counts = asyncio.run(run())
    assert counts["frames"] == 60
    assert counts["calls"] < 60  # frames that arrived together shared a call
    if cfg is not None:  # acked means persisted: a restarted store has every frame, in order
        again = SessionActor(LIMITS, backend=cfg)
        for sid, _ in sessions:
            _check_stored(again, sid, 10)


def test_one_refused_frame_does_not_touch_the_others_of_its_call():
    async def run():
        actor = SessionActor(LIMITS)
        (a, ea), (b, eb) = await _sessions(actor, 2)
        stale = ea
        ea = (await actor.take_worker(a)).epoch  # a's worker was taken over: the old epoch is fenced
        items = [(b, None, eb, _frame(b, 0), 0), (a, None, stale, _frame(a, 0), 0), (b, None, eb, _frame(b, 1), 1),
                 (a, None, ea, _frame(a, 0), 0)]
        got = await actor.accept_frames(items)
        assert got[0] == 0 and got[2] == 1 and got[3] == 0
        assert isinstance(got[1], ServiceError) and got[1].code is ErrorCode.SESSION_BUSY
        _check_stored(actor, b, 2)
        _check_stored(actor, a, 1)

        # through the ingress's batcher: the refused caller gets its error, the others their indices
        shards = SessionShards([InProcess(actor)], accept_batch=8)
        res = await asyncio.gather(shards.accept_frame(b, None, eb, _frame(b, 2), 2),
                                   shards.accept_frame(a, None, stale, _frame(a, 1), 1),
                                   shards.accept_frame(a, None, ea, _frame(a, 1), 1), return_exceptions=True)
        assert res[0] == 2 and res[2] == 1
        assert isinstance(res[1], ServiceError) and res[1].code is ErrorCode.SESSION_BUSY
        assert shards.accept_counts() == {"calls": 1, "frames": 3}
        _check_stored(actor, a, 2)
        _check_stored(actor, b, 3)

    asyncio.run(run())


def test_a_failed_call_fails_every_frame_in_it_and_the_batcher_goes_on():
    calls: list[list] = []

    async def send(items):
        calls.append(items)
        await asyncio.sleep(0.01)  # the call is out: later frames queue
        if len(calls) == 2:
            raise ConnectionError("store gone")
        return [it[4] for it in items]

    async def run():
        b = AcceptBatcher(send, max_batch=3)
        first = asyncio.ensure_future(b.accept("s0", None, 1, "f", 0))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(b.accept(f"s{k}", None, 1, "f", k)) for k in range(1, 6)]
        res = await asyncio.gather(first, *rest, return_exceptions=True)
        assert res[0] == 0
        assert all(isinstance(r, ConnectionError) for r in res[1:4])  # the failed call's three frames
        assert res[4:] == [4, 5]  # the next call went out all the same
        assert [len(c) for c in calls] == [1, 3, 2]  # max_batch caps a call
        assert await b.accept("s9", None, 1, "f", 9) == 9  # idle again: the next frame goes at once

    asyncio.run(run())


def test_accept_batch_1_sends_one_accept_frame_call_per_frame():
    async def run():
        actor = SessionActor(LIMITS)
        [(sid, ep)] = await _sessions(actor, 1)
        shards = SessionShards([InProcess(actor)], accept_batch=1)
        assert [await shards.accept_frame(sid, None, ep, _frame(sid, i), i) for i in range(3)] == [0, 1, 2]
        assert shards.accept_counts() == {"calls": 0, "frames": 0}  # no batcher involved
        _check_stored(actor, sid, 3)

    asyncio.run(run())
