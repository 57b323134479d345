"""Prometheus metrics from the running app, scraped from Ray's metrics export port."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import pytest
import websockets

from serve_app.media.imaging import encode_image
from serve_app.protocol import encode_frame_message

pytestmark = pytest.mark.ray


def scrape() -> str:
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def value(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            m = re.match(rf"{name}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)", line)
            if m:
                total += float(m.group(2))
    return total


async def test_metrics_count_frames_batches_and_errors(serve_url, synthetic_seq):
    sid = httpx.post(serve_url + "/ws/session/create", json={}).json()["session_id"]
    url = serve_url.replace("http://", "ws://") + f"/ws/reconstruct/{sid}"
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()
        await ws.send(b"not an image")
        for i in range(4):
            await ws.send(encode_frame_message(encode_image(synthetic_seq.images[i], "PNG"), {"frame_id": i}))
        await ws.send(json.dumps({"type": "finalize"}))
        async for m in ws:
            if isinstance(m, str) and json.loads(m)["type"] == "summary":
                break
    deadline = time.time() + 60
    while True:
        text = scrape()
        ok = (value(text, "ray_da3_frames_in_total") >= 4 and value(text, "ray_da3_frames_out_total") >= 4
              and value(text, "ray_da3_errors_total", code="INVALID_IMAGE") >= 1
              and value(text, "ray_da3_batch_size_count") >= 1
              and value(text, "ray_da3_window_latency_ms_count") >= 1)
        if ok or time.time() > deadline:
            break
        await asyncio.sleep(2)
    assert ok, [line for line in text.splitlines() if "da3_" in line][:40]
