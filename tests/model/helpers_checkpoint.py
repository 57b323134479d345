"""Checkpoint test helpers shared by test_checkpoint.py and test_runtime.py: a seeded random-init network saved
in the hub layout, and a local Hugging Face cache that serves it offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from serve_app.model.checkpoint import build_network, save_hub_checkpoint

MODEL = "da3-small"


def random_net(seed: int, model: str = MODEL) -> torch.nn.Module:
    """A random-init network, reproducible from `seed`."""
    torch.manual_seed(seed)
    return build_network(model)


def save_checkpoint(net: torch.nn.Module, directory: Path, model: str = MODEL) -> Path:
    """`net` saved as a local checkpoint directory in the hub layout (config.json + weights)."""
    return save_hub_checkpoint(net, model, directory)


def make_hf_cache(cache_dir: Path, repo_id: str, files_dir: Path, commit: str) -> Path:
    """The layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files_dir.iterdir():
        shutil.copy(f, snapshot / f.name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot
