"""Checkpoint resolution, strict loading and the hub layout, on a random-init da3-small (CPU)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from helpers_checkpoint import MODEL, make_hf_cache, random_net, save_checkpoint
from safetensors.torch import load_file, save_file

from serve_app.model.checkpoint import (
    ANY_VIEW_MODELS,
    CheckpointError,
    build_network,
    known_models,
    load_network,
    network_config,
    resolve_checkpoint,
)

# Builds and runs the DA3 network: the second tier (`make test-e2e`), not `make test-fast`.
pytestmark = pytest.mark.slow

REPO = "someorg/da3-test"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def net():
    return random_net(1234)


@pytest.fixture(scope="module")
def ckpt_dir(net, tmp_path_factory) -> Path:
    return save_checkpoint(net, tmp_path_factory.mktemp("ckpt") / "da3-small")


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------


def test_known_models_and_any_view_set():
    names = known_models()
    assert {"da3-small", "da3-base", "da3-large", "da3-giant", "da3mono-large", "da3metric-large",
            "da3nested-giant-large"} <= set(names)
    assert ANY_VIEW_MODELS <= set(names)
    assert "da3mono-large" not in ANY_VIEW_MODELS


def test_build_network_is_eval(net):
    assert not net.training
    assert sum(p.numel() for p in net.parameters()) > 1_000_000


def test_saved_layout_prefixed_and_shared_tensors_written_once(net, ckpt_dir):
    assert json.loads((ckpt_dir / "config.json").read_text()) == {"model_name": MODEL}
    tensors = load_file(str(ckpt_dir / "model.safetensors"))
    assert all(k.startswith("model.") for k in tensors)
    state = net.state_dict()
    # da3-small's head reuses one conv under four names: the file holds it once.
    shared = [k for k in state if k.startswith("head.scratch.output_conv2_aux.") and k.endswith(".2.weight")]
    assert len(shared) == 4
    assert sum(("model." + k) in tensors for k in shared) == 1
    assert len(tensors) < len(state)


def test_local_directory_roundtrip(net, ckpt_dir):
    resolved = resolve_checkpoint(str(ckpt_dir))
    assert resolved.source == "local"
    assert resolved.model_name == MODEL
    assert resolved.weights_path == ckpt_dir.resolve() / "model.safetensors"
    assert_same_weights(load_network(resolved), net)


def test_hub_id_resolves_from_offline_cache(net, ckpt_dir, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    snapshot = make_hf_cache(cache, REPO, ckpt_dir, COMMIT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_checkpoint(REPO, cache_dir=str(cache))
    assert resolved.source == "hub"
    assert resolved.directory == snapshot
    assert resolved.model_name == MODEL
    assert_same_weights(load_network(resolved), net)


def test_hub_id_with_revision(ckpt_dir, tmp_path):
    cache = tmp_path / "hf"
    snapshot = make_hf_cache(cache, REPO, ckpt_dir, COMMIT)
    resolved = resolve_checkpoint(f"{REPO}@{COMMIT}", cache_dir=str(cache), local_files_only=True,
                                  model_name=MODEL)
    assert resolved.directory == snapshot


def test_random_spec_warns_and_is_seeded(caplog):
    with caplog.at_level(logging.WARNING, logger="serve_app.model.checkpoint"):
        resolved = resolve_checkpoint(f"random:{MODEL}")
    assert resolved.source == "random" and resolved.directory is None
    assert any("RANDOM WEIGHTS" in r.getMessage() and "meaningless" in r.getMessage() for r in caplog.records)
    # Replicas built from the same random spec agree.
    assert_same_weights(load_network(resolved), load_network(resolved))


# ---------------------------------------------------------------------------------------------
# Failure modes


def test_unknown_model_name_lists_known():
    with pytest.raises(CheckpointError, match="known names: .*da3-small"):
        build_network("da3-tiny")
    with pytest.raises(CheckpointError, match="unknown DA3 model_name 'da3-tiny'"):
        resolve_checkpoint("random:da3-tiny")


def test_random_spec_conflicting_model_name():
    with pytest.raises(CheckpointError, match="conflicts"):
        resolve_checkpoint(f"random:{MODEL}", model_name="da3-base")


@pytest.mark.parametrize("spec", ["./no/such/dir", "/definitely/not/here", "a/b/c", "../no-such-da3-checkpoint-dir"])
def test_nonexistent_path(spec):
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve_checkpoint(spec)


def test_spec_pointing_at_file(ckpt_dir):
    with pytest.raises(CheckpointError, match="is a file; point checkpoint at the directory"):
        resolve_checkpoint(str(ckpt_dir / "model.safetensors"))


@pytest.mark.parametrize("missing", ["model.safetensors", "config.json"])
def test_directory_missing_file(ckpt_dir, tmp_path, missing):
    d = copy_ckpt(ckpt_dir, tmp_path / "c")
    (d / missing).unlink()
    with pytest.raises(CheckpointError, match=f"lacks {missing}"):
        resolve_checkpoint(str(d))


@pytest.mark.parametrize("content", ['{"name": "da3-small"}', "not json", "[1, 2]"])
def test_config_without_model_name(ckpt_dir, tmp_path, content):
    d = copy_ckpt(ckpt_dir, tmp_path / "c")
    (d / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match="model_name|cannot read"):
        resolve_checkpoint(str(d))


def test_config_unknown_model_name(ckpt_dir, tmp_path):
    d = copy_ckpt(ckpt_dir, tmp_path / "c")
    (d / "config.json").write_text('{"model_name": "da3-huge"}')
    with pytest.raises(CheckpointError, match="unknown DA3 model_name 'da3-huge'"):
        resolve_checkpoint(str(d))


def test_model_name_argument_conflicts_with_config(ckpt_dir):
    with pytest.raises(CheckpointError, match="'da3-base' was requested but .* says 'da3-small'"):
        resolve_checkpoint(str(ckpt_dir), model_name="da3-base")


def _rewrite_weights(d: Path, edit) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"))


def test_dropped_key_reported(ckpt_dir, tmp_path):
    d = copy_ckpt(ckpt_dir, tmp_path / "c")
    _rewrite_weights(d, lambda t: t.pop("model.backbone.pretrained.cls_token"))
    with pytest.raises(CheckpointError, match=r"1 missing keys \(backbone\.pretrained\.cls_token\)") as exc:
        load_network(resolve_checkpoint(str(d)))
    assert "unexpected" not in str(exc.value)


def test_extra_key_reported(ckpt_dir, tmp_path):
    d = copy_ckpt(ckpt_dir, tmp_path / "c")
    _rewrite_weights(d, lambda t: t.update({"model.head.bogus": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \(head\.bogus\)"):
        load_network(resolve_checkpoint(str(d)))


def test_gaussian_branch_weights_are_skipped(net, ckpt_dir, tmp_path, caplog):
    # da3-giant's hub weights carry a 3D-Gaussian head the service never builds; they load without it.
    d = copy_ckpt(ckpt_dir, tmp_path / "c")
    _rewrite_weights(d, lambda t: t.update({"model.gs_head.scratch.w": torch.zeros(2), "model.anyview.gs_adapter.b":
                                             torch.zeros(1)}))
    with caplog.at_level(logging.INFO, logger="serve_app.model.checkpoint"):
        loaded = load_network(resolve_checkpoint(str(d)))
    assert_same_weights(loaded, net)
    assert "ignoring 2 weights of the unused Gaussian-splatting branch" in caplog.text


def _object_paths(node) -> list[str]:
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        own = [node["__object__"]["path"]] if "__object__" in node else []
        return own + [p for v in node.values() for p in _object_paths(v)]
    if isinstance(node, ListConfig):
        return [p for v in node for p in _object_paths(v)]
    return []


@pytest.mark.parametrize("name", ["da3-small", "da3-base", "da3-large", "da3-giant", "da3mono-large",
                                  "da3metric-large", "da3nested-giant-large"])
def test_every_module_a_network_needs_imports(name):
    # Building the big networks takes minutes and GBs; importing every module their config names catches what
    # would fail at build time with only the declared dependencies (da3-giant's Gaussian adapter needs `evo`).
    import importlib

    config = network_config(name)
    paths = set(_object_paths(config))
    assert paths, f"no __object__ paths found in {name}'s config"
    for path in paths:
        importlib.import_module(path)
    assert not [p for p in paths if "gs_" in p]


def test_shape_mismatch_reported(ckpt_dir, tmp_path):
    d = copy_ckpt(ckpt_dir, tmp_path / "c")
    _rewrite_weights(d, lambda t: t.update({"model.backbone.pretrained.cls_token": torch.zeros(1, 1, 7)}))
    with pytest.raises(CheckpointError, match=r"1 shape mismatches \(backbone\.pretrained\.cls_token: file "
                                              r"\(1, 1, 7\) vs network \(1, 1, 384\)\)"):
        load_network(resolve_checkpoint(str(d)))


def test_wrong_model_name_in_config(ckpt_dir, tmp_path):
    # da3-small weights labelled da3-base: same layout, wider layers.
    d = copy_ckpt(ckpt_dir, tmp_path / "c")
    (d / "config.json").write_text('{"model_name": "da3-base"}')
    with pytest.raises(CheckpointError, match=r"do not match network 'da3-base'.*shape mismatches "
                                              r"\(backbone\.pretrained\.cls_token: file \(1, 1, 384\) vs network "
                                              r"\(1, 1, 768\)"):
        load_network(resolve_checkpoint(str(d)))


def test_corrupt_weights_file(ckpt_dir, tmp_path):
    d = copy_ckpt(ckpt_dir, tmp_path / "c")
    (d / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_network(resolve_checkpoint(str(d)))


def test_offline_hub_id_with_empty_cache_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as exc:
        resolve_checkpoint("depth-anything/DA3-SMALL", cache_dir=str(tmp_path / "empty"))
    msg = str(exc.value)
    assert "depth-anything/DA3-SMALL" in msg
    assert "huggingface-cli download depth-anything/DA3-SMALL" in msg
    assert "set `checkpoint` to that directory" in msg


def test_hub_cache_missing_weights(ckpt_dir, tmp_path):
    src = copy_ckpt(ckpt_dir, tmp_path / "c")
    (src / "model.safetensors").unlink()
    make_hf_cache(tmp_path / "hf", REPO, src, COMMIT)
    with pytest.raises(CheckpointError, match="lacks model.safetensors.*huggingface-cli download"):
        resolve_checkpoint(REPO, cache_dir=str(tmp_path / "hf"), local_files_only=True)
