"""Typed application builder: `serve run` target `serve_app.app:build_app`.

    applications:
      - import_path: serve_app.app:build_app
        args: {model: {checkpoint: depth-anything/DA3-BASE}, ...}   # validated by serve_app.config.AppArgs
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.config import AppArgs, parse_args
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.model_server import DA3ModelServer


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    cfg = parse_args(args)
    # Batching knobs travel as user_config so `serve deploy` can retune them without restarting replicas.
    model = DA3ModelServer.options(user_config=cfg.batching.model_dump()).bind(cfg.model.model_dump())
    return Ingress.bind(model, cfg.model_dump(mode="json"))
