"""The model deployment's batch logic, on its plain class (no Ray needed: @serve.batch only runs in replicas)."""

import numpy as np
import pytest
from pydantic import ValidationError

from serve_app.deployments.model_server import DA3ModelServer
from serve_app.evaluation.synthetic import SceneSpec, render_sequence
from serve_app.prediction import WindowRequest

SCENE = {"seed": 11, "num_frames": 8, "width": 154, "height": 112}


@pytest.fixture(scope="module")
def server():
    cls = DA3ModelServer.func_or_class
    return cls({"backend": "oracle", "oracle_scene": SCENE})


def test_poisoned_item_fails_alone(server):
    seq = render_sequence(SceneSpec.from_dict(SCENE))
    good = WindowRequest(images=seq.images[:3].copy())
    poison = WindowRequest(images=np.full((3, 112, 154, 3), 255, np.uint8))  # not a frame of the scene
    good2 = WindowRequest(images=seq.images[3:6].copy())
    res = server._run([good, poison, good2])
    assert [r["ok"] for r in res] == [True, False, True]
    assert "ValueError" in res[1]["error"]
    assert all(r["batch_size"] == 3 for r in res)
    assert len({r["started"] for r in res}) == 1  # one forward start, which infer() turns into batch_wait_ms
    assert res[0]["prediction"].images is None  # inputs are not shipped back to the ingress
    np.testing.assert_allclose(res[0]["prediction"].extrinsics[0], np.eye(4)[:3], atol=1e-6)
    assert server.failures == 1 and server.last_error == res[1]["error"]


def test_reconfigure_validates_batching(server):
    with pytest.raises(ValidationError, match="max_batch_size"):
        server.reconfigure({"max_batch_size": 0})
