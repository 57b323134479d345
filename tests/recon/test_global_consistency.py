"""Global consistency through the real app (Ray Serve, oracle backend with realistic errors, WebSocket): loop
windows go through the model deployment, loops are reported in the window messages, and a session whose ingress
replica dies continues from the snapshot with its pose graph."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import ray
import websockets
from conftest import app_args, deploy

from serve_app.demo import wait_healthy
from serve_app.evaluation.synthetic import SceneSpec, render_sequence
from serve_app.media.imaging import encode_image
from serve_app.protocol import encode_frame_message

pytestmark = pytest.mark.ray

LOOP_SCENE = {"seed": 0, "num_frames": 60, "width": 154, "height": 112, "trajectory": "loop"}


@pytest.fixture(scope="module")
def consistency_app(serve_url):
    args = app_args(model={"backend": "oracle", "oracle_scene": LOOP_SCENE, "oracle_errors": "realistic",
                           "oracle_seed": 1},
                    session_defaults={"window_size": 6, "overlap": 2, "global_consistency": True})
    from ray import serve

    url = deploy(serve_url, "consistency", args)
    yield url
    serve.delete("consistency")  # every app holds a logical GPU: give it back for the modules after this one


def replica_actors(app: str, deployment: str):
    names = ray.util.list_named_actors(all_namespaces=True)
    return [ray.get_actor(n["name"], namespace=n["namespace"]) for n in names
            if n["name"].startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in n["name"]]


def wsurl(base, sid):
    return base.replace("http://", "ws://") + f"/ws/reconstruct/{sid}"


async def stream(ws, seq, ids, chunk: int = 8, id_offset: int = 0) -> tuple[dict, list]:
    """Send frames (at most `chunk` outstanding: the app's max_in_flight is 12), flush, collect frame_results and
    window messages until each frame has a result. Frame ids are the scene indices plus id_offset."""
    results, windows = {}, []
    for start in range(0, len(ids), chunk):
        part = [i + id_offset for i in ids[start:start + chunk]]
        for i in part:
            await ws.send(encode_frame_message(encode_image(seq.images[i - id_offset], "PNG"), {"frame_id": i}))
        await ws.send(json.dumps({"type": "flush"}))
        while not set(part) <= set(results):
            m = await asyncio.wait_for(ws.recv(), 180)
            if isinstance(m, str):
                m = json.loads(m)
                assert m["type"] != "error", m
                if m["type"] == "frame_result":
                    results[m["frame_id"]] = m
                elif m["type"] == "window":
                    windows.append(m)
    return results, windows


async def test_loops_are_closed_online_and_counted_in_the_window_messages(consistency_app):
    seq = render_sequence(SceneSpec.from_dict(LOOP_SCENE))
    url = consistency_app
    sid = (await asyncio.to_thread(httpx.post, url + "/ws/session/create", json={})).json()["session_id"]
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        await ws.recv()
        results, windows = await stream(ws, seq, list(range(50)))
        # The loop closes at the end: stream the rest in small steps so its verification (a loop window sent
        # to the model after a window's results) has finished before the last window is placed.
        for chunk in (range(50, 56), range(56, 60)):
            r, w = await stream(ws, seq, list(chunk))
            results.update(r)
            windows += w
            await asyncio.sleep(3.0)
        # Round the loop again (new frame ids): these windows report the loops accepted so far.
        r, w = await stream(ws, seq, [1, 2, 3, 4], id_offset=100)
        windows += w
    assert all(not r.get("failed") for r in results.values())
    counts = [w["alignment"]["loops_accepted"] for w in windows if w["alignment"].get("ok")]
    assert counts == sorted(counts) and counts[-1] >= 1  # cumulative, and the loop was found
    assert all(w["alignment"].get("rotation") == "cameras" for w in windows[1:] if w["alignment"].get("ok"))


async def test_a_session_with_a_pose_graph_survives_its_ingress_replica(consistency_app):
    seq = render_sequence(SceneSpec.from_dict(LOOP_SCENE))
    url = consistency_app
    sid = (await asyncio.to_thread(httpx.post, url + "/ws/session/create", json={})).json()["session_id"]
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        await ws.recv()
        first, _ = await stream(ws, seq, list(range(16)))
    for a in replica_actors("consistency", "Ingress"):
        ray.kill(a, no_restart=True)
    await asyncio.to_thread(wait_healthy, url, 180)
    async with websockets.connect(wsurl(url, sid), max_size=None) as ws:
        ready = json.loads(await ws.recv())
        assert ready["frames_processed"] == 16
        later, windows = await stream(ws, seq, list(range(16, 32)))
    assert all(not r.get("failed") for r in later.values())
    assert all("loops_accepted" in w["alignment"] for w in windows if w["alignment"].get("ok"))
    # One world across the replicas: the new frames continue the old ones' trajectory.
    from serve_app.recon.alignment import ate_rmse, trajectory_length

    poses = {**first, **later}
    idx = sorted(poses)
    rmse, _ = ate_rmse(np.array([poses[i]["pose"] for i in idx]), seq.c2w[idx])
    assert rmse / trajectory_length(seq.c2w[idx]) < 0.02
