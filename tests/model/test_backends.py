"""The model plug-in seam: `model.backend` as an import path, validated in the config, served by the real app."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import websockets
from conftest import SCENE, app_args, deployed

from serve_app.config import ModelConfig, parse_args
from serve_app.media.imaging import encode_image
from serve_app.model.backends import make_backend
from serve_app.prediction import WindowRequest
from serve_app.protocol import encode_frame_message
from serve_app.recon.alignment import ate_rmse

PLUGIN = "tests.model.backend_plugin:make_backend"


@pytest.mark.slow
def test_import_path_backend_is_built_with_its_args():
    cfg = ModelConfig(backend=PLUGIN, backend_args={"scene": SCENE, "label": "mine", "errors": "white"})
    backend = make_backend(cfg)
    assert backend.info()["model_name"] == "mine" and backend.info()["errors"]["pixel_noise"] == 0.02
    backend.health_check()
    pred = backend.forward_windows([WindowRequest(images=backend.inner.seq.images[:3])])[0]
    assert pred.depth.shape == (3, 112, 154) and pred.descriptors.shape == (3, 144)
    # Classes are factories too.
    assert ModelConfig(backend="tests.model.backend_plugin:NamedOracle").backend == "tests.model.backend_plugin:NamedOracle"
    assert ModelConfig(backend="oracle").backend == "oracle" and ModelConfig().backend == "da3"


@pytest.mark.parametrize("path,message", [
    ("no_such_package.mod:factory", "cannot import module 'no_such_package.mod'"),
    ("tests.model.backend_plugin:missing", "has no attribute 'missing'"),
    ("tests.model.backend_plugin:NOT_CALLABLE", "is not callable"),
    ("tests.model.backend_plugin:NoForward", "lacks the backend method(s) forward_windows"),
    ("tests.model.backend_plugin", "import path 'package.module:factory'"),
    ("orcale", "import path 'package.module:factory'"),
])
def test_bad_backend_is_a_config_error_naming_the_field(path, message):
    with pytest.raises(ValueError) as ei:
        parse_args({"model": {"backend": path}})
    text = str(ei.value)
    assert "model.backend" in text and message in text


def test_factory_returning_an_incomplete_backend_is_refused_when_built():
    cfg = ModelConfig(backend="tests.model.backend_plugin:make_incomplete")  # a function: checked once it has run
    with pytest.raises(ValueError, match=r"model\.backend: .*NoForward.*lacks forward_windows"):
        make_backend(cfg)


def test_factory_arguments_are_the_factorys_business():
    cfg = ModelConfig(backend=PLUGIN, backend_args={"scene": SCENE, "unknown": 1})
    with pytest.raises(TypeError, match="unknown"):
        make_backend(cfg)


async def stream_frames(url: str, images, n: int) -> dict:
    """Create a session, send n PNG frames, finalize; the frame_results by frame id."""
    async with httpx.AsyncClient(timeout=30) as c:
        sid = (await c.post(url + "/ws/session/create", json={})).json()["session_id"]
    results = {}
    async with websockets.connect(url.replace("http://", "ws://") + f"/ws/reconstruct/{sid}", max_size=None) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        for i in range(n):
            await ws.send(encode_frame_message(encode_image(images[i], "PNG"), {"frame_id": i}))
        await ws.send(json.dumps({"type": "finalize"}))

        async def read():
            async for raw in ws:
                if isinstance(raw, str) and (m := json.loads(raw))["type"] == "frame_result":
                    results[m["frame_id"]] = m

        try:
            await asyncio.wait_for(read(), 120)
        except websockets.ConnectionClosed:
            pass
    return results


def test_plugin_backend_served_through_the_real_app(serve_url, synthetic_seq):
    args = app_args(model={"backend": PLUGIN, "backend_args": {"scene": SCENE, "label": "plugin-oracle"}})
    with deployed(serve_url, "plugin", args) as url:
        health = httpx.get(url + "/healthz", timeout=30).json()
        assert health["model"]["model_name"] == "plugin-oracle" and health["model"]["backend"] == "plugin"
        n = 10
        results = asyncio.run(stream_frames(url, synthetic_seq.images, n))
        assert sorted(results) == list(range(n)) and not any(m.get("failed") for m in results.values())
        est = np.stack([np.asarray(results[i]["pose"]) for i in range(n)])
        err, _ = ate_rmse(est, synthetic_seq.c2w[:n])
        assert err < 1e-3  # the plug-in oracle answers with the truth: the stream recovers it
        assert httpx.get(url + "/healthz", timeout=30).json()["model"]["calls"] >= 2
