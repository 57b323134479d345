"""The floor of the service's shape: a window's hops with no work in them (bench/serving.py section (g)).

A client sends a frame over a WebSocket through Serve's proxy to a FastAPI ingress, which calls a model deployment
with a window-sized request (the reply, window-sized too, comes back at once), stores a record- and snapshot-sized
commit in a named actor and sends a window message plus a points-sized message back: the hops the last frame of a
window takes in the app, without decoding, planning, the forward, geometry or encoding. (f)'s overhead minus this
floor is what the app's own code adds; the floor itself is what Ray Serve costs on this machine.
"""

# No `from __future__ import annotations`: FastAPI must see the WebSocket annotation as a class.
import asyncio
import json
import statistics
import time

import numpy as np
import ray
import websockets
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from ray import serve

APP_NAME = "floor"
STORE_NAMESPACE = "da3-serve-bench"


@ray.remote(num_cpus=0, max_concurrency=1000)
class FloorStore:
    async def commit(self, window: dict, points: np.ndarray, colors: np.ndarray, snapshot: bytes) -> int:
        return len(points)


@serve.deployment(max_ongoing_requests=64)
class FloorModel:
    async def infer(self, images: np.ndarray) -> dict:
        n, h, w = images.shape[:3]
        return {"ok": True, "depth": np.ones((n, h, w), np.float32), "conf": np.ones((n, h, w), np.float32),
                "extrinsics": np.zeros((n, 3, 4), np.float32), "intrinsics": np.zeros((n, 3, 3), np.float32)}


api = FastAPI()


@serve.deployment(max_ongoing_requests=1000)
@serve.ingress(api)
class FloorIngress:
    def __init__(self, model, window_shape: list[int], points: int, snapshot_bytes: int, store_name: str):
        self.model = model
        self.images = np.zeros(window_shape, np.uint8)
        self.points = np.zeros((points, 3), np.float32)
        self.colors = np.zeros((points, 3), np.uint8)
        self.snapshot = bytes(snapshot_bytes)
        self.body = bytes(9 * points + 64)  # a float16 points message: 9 bytes per point plus its header
        self.store = FloorStore.options(name=store_name, namespace=STORE_NAMESPACE, get_if_exists=True).remote()

    @api.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.receive_bytes()
                t0 = time.perf_counter()
                await self.model.infer.remote(self.images)
                t1 = time.perf_counter()
                await self.store.commit.remote({"window": 0}, self.points, self.colors, self.snapshot)
                t2 = time.perf_counter()
                await websocket.send_text(json.dumps({"model_ms": (t1 - t0) * 1e3, "commit_ms": (t2 - t1) * 1e3}))
                await websocket.send_bytes(self.body)
        except WebSocketDisconnect:
            pass


def deploy(window_shape: tuple[int, ...], points: int, snapshot_bytes: int) -> None:
    """Deploy the floor app next to the benchmark's app (same Ray, same proxy)."""
    store = f"floor_store_{int(time.time())}"
    serve.run(FloorIngress.bind(FloorModel.bind(), list(window_shape), points, snapshot_bytes, store),
              name=APP_NAME, route_prefix=f"/{APP_NAME}")


def remove() -> None:
    serve.delete(APP_NAME)  # the store actor goes with its owner, the floor ingress


async def measure(base_url: str, frame: bytes, rounds: int = 40, interval_s: float = 0.2) -> dict:
    """p50 ms over `rounds` (the first 3 warm up): frame sent -> points message received (`total`), the model
    and commit hops as the ingress timed them, and the rest (proxy in and out, the WebSocket sends)."""
    url = base_url.replace("http://", "ws://") + f"/{APP_NAME}/ws"
    rows = []
    async with websockets.connect(url, max_size=64 * 2**20, open_timeout=60, ping_interval=None,
                                  compression=None) as ws:
        for i in range(rounds):
            t0 = time.perf_counter()
            await ws.send(frame)
            hop = json.loads(await asyncio.wait_for(ws.recv(), 30))
            await asyncio.wait_for(ws.recv(), 30)
            total = (time.perf_counter() - t0) * 1e3
            if i >= 3:
                rows.append({"total": total, "model": hop["model_ms"], "commit": hop["commit_ms"],
                             "proxy": total - hop["model_ms"] - hop["commit_ms"]})
            await asyncio.sleep(interval_s)  # paced, like (f): each round finds the box idle
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} | {"rounds": len(rows)}
