"""DA3Runtime on CPU with a random-init da3-small saved to disk and loaded like a hub checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_checkpoint import MODEL, make_hf_cache, random_net, save_checkpoint

from serve_app.errors import ServiceError
from serve_app.model.preprocess import normalize_images
from serve_app.model.runtime import DA3Runtime, default_intrinsics, normalize_prior_extrinsics
from serve_app.prediction import WindowPrediction, WindowRequest

# Builds and runs the DA3 network: the second tier (`make test-e2e`), not `make test-fast`.
pytestmark = pytest.mark.slow

REPO = "someorg/da3-small-test"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
H, W = 56, 84


def window(n: int, seed: int, h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def net():
    return random_net(7)


@pytest.fixture(scope="module")
def ckpt_dir(net, tmp_path_factory) -> Path:
    return save_checkpoint(net, tmp_path_factory.mktemp("ckpt") / "weights")


@pytest.fixture(scope="module")
def hub_cache(ckpt_dir, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf")
    make_hf_cache(cache, REPO, ckpt_dir, COMMIT)
    return cache


@pytest.fixture(scope="module")
def runtime(hub_cache) -> DA3Runtime:
    # The same path a configured hub id takes, served from the local HF cache.
    return DA3Runtime(REPO, cache_dir=str(hub_cache), local_files_only=True, device="cpu")


def direct_forward(net, images: np.ndarray) -> dict:
    with torch.inference_mode():
        return net(normalize_images(torch.from_numpy(images))[None])


def assert_prediction_close(a: WindowPrediction, b: WindowPrediction, atol: float = 1e-4) -> None:
    np.testing.assert_allclose(a.depth, b.depth, atol=atol)
    np.testing.assert_allclose(a.conf, b.conf, atol=atol)
    np.testing.assert_allclose(a.extrinsics, b.extrinsics, atol=atol)
    np.testing.assert_allclose(a.intrinsics, b.intrinsics, rtol=1e-5)  # hundreds of px


# ---------------------------------------------------------------------------------------------


def test_runtime_from_hub_cache_matches_in_memory_network(runtime, net):
    assert runtime.resolved.source == "hub"
    assert runtime.model_name == MODEL and runtime.any_view and not runtime.is_metric
    imgs = window(3, seed=1)
    pred = runtime.forward_windows([WindowRequest(images=imgs)])[0]
    ref = direct_forward(net, imgs)
    np.testing.assert_allclose(pred.depth, ref["depth"][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.conf, ref["depth_conf"][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.extrinsics, ref["extrinsics"][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.intrinsics, ref["intrinsics"][0].numpy(), rtol=1e-5)


def test_runtime_from_hub_id_with_offline_env(hub_cache, net, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rt = DA3Runtime(f"{REPO}@{COMMIT}", cache_dir=str(hub_cache), model_name=MODEL)
    imgs = window(2, seed=2)
    pred = rt.forward_windows([WindowRequest(images=imgs)])[0]
    np.testing.assert_allclose(pred.depth, direct_forward(net, imgs)["depth"][0].numpy(), atol=1e-5)


def test_runtime_from_local_directory(ckpt_dir, runtime):
    rt = DA3Runtime(str(ckpt_dir))
    assert rt.resolved.source == "local"
    req = WindowRequest(images=window(2, seed=3))
    assert_prediction_close(rt.forward_windows([req])[0], runtime.forward_windows([req])[0], atol=1e-6)


def test_prediction_shapes_and_dtypes(runtime):
    imgs = window(3, seed=4)
    t0 = time.perf_counter()
    pred = runtime.forward_windows([WindowRequest(images=imgs, tag="t")])[0]
    elapsed = time.perf_counter() - t0
    assert isinstance(pred, WindowPrediction)
    assert pred.depth.shape == (3, H, W) and pred.depth.dtype == np.float32
    assert pred.conf.shape == (3, H, W) and pred.conf.dtype == np.float32
    assert pred.extrinsics.shape == (3, 3, 4) and pred.extrinsics.dtype == np.float32
    assert pred.intrinsics.shape == (3, 3, 3) and pred.intrinsics.dtype == np.float32
    assert pred.images is imgs
    assert pred.is_metric is False
    assert pred.timings["model_ms"] > 0
    stages = [pred.timings[k] for k in ("prep_ms", "model_ms", "fetch_ms", "post_ms")]
    assert all(t >= 0 for t in stages) and sum(stages) < 1000.0 * elapsed
    assert np.isfinite(pred.depth).all() and (pred.depth > 0).all()


def test_batched_equals_single_forwards(runtime):
    reqs = [WindowRequest(images=window(3, seed=10 + i), tag=str(i)) for i in range(3)]
    batched = runtime.forward_windows(reqs)
    assert all(p.timings["batch_size"] == 3 for p in batched)
    for req, pred in zip(reqs, batched):
        single = runtime.forward_windows([req])[0]
        assert single.timings["batch_size"] == 1
        assert pred.images is req.images
        assert_prediction_close(pred, single, atol=1e-4)
    # the three windows differ, so a mix-up would show
    assert np.abs(batched[0].depth - batched[1].depth).max() > 1e-3
    # Per-view descriptors from the same forward: unit norm, and batching does not change them.
    for req, pred in zip(reqs, batched):
        single = runtime.forward_windows([req])[0]
        assert pred.descriptors is not None and pred.descriptors.shape[0] == 3
        np.testing.assert_allclose(np.linalg.norm(pred.descriptors, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(pred.descriptors, single.descriptors, atol=1e-4)
    assert np.abs(batched[0].descriptors - batched[1].descriptors).max() > 1e-4


def test_mixed_shapes_keep_request_order(runtime):
    reqs = [WindowRequest(images=window(2, seed=20)), WindowRequest(images=window(3, seed=21, h=42, w=56)),
            WindowRequest(images=window(2, seed=22)), WindowRequest(images=window(2, seed=23, h=42, w=56))]
    preds = runtime.forward_windows(reqs)
    assert [p.images is r.images for p, r in zip(preds, reqs)] == [True] * 4
    for req, pred in zip(reqs, preds):
        assert pred.depth.shape == req.images.shape[:3]
        assert_prediction_close(pred, runtime.forward_windows([req])[0], atol=1e-4)


def test_view_order_follows_input_order(runtime):
    """Permuting a window's views permutes the outputs the same way (DA3 reorders around its reference
    view internally and must restore the order)."""
    imgs = window(4, seed=30)
    base = runtime.forward_windows([WindowRequest(images=imgs)])[0]
    # views differ from each other by much more than the tolerance below
    assert min(np.abs(base.depth[i] - base.depth[j]).max() for i in range(4) for j in range(i)) > 1e-3
    perm = [2, 0, 3, 1]
    permuted = runtime.forward_windows([WindowRequest(images=imgs[perm])])[0]
    np.testing.assert_allclose(permuted.depth, base.depth[perm], atol=1e-4)
    np.testing.assert_allclose(permuted.conf, base.conf[perm], atol=1e-4)
    np.testing.assert_allclose(permuted.extrinsics, base.extrinsics[perm], atol=1e-4)
    np.testing.assert_allclose(permuted.descriptors, base.descriptors[perm], atol=1e-4)


def _poses(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.tile(np.eye(4), (n, 1, 1))
    for i in range(n):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        out[i, :3, :3] = q * np.sign(np.linalg.det(q))
        out[i, :3, 3] = rng.normal(size=3) * 3
    return out


def test_prior_normalisation_is_world_invariant():
    w2c = torch.from_numpy(_poses(4, seed=0))[None]
    norm = normalize_prior_extrinsics(w2c)
    torch.testing.assert_close(norm[0, 0], torch.eye(4, dtype=norm.dtype))
    centres = -(norm[0, :, :3, :3].mT @ norm[0, :, :3, 3:])[..., 0]
    assert torch.median(centres.norm(dim=-1)).item() == pytest.approx(1.0)
    # a similarity change of world coordinates (rotation, translation, scale 5) changes nothing
    S = torch.from_numpy(_poses(1, seed=1)[0])
    moved = w2c @ torch.linalg.inv(S)
    moved[..., :3, 3] *= 5.0
    torch.testing.assert_close(normalize_prior_extrinsics(moved), norm)


def test_priors_condition_the_network(runtime):
    imgs = window(3, seed=40)
    K = default_intrinsics(H, W, 3)
    with_priors = WindowRequest(images=imgs, extrinsics=_poses(3, seed=2), intrinsics=K)
    plain = runtime.forward_windows([WindowRequest(images=imgs)])[0]
    pred = runtime.forward_windows([with_priors])[0]
    assert pred.extrinsics.shape == (3, 3, 4) and pred.depth.shape == (3, H, W)
    assert np.abs(pred.depth - plain.depth).max() > 1e-4
    # batched windows with priors match single ones too (normalisation is per window)
    other = WindowRequest(images=window(3, seed=41), extrinsics=_poses(3, seed=3), intrinsics=K)
    batched = runtime.forward_windows([with_priors, other])
    assert_prediction_close(batched[0], pred)
    assert_prediction_close(batched[1], runtime.forward_windows([other])[0])


def test_bad_requests_rejected(runtime):
    with pytest.raises(ValueError, match="multiples of 14"):
        runtime.forward_windows([WindowRequest(images=window(2, seed=0, h=50, w=84))])
    with pytest.raises(ValueError, match="uint8"):
        runtime.forward_windows([WindowRequest(images=window(2, seed=0).astype(np.float32))])
    with pytest.raises(ValueError, match="need intrinsics"):
        runtime.forward_windows([WindowRequest(images=window(2, seed=0), extrinsics=_poses(2, 0))])
    with pytest.raises(ValueError, match=r"\(2, 3, 3\)"):
        runtime.forward_windows([WindowRequest(images=window(2, seed=0), intrinsics=np.eye(3))])


def test_health_check_info_and_amp(runtime):
    assert runtime.health_check()["ok"] is True
    info = runtime.info()
    assert info["model_name"] == MODEL and info["source"] == "hub" and info["amp"] == "float32"
    assert info["device"] == "cpu" and info["any_view"] is True
    runtime.warmup([(28, 28)], views=2, batch=2)


def test_health_check_reports_broken_model(runtime, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    monkeypatch.setattr(runtime, "_forward", broken)
    with pytest.raises(ServiceError, match="MODEL_UNAVAILABLE.*health check.*device-side assert"):
        runtime.health_check()


def test_invalid_runtime_options():
    with pytest.raises(ValueError, match="amp"):
        DA3Runtime(f"random:{MODEL}", amp="int8")
    with pytest.raises(ValueError, match="ref_view_strategy"):
        DA3Runtime(f"random:{MODEL}", ref_view_strategy="best")


def test_single_view_metric_model_runs_per_window():
    """da3metric-large has no camera head: windows run one at a time, depth is scaled by focal / 300,
    cameras come from the priors (or identity and a default pinhole)."""
    rt = DA3Runtime("random:da3metric-large")
    assert not rt.any_view and rt.is_metric and not rt.has_camera_head
    K = np.array([[60.0, 0, 14], [0, 40.0, 14], [0, 0, 1]], np.float32)[None].repeat(2, 0)
    E = _poses(2, seed=5).astype(np.float32)
    a = WindowRequest(images=window(2, seed=50, h=28, w=28), extrinsics=E, intrinsics=K)
    b = WindowRequest(images=window(2, seed=51, h=28, w=28))
    pa, pb = rt.forward_windows([a, b])
    assert pa.timings["batch_size"] == 1 and pb.timings["batch_size"] == 1
    assert pa.is_metric and pa.depth.shape == (2, 28, 28)
    raw = direct_forward(rt.net, a.images)["depth"][0].numpy()
    np.testing.assert_allclose(pa.depth, raw * 50.0 / 300.0, rtol=1e-5)
    np.testing.assert_allclose(pa.extrinsics, E[:, :3], rtol=1e-6)
    np.testing.assert_array_equal(pa.intrinsics, K)
    np.testing.assert_array_equal(pb.extrinsics, np.tile(np.eye(4, dtype=np.float32)[:3], (2, 1, 1)))
    np.testing.assert_allclose(pb.intrinsics, default_intrinsics(28, 28, 2))
    raw_b = direct_forward(rt.net, b.images)["depth"][0].numpy()
    np.testing.assert_allclose(pb.depth, raw_b * pb.intrinsics[0, 0, 0] / 300.0, rtol=1e-5)


def test_compiled_runtime_warms_up_and_never_recompiles(net):
    """compile=True with the warm-up the model replica runs before it reports healthy: outputs equal eager, info
    reports it, and a forward at a warmed shape and batch size adds no compiled graph. ("eager" compiles only
    the dynamo trace: inductor needs minutes on this CPU, the guards and graphs it checks are the same.)"""
    from serve_app.config import ModelConfig
    from serve_app.model.backends import warm_up
    from serve_app.model.runtime import compiled_graph_count

    cfg = ModelConfig(checkpoint=f"random:{MODEL}", device="cpu", compile=True, compile_backend="eager",
                      compile_warmup_shapes=[(2, 28, 42)], compile_warmup_batch_sizes=[1, 2])
    rt = DA3Runtime(cfg.checkpoint, device="cpu", compile=True, compile_backend=cfg.compile_backend)
    rt.net.load_state_dict(net.state_dict())
    eager = DA3Runtime(cfg.checkpoint, device="cpu")
    eager.net.load_state_dict(net.state_dict())
    assert rt.info()["compiled"] is True and rt.info()["warmup_s"] == 0.0

    spent = warm_up(rt, cfg, max_batch_size=8)  # the configured batch sizes win over 1..max_batch_size
    info = rt.info()
    assert spent > 0 and info["warmup_s"] == round(spent, 3) and info["compile_backend"] == "eager"
    assert sorted(info["warmed_shapes"]) == [[1, 2, 28, 42, False], [2, 2, 28, 42, False]]
    assert warm_up(rt, cfg, max_batch_size=8) == 0.0  # already warm: nothing runs again

    graphs = compiled_graph_count()
    reqs = [WindowRequest(images=window(2, seed=60 + i, h=28, w=42)) for i in range(2)]
    batched = rt.forward_windows(reqs)
    single = rt.forward_windows(reqs[:1])
    assert rt.health_check()["ok"] is True  # checks on a warmed shape
    assert compiled_graph_count() == graphs, "a warmed shape recompiled"
    ref = eager.forward_windows(reqs)
    for got, want in zip(batched + single, ref + ref[:1]):
        assert_prediction_close(got, want, atol=1e-3)
    assert eager.info()["compiled"] is False


def test_compile_options_validated():
    from pydantic import ValidationError

    from serve_app.config import ModelConfig

    with pytest.raises(ValueError, match="compile_backend"):
        DA3Runtime(f"random:{MODEL}", compile=True, compile_backend="tvm")
    with pytest.raises(ValidationError, match="multiples of 14"):
        ModelConfig(compile_warmup_shapes=[(2, 30, 42)])
    with pytest.raises(ValidationError, match="batch sizes"):
        ModelConfig(compile_warmup_batch_sizes=[0])
