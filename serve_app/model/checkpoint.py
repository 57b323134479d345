"""Find, build and load DA3 networks without `depth_anything_3.api` (it pulls moviepy/open3d).

A checkpoint spec is one of:
  - ``random:<model_name>``      random init (geometry is meaningless; for tests and load checks)
  - a local directory            the hub layout: ``config.json`` (key ``model_name``) + ``model.safetensors``
  - ``org/name`` or ``org/name@revision``   a Hugging Face hub repo, resolved through the HF cache
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HUB_KEY_PREFIX = "model."  # DA3's hub wrapper holds the network as `self.model`
RANDOM_PREFIX = "random:"
RANDOM_SEED = 0  # random checkpoints are seeded so every replica holds the same weights
# Submodules the service never runs: da3-giant's 3D-Gaussian head and adapter (also inside the nested model). They are left out of the
# network (the adapter imports `evo`, which depth-anything-3 does not declare) and their weights are skipped.
UNUSED_BRANCHES = frozenset({"gs_head", "gs_adapter"})

# These take B>1 windows in one forward with results equal to B single forwards.
ANY_VIEW_MODELS = frozenset({"da3-small", "da3-base", "da3-large", "da3-giant"})
# Depth in metres (the nested model rescales with its metric branch; da3metric-large via focal / 300).
METRIC_MODELS = frozenset({"da3metric-large", "da3nested-giant-large"})

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_MAX_LISTED_KEYS = 5


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read or matched to its network; the message says what to do."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    spec: str
    source: Literal["hub", "local", "random"]
    model_name: str
    directory: Path | None = None
    weights_path: Path | None = None


def known_models() -> list[str]:
    from depth_anything_3.registry import MODEL_REGISTRY

    return list(MODEL_REGISTRY.keys())


def _check_model_name(model_name: str) -> None:
    known = known_models()
    if model_name not in known:
        raise CheckpointError(f"unknown DA3 model_name {model_name!r}; known names: {', '.join(known)}")


def build_network(model_name: str) -> nn.Module:
    """A randomly initialised network for `model_name`, in eval mode, on the CPU."""
    from depth_anything_3.cfg import create_object

    return create_object(network_config(model_name)).eval()


def network_config(model_name: str):
    """DA3's config for `model_name` without the UNUSED_BRANCHES (an omegaconf DictConfig)."""
    _check_model_name(model_name)
    from depth_anything_3.cfg import load_config
    from depth_anything_3.registry import MODEL_REGISTRY
    from omegaconf import DictConfig

    def prune(node) -> None:  # also inside nested models (da3nested-giant-large holds a da3-giant)
        for key in list(node.keys()):
            if key in UNUSED_BRANCHES:
                node.pop(key)
            elif isinstance(node[key], DictConfig):
                prune(node[key])

    config = load_config(MODEL_REGISTRY[model_name])
    prune(config)
    return config


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or "\\" in spec
        or spec.count("/") != 1
        or spec.endswith("/")
    )


def _env_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE only once, at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _read_model_name(directory: Path, where: str) -> str:
    config_path = directory / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{where}: cannot read {config_path}: {exc}") from exc
    name = config.get("model_name") if isinstance(config, dict) else None
    if not isinstance(name, str) or not name:
        raise CheckpointError(
            f"{where}: {config_path} has no 'model_name' key; add e.g. {{\"model_name\": \"da3-large\"}} "
            f"(known names: {', '.join(known_models())})"
        )
    return name


def _resolve_directory(spec: str, directory: Path, source: str, model_name: str | None,
                       where: str) -> ResolvedCheckpoint:
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (directory / f).is_file()]
    if missing:
        raise CheckpointError(
            f"{where}: directory {directory} lacks {' and '.join(missing)}; a checkpoint directory must "
            f"hold {CONFIG_FILE} (with 'model_name') and {WEIGHTS_FILE}"
        )
    name = _read_model_name(directory, where)
    _check_model_name(name)
    if model_name is not None and model_name != name:
        raise CheckpointError(
            f"{where}: model_name {model_name!r} was requested but {directory / CONFIG_FILE} says {name!r}; "
            "drop model_name from the config or point checkpoint at the matching weights"
        )
    return ResolvedCheckpoint(spec=spec, source=source, model_name=name, directory=directory,
                              weights_path=directory / WEIGHTS_FILE)


