"""The model seam: build the backend a model replica runs (real DA3 runtime, the synthetic-scene oracle, or a
plug-in named by an import path "package.module:factory").

Every backend has the same contract (docs/ARCHITECTURE.md, "Model backends"):
`forward_windows(list[WindowRequest]) -> list[WindowPrediction]`, `info() -> dict`, `health_check()` (raises when
unhealthy), and the attribute `any_view` (the model accepts any number of views per window).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from serve_app.config import ModelConfig

log = logging.getLogger("ray.serve.da3.model")

BACKEND_METHODS = ("forward_windows", "info", "health_check")


def resolve_factory(path: str) -> Callable[..., Any]:
    """The callable named by "package.module:attr[.attr]"; ValueError saying what is wrong. A class is checked
    for the contract's methods here; what a function returns is checked by `check_backend` once built."""
    mod_name, sep, attr = str(path).partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"expected 'da3', 'oracle' or an import path 'package.module:factory', got {path!r}")
    try:
        obj: Any = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is a config error
        raise ValueError(f"cannot import module {mod_name!r}: {type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{path!r} is not callable")  # noqa: TRY004 - pydantic reports ValueErrors
    if isinstance(obj, type):
        missing = [m for m in BACKEND_METHODS if not callable(getattr(obj, m, None))]
        if missing:
            raise ValueError(f"{path!r} lacks the backend method(s) {', '.join(missing)}")
    return obj


def check_backend(backend: Any, name: str) -> Any:
    """`backend` if it has the contract's methods, else ValueError naming the config field."""
    missing = [m for m in BACKEND_METHODS if not callable(getattr(backend, m, None))]
    if missing:
        raise ValueError(f"model.backend: {name!r} returned {type(backend).__name__}, which lacks "
                         f"{', '.join(missing)}")
    return backend


def make_backend(cfg: ModelConfig):
    if cfg.backend == "oracle":
        from serve_app.evaluation.synthetic import SceneSpec
        from serve_app.model.oracle import OracleModel

        scene = SceneSpec.from_dict(cfg.oracle_scene or {})
        return OracleModel(scene, scale_range=tuple(cfg.oracle_scale_range), seed=cfg.oracle_seed,
                           errors=cfg.oracle_error_model())
    if cfg.backend != "da3":
        factory = resolve_factory(cfg.backend)
        return check_backend(factory(**cfg.backend_args), cfg.backend)

    from serve_app.model.checkpoint import CheckpointError
    from serve_app.model.runtime import DA3Runtime

    kwargs = {"model_name": cfg.model_name, "device": cfg.device, "amp": cfg.amp,
              "ref_view_strategy": cfg.ref_view_strategy, "compile": cfg.compile,
              "compile_backend": cfg.compile_backend}
    try:
        return DA3Runtime(cfg.checkpoint, **kwargs)
    except CheckpointError as exc:
        if not cfg.fallback_checkpoint:
            raise
        log.warning("!!! checkpoint %r unavailable (%s); the config allows falling back to %r. "
                    "Predictions from a fallback random-init network are geometrically meaningless. !!!",
                    cfg.checkpoint, exc, cfg.fallback_checkpoint)
        kwargs["model_name"] = None
        return DA3Runtime(cfg.fallback_checkpoint, **kwargs)


def warm_up(backend, cfg: ModelConfig, max_batch_size: int) -> float:
    """With `compile` on, run the configured window shapes at every batch size the replica may see (see
    ModelConfig.compile_warmup_*); already warmed shapes are skipped. Returns the seconds spent."""
    if not cfg.compile or not hasattr(backend, "warmup_shapes"):
        return 0.0
    sizes = cfg.compile_warmup_batch_sizes or list(range(1, int(max_batch_size) + 1))
    spent = backend.warmup_shapes(cfg.compile_warmup_shapes, sizes, priors=cfg.compile_warmup_priors)
    if spent:
        log.info("compiled model warm-up: %.1fs (total %.1fs) for shapes %s at batch sizes %s", spent,
                 backend.warmup_s, cfg.compile_warmup_shapes, sizes)
    return spent
