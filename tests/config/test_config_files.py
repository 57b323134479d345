"""The shipped Serve config files are valid: their args pass the builder's validation and their deployment
overrides name real deployments."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import parse_args
from serve_app.ray_env import RAY_ENV_VARS

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = {"DA3ModelServer", "Ingress"}


@pytest.mark.parametrize("path", ["configs/local.yaml", "serve_config.yaml"])
def test_config_file_is_valid(path, monkeypatch):
    monkeypatch.setenv("DA3_API_KEYS", "test-key")  # serve_config.yaml requires keys by default
    cfg = yaml.safe_load((ROOT / path).read_text())
    ServeDeploySchema.model_validate(cfg)  # Ray's own schema for `serve run` / `serve deploy`
    assert "request_timeout_s" not in cfg.get("http_options", {})  # would kill WebSockets
    for app in cfg["applications"]:
        assert app["import_path"] == "serve_app.app:build_app"
        assert app["runtime_env"]["env_vars"] == RAY_ENV_VARS  # the Ray settings the service is tuned for
        args = parse_args(app["args"])
        names = {d["name"] for d in app.get("deployments", [])}
        assert names <= DEPLOYMENTS
        model = next(d for d in app["deployments"] if d["name"] == "DA3ModelServer")
        if path == "serve_config.yaml":
            assert model["ray_actor_options"]["num_gpus"] == 1 and "autoscaling_config" in model
            assert args.auth.mode == "api_key" and args.model.fallback_checkpoint is None
            assert args.model.checkpoint == "depth-anything/DA3-BASE"  # Apache-2.0
        else:
            assert model["ray_actor_options"]["num_gpus"] == 0
            assert cfg["http_options"]["host"] == "127.0.0.1" and args.auth.mode == "none"
            assert args.model.fallback_checkpoint == "random:da3-small"


def test_serve_config_refuses_to_start_without_keys(monkeypatch):
    monkeypatch.delenv("DA3_API_KEYS", raising=False)
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    with pytest.raises(ValueError, match="no key is configured"):
        parse_args(cfg["applications"][0]["args"])


def test_kuberay_manifest_embeds_a_valid_serve_config(monkeypatch):
    monkeypatch.setenv("DA3_API_KEYS", "k")
    doc = yaml.safe_load((ROOT / "configs/kuberay-rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    parse_args(serve_cfg["applications"][0]["args"])
    assert serve_cfg["applications"][0]["runtime_env"]["env_vars"] == RAY_ENV_VARS