def resolve_checkpoint(spec: str, *, model_name: str | None = None, cache_dir: str | None = None,
                       local_files_only: bool | None = None) -> ResolvedCheckpoint:
    """Turn a checkpoint spec into files on disk (or a random-init request). Raises CheckpointError.

    `local_files_only=None` follows HF_HUB_OFFLINE as set when this is called.
    """
    spec = (spec or "").strip()
    if not spec:
        raise CheckpointError("empty checkpoint spec; use a hub id (org/name), a directory or random:<model_name>")

    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):].strip()
        _check_model_name(name)
        if model_name is not None and model_name != name:
            raise CheckpointError(f"checkpoint {spec!r} conflicts with model_name {model_name!r}")
        logger.warning(
            "checkpoint %r: RANDOM WEIGHTS for %s - depth, poses and point clouds are meaningless. "
            "Use this only for tests and load checks.", spec, name)
        return ResolvedCheckpoint(spec=spec, source="random", model_name=name)

    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_directory(spec, path.resolve(), "local", model_name, f"checkpoint {spec!r}")
    if path.exists():
        raise CheckpointError(
            f"checkpoint {spec!r} is a file; point checkpoint at the directory holding "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    if _looks_like_path(spec) or not _REPO_ID.match(spec):
        raise CheckpointError(
            f"checkpoint {spec!r}: no such directory (and not a hub id of the form org/name[@revision]); "
            "check the path, or use a hub id or random:<model_name>")

    return _resolve_hub(spec, model_name=model_name, cache_dir=cache_dir,
                        local_files_only=_env_offline() if local_files_only is None else local_files_only)


def _resolve_hub(spec: str, *, model_name: str | None, cache_dir: str | None,
                 local_files_only: bool) -> ResolvedCheckpoint:
    from huggingface_hub import snapshot_download

    repo_id, _, revision = spec.partition("@")
    advice = (
        f"pre-download it on a connected machine with `huggingface-cli download {repo_id}"
        f"{' --revision ' + revision if revision else ''} --local-dir <dir>` (or copy its HF cache) "
        "and set `checkpoint` to that directory"
    )
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=revision or None,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=[CONFIG_FILE, WEIGHTS_FILE],
        )
    except Exception as exc:  # offline, missing repo/revision, network or auth errors: all need the same fix
        mode = "offline (local files only)" if local_files_only else "online"
        raise CheckpointError(
            f"cannot resolve hub checkpoint {spec!r} ({mode}, cache {cache_dir or 'default'}): "
            f"{type(exc).__name__}: {str(exc).strip().rstrip('.')}. To fix: {advice}"
        ) from exc
    try:
        return _resolve_directory(spec, Path(snapshot), "hub", model_name, f"hub checkpoint {spec!r}")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}. To fix: {advice}") from None


# ----------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------


def _alias_groups(net: nn.Module) -> dict[str, list[str]]:
    """state_dict key -> all keys sharing its storage (modules reused under several names)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for key, tensor in net.state_dict().items():
        groups[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))].append(key)
    return {key: keys for keys in groups.values() for key in keys}


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else "")


def load_network(resolved: ResolvedCheckpoint) -> nn.Module:
    """Build the network and load its weights strictly. Returns it in eval mode on the CPU."""
    if resolved.source == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return build_network(resolved.model_name)

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    net = build_network(resolved.model_name)
    where = f"checkpoint {resolved.spec!r} ({resolved.weights_path})"
    try:
        raw = load_file(str(resolved.weights_path), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{where}: cannot read weights: {exc}; re-download the checkpoint") from exc

    state = {(k.removeprefix(HUB_KEY_PREFIX)): v for k, v in raw.items()}
    dropped = [k for k in state if UNUSED_BRANCHES & set(k.split("."))]
    if dropped:
        logger.info("%s: ignoring %d weights of the unused Gaussian-splatting branch", where, len(dropped))
        for k in dropped:
            del state[k]
    expected = net.state_dict()
    aliases = _alias_groups(net)
    # A shared tensor is saved once under any one of its names; fill the others from it.
    for key in expected:
        if key not in state:
            present = next((a for a in aliases[key] if a in state), None)
            if present is not None:
                state[key] = state[present]

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_listed(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_listed(shapes)})")
        raise CheckpointError(
            f"{where}: weights do not match network {resolved.model_name!r}: {'; '.join(parts)}. "
            "Check that config.json's model_name matches the weights, or re-download the checkpoint"
        )
    net.load_state_dict(state, strict=True)
    return net.eval()


def save_hub_checkpoint(net: nn.Module, model_name: str, directory: str | os.PathLike) -> Path:
    """Write `net` in the hub layout load_network reads: config.json + model.safetensors (`model.` keys).

    Tensors shared between several names are written once (safetensors refuses shared storage).
    """
    from safetensors.torch import save_file

    _check_model_name(model_name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    aliases = _alias_groups(net)
    tensors: dict[str, torch.Tensor] = {}
    written: set[str] = set()
    for key, tensor in net.state_dict().items():
        if key in written:
            continue
        written.update(aliases[key])
        tensors[HUB_KEY_PREFIX + key] = tensor.detach().to("cpu").contiguous().clone()
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    (directory / CONFIG_FILE).write_text(json.dumps({"model_name": model_name}, indent=2) + "\n")
    return directory
