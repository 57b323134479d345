"""Faults with real processes: the session actor and a model replica are killed mid-stream."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import ray
import websockets

from serve_app.demo import wait_healthy
from serve_app.media.imaging import encode_image
from serve_app.protocol import decode_points, encode_frame_message

pytestmark = pytest.mark.ray


def wsurl(base, sid, **q):
    qs = "&".join(f"{k}={v}" for k, v in q.items())
    return base.replace("http://", "ws://") + f"/ws/reconstruct/{sid}" + (f"?{qs}" if qs else "")


async def send_and_wait(ws, seq, ids):
    """Send frames, wait until each has a frame_result; returns the frame_results seen."""
    results = {}
    for i in ids:
        await ws.send(encode_frame_message(encode_image(seq.images[i], "PNG"), {"frame_id": i}))
    await ws.send(json.dumps({"type": "flush"}))
    while not set(ids) <= set(results):
        m = await asyncio.wait_for(ws.recv(), 120)
        if isinstance(m, str):
            m = json.loads(m)
            if m["type"] == "frame_result":
                results[m["frame_id"]] = m
    return results


def replica_actors(app: str, deployment: str):
    names = ray.util.list_named_actors(all_namespaces=True)
    return [ray.get_actor(n["name"], namespace=n["namespace"]) for n in names
            if n["name"].startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in n["name"]]


async def test_session_actor_killed_recovers_from_journal(faults_app, synthetic_seq):
    url, args = faults_app
    sid = httpx.post(url + "/ws/session/create", json={}).json()["session_id"]
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        await ws.recv()
        first = await send_and_wait(ws, synthetic_seq, list(range(6)))
    before = httpx.get(f"{url}/ws/session/{sid}").json()
    assert before["frames_processed"] == 6

    actor = ray.get_actor(args["session_actor"]["name"], namespace=args["session_actor"]["namespace"])
    ray.kill(actor, no_restart=False)  # the actor restarts (max_restarts) and reloads its journal

    deadline = time.time() + 60
    while time.time() < deadline:
        r = httpx.get(f"{url}/ws/session/{sid}", timeout=10)
        if r.status_code == 200:
            break
        await asyncio.sleep(0.5)
    after = r.json()
    assert (after["frames_processed"], after["last_seq"], after["points_total"]) == (
        before["frames_processed"], before["last_seq"], before["points_total"])

    async with websockets.connect(wsurl(url, sid, resume_from=0), max_size=None) as ws:
        ready = json.loads(await ws.recv())
        assert ready["frames_received"] == 6
        more = await send_and_wait(ws, synthetic_seq, list(range(6, 10)))
        await ws.send(json.dumps({"type": "finalize"}))
        async for m in ws:
            if isinstance(m, bytes):
                decode_points(m)  # replayed and new chunks stay decodable
    # resume_from=0 replays the 6 results produced before the crash, then the new ones follow
    assert sorted(more) == list(range(10)) and sorted(first) == list(range(6))
    final = httpx.get(f"{url}/ws/session/{sid}").json()
    assert final["state"] == "complete" and final["frames_processed"] == 10
    assert len(httpx.get(f"{url}/ws/session/{sid}/trajectory.json").json()["frames"]) == 10


async def test_model_replica_killed_mid_stream(faults_app, synthetic_seq):
    url, _ = faults_app
    sid = httpx.post(url + "/ws/session/create", json={}).json()["session_id"]
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        await ws.recv()
        await send_and_wait(ws, synthetic_seq, list(range(4)))
        victims = replica_actors("faults", "DA3ModelServer")
        assert victims
        for a in victims:
            ray.kill(a, no_restart=True)  # the Serve controller starts a replacement
        res = await send_and_wait(ws, synthetic_seq, list(range(4, 12)))
    assert sorted(res) == list(range(4, 12))  # every accepted frame got a result
    placed = [r for r in res.values() if not r.get("failed")]
    assert placed, "the stream did not continue once a replica was back"
    info = httpx.get(f"{url}/ws/session/{sid}").json()
    assert info["frames_processed"] == 12


async def test_session_actor_restart_without_journal_reports_session_lost(lossy_app):
    url, args = lossy_app
    sid = httpx.post(url + "/ws/session/create", json={}).json()["session_id"]
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        actor = ray.get_actor(args["session_actor"]["name"], namespace=args["session_actor"]["namespace"])
        ray.kill(actor, no_restart=False)
        m = json.loads(await asyncio.wait_for(ws.recv(), 60))  # never a hang
        assert m["type"] == "error" and m["code"] == "SESSION_LOST" and m["fatal"] is True
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 30)
    assert ws.close_code == 4412
    # the restarted store serves new sessions
    assert httpx.post(url + "/ws/session/create", json={}, timeout=30).status_code == 201


async def test_ingress_replica_killed_session_continues_from_actor_snapshot(faults_app, synthetic_seq):
    """The session actor holds what the next window needs: a new ingress replica continues the same world."""
    import numpy as np

    from serve_app.recon.alignment import ate_rmse, trajectory_length

    url, _ = faults_app
    sid = httpx.post(url + "/ws/session/create", json={}).json()["session_id"]
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        await ws.recv()
        first = await send_and_wait(ws, synthetic_seq, list(range(8)))
    for a in replica_actors("faults", "Ingress"):
        ray.kill(a, no_restart=True)
    await asyncio.to_thread(wait_healthy, url, 120)
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        ready = json.loads(await ws.recv())
        assert ready["frames_processed"] == 8
        later = await send_and_wait(ws, synthetic_seq, list(range(8, 16)))
    assert all(not r.get("failed") for r in later.values())
    poses = {**first, **later}
    idx = sorted(poses)
    est = np.array([poses[i]["pose"] for i in idx])
    rmse, _ = ate_rmse(est, synthetic_seq.c2w[idx])
    assert rmse / trajectory_length(synthetic_seq.c2w[idx]) < 1e-3  # one consistent world across replicas


async def test_acked_frames_survive_an_ingress_crash_before_processing(faults_app, synthetic_seq):
    """An ack means the frame is stored in the session actor: frames acked but still waiting for a full window
    when the ingress replica dies are processed by the next replica, exactly once."""
    url, _ = faults_app
    sid = httpx.post(url + "/ws/session/create", json={}).json()["session_id"]
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        await ws.recv()
        for i in range(3):  # window_size is 4: these three wait for a fourth frame
            await ws.send(encode_frame_message(encode_image(synthetic_seq.images[i], "PNG"), {"frame_id": i}))
        acks = []
        while len(acks) < 3:
            m = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert m["type"] in ("ack", "progress"), m
            if m["type"] == "ack":
                acks.append(m["frame_id"])
    assert acks == [0, 1, 2]
    info = httpx.get(f"{url}/ws/session/{sid}").json()
    assert (info["frames_received"], info["frames_processed"], info["pending_frames"]) == (3, 0, 3)
    for a in replica_actors("faults", "Ingress"):
        ray.kill(a, no_restart=True)  # a crash: no drain, no goodbye
    await asyncio.to_thread(wait_healthy, url, 120)
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        ready = json.loads(await ws.recv())
        assert (ready["frames_received"], ready["in_flight"]) == (3, 3)
        res = await send_and_wait(ws, synthetic_seq, [3])
        await ws.send(json.dumps({"type": "finalize"}))
        async for m in ws:
            if isinstance(m, str) and json.loads(m)["type"] == "frame_result":
                res[json.loads(m)["frame_id"]] = json.loads(m)
    final = httpx.get(f"{url}/ws/session/{sid}").json()
    assert final["state"] == "complete" and final["frames_processed"] == 4 and final["pending_frames"] == 0
    traj = httpx.get(f"{url}/ws/session/{sid}/trajectory.json").json()["frames"]
    assert sorted(f["frame_id"] for f in traj) == [0, 1, 2, 3]  # each exactly once


async def test_slow_reader_is_paused_then_closed_and_can_resume(lossy_app, synthetic_seq):
    """A client that reads but never sends `received`: the server stops sending results at
    max_unacked_result_bytes (results keep being produced and stored), closes with SLOW_CONSUMER / 4408 after
    slow_reader_timeout_s, and a reconnect with resume_from gets the rest. Other sessions are unaffected."""
    from da3_client import Da3Client

    url, args = lossy_app
    limit = args["limits"]["max_unacked_result_bytes"]
    sid = httpx.post(url + "/ws/session/create", json={}).json()["session_id"]
    n = 12
    got: dict[int, int] = {}  # seq -> bytes of that record as received
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        await ws.recv()
        for i in range(n):
            await ws.send(encode_frame_message(encode_image(synthetic_seq.images[i], "PNG"), {"frame_id": i}))
        await ws.send(json.dumps({"type": "flush"}))
        # Meanwhile another session streams normally on the same app.
        async with Da3Client(url) as client:
            other = (await client.create_session())["session_id"]
            async with client.stream(other) as s:
                for i in range(8):
                    await s.send_frame(encode_image(synthetic_seq.images[i], "PNG"), frame_id=i)
                summary = await s.finalize(timeout=120)
        assert summary["frames_processed"] == 8
        error = None
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                m = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(m, bytes):
                    seq = decode_points(m).seq
                    got[seq] = got.get(seq, 0) + len(m)
                else:
                    msg = json.loads(m)
                    if msg["type"] in ("window", "frame_result"):
                        got[msg["seq"]] = got.get(msg["seq"], 0) + len(m)
                    elif msg["type"] == "error":
                        error = msg
    assert ws.close_code == 4408 and error["code"] == "SLOW_CONSUMER" and error["fatal"]
    info = httpx.get(f"{url}/ws/session/{sid}").json()
    assert info["frames_processed"] == n  # processing never waited for the reader
    sent = sorted(got)
    assert sent == list(range(1, len(sent) + 1)) and len(sent) < info["last_seq"]  # paused before the end
    assert sum(got[q] for q in sent[:-1]) < limit  # the last record sent is the one that crossed the limit
    # Reconnect from the last record read, acknowledging this time: everything else arrives.
    rest = []
    async with websockets.connect(wsurl(url, sid, resume_from=sent[-1]), max_size=None) as ws:
        await ws.recv()
        while len(rest) < info["last_seq"] - sent[-1]:
            m = await asyncio.wait_for(ws.recv(), 30)
            if isinstance(m, bytes):
                rest.append(decode_points(m).seq)
                await ws.send(json.dumps({"type": "received", "seq": rest[-1]}))
    assert rest == list(range(sent[-1] + 1, info["last_seq"] + 1))


async def test_redeploy_mid_stream_closes_with_1012_and_the_client_resumes(faults_app, synthetic_seq):
    """A redeploy drains the ingress replica: its streams are closed with 1012 at the start of the drain, the
    client library reconnects to the new replica, and every frame is processed exactly once."""
    from da3_client import Da3Client
    from ray import serve

    from serve_app.app import build_app

    url, args = faults_app
    n = len(synthetic_seq.images)
    async with Da3Client(url, timeout=60) as client:
        sid = (await client.create_session())["session_id"]
        async with client.stream(sid, max_reconnects=10) as s:
            redeploy = None
            for i in range(n):
                await s.send_frame(encode_image(synthetic_seq.images[i], "PNG"), frame_id=i)
                if i == 6:  # a new version of the whole app: Serve replaces every replica
                    redeploy = asyncio.create_task(asyncio.to_thread(
                        serve.run, build_app(args), name="faults", route_prefix="/faults", blocking=False))
                await asyncio.sleep(0.2)
            await redeploy
            summary = await s.finalize(timeout=300)
    assert 1012 in s.reconnect_codes, s.reconnect_codes
    assert summary["frames_received"] == n and summary["frames_processed"] == n
    traj = httpx.get(f"{url}/ws/session/{sid}/trajectory.json").json()["frames"]
    assert sorted(f["frame_id"] for f in traj) == list(range(n))  # nothing lost, nothing twice
    assert not s.rejected
    # Finished and disconnected sessions do not stay in the ingress replica's memory.
    deadline = time.time() + 30
    while (workers := httpx.get(f"{url}/stats").json()["workers"]) and time.time() < deadline:
        await asyncio.sleep(0.5)
    assert workers == 0
