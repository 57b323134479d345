"""The model seam: build the backend a model replica runs (real DA3 runtime or the synthetic-scene oracle).

Both backends have the same contract: `forward_windows(list[WindowRequest]) -> list[WindowPrediction]`,
`info()`, `health_check()`, `any_view`.
"""

from __future__ import annotations

import logging

from serve_app.config import ModelConfig

log = logging.getLogger("ray.serve.da3.model")


def make_backend(cfg: ModelConfig):
    if cfg.backend == "oracle":
        from serve_app.oracle import OracleModel
        from serve_app.synthetic import SceneSpec

        scene = SceneSpec.from_dict(cfg.oracle_scene or {})
        return OracleModel(scene, scale_range=tuple(cfg.oracle_scale_range), depth_noise=cfg.oracle_depth_noise,
                           pose_noise=cfg.oracle_pose_noise, seed=cfg.oracle_seed)

    from serve_app.checkpoint import CheckpointError
    from serve_app.runtime import DA3Runtime

    kwargs = dict(model_name=cfg.model_name, device=cfg.device, amp=cfg.amp,
                  ref_view_strategy=cfg.ref_view_strategy, compile=cfg.compile,
                  compile_backend=cfg.compile_backend)
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
