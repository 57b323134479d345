"""Shared fixtures. The Ray fixture starts one real local Ray + Serve app for the whole test session."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid

import pytest

from serve_app.demo import wait_healthy
from serve_app.ray_env import RAY_ENV_VARS

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCENE = {"seed": 3, "num_frames": 24, "width": 154, "height": 112, "trajectory": "orbit"}

# The end-to-end tier: a test that asks for one of these (directly or through another fixture) starts the shared
# local Ray cluster, so it is marked `ray` here; everything else is the fast tier (`make test-fast`: -m "not ray").
RAY_FIXTURES = {"serve_url", "faults_app", "lossy_app", "secure_url", "redis_app"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(**overrides) -> dict:
    args = {
        "model": {"backend": "da3", "checkpoint": "random:da3-small", "amp": "fp32"},
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.05},
        "session_defaults": {"process_res": 154, "window_size": 4, "overlap": 2, "max_points_per_frame": 2000},
        "limits": {"max_sessions": 20, "max_in_flight": 12, "sweep_interval_s": 0.5, "max_image_bytes": 2_000_000,
                   "max_image_pixels": 4_000_000},
        # Unique actor name per run: a detached actor from an earlier run must never be picked up.
        "session_actor": {"name": f"test_sessions_{uuid.uuid4().hex[:8]}", "namespace": "da3-serve-tests"},
    }
    for k, v in overrides.items():
        args[k] = {**args.get(k, {}), **v} if isinstance(v, dict) else v
    return args


@pytest.fixture(scope="session")
def synthetic_seq():
    from serve_app.evaluation.synthetic import SceneSpec, render_sequence

    return render_sequence(SceneSpec.from_dict(SCENE))


@pytest.fixture(scope="session")
def serve_url():
    import ray
    from ray import serve

    from serve_app.app import build_app

    # A logical GPU lets the model deployment's real `num_gpus: 1` schedule on this CPU machine.
    ray.init(num_cpus=16, num_gpus=8, include_dashboard=False, namespace="da3-serve-tests",
             _system_config={"metrics_report_interval_ms": 1000},
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", **RAY_ENV_VARS}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args()), name="da3", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 300)
    yield url
    serve.shutdown()
    ray.shutdown()


API_KEYS = ["key-alice", "key-bob"]
OPERATOR_KEYS = ["key-operator"]  # /stats, the dashboard's data, /healthz details on the secure app


def deploy(serve_url: str, name: str, args: dict) -> str:
    """Run another app of this package in the same Serve instance under /<name>; wait until healthy."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"{serve_url}/{name}"
    wait_healthy(url, 300)
    return url


@contextlib.contextmanager
def deployed(serve_url: str, name: str, args: dict):
    """deploy(), and delete the app when the block ends: every app holds a logical GPU and two processes, so
    module-scoped apps give them back for the modules after them."""
    from ray import serve

    url = deploy(serve_url, name, args)
    try:
        yield url
    finally:
        serve.delete(name)


@pytest.fixture(scope="session")
def faults_app(serve_url, tmp_path_factory):
    """Oracle backend with a persistent session journal: for killing actors and replicas."""
    args = app_args(model={"backend": "oracle", "oracle_scene": SCENE},
                    session_actor={"state_dir": str(tmp_path_factory.mktemp("da3-state"))})
    return deploy(serve_url, "faults", args), args


@pytest.fixture(scope="session")
def lossy_app(serve_url):
    """Oracle backend whose session actor keeps no journal: a restart loses sessions. Small result flow-control
    limits, so a client that never sends `received` is paused after a record or two and closed after 3 s."""
    args = app_args(model={"backend": "oracle", "oracle_scene": SCENE},
                    limits={"max_unacked_result_bytes": 60_000, "slow_reader_timeout_s": 3.0})
    return deploy(serve_url, "lossy", args), args


@pytest.fixture(scope="session")
def secure_url(serve_url):
    """A second app in the same cluster: API keys on, CORS for one origin, tight limits, oracle backend
    (cheap, so these tests spend their time on the rules, not on the network)."""
    args = app_args(
        model={"backend": "oracle", "oracle_scene": SCENE},
        auth={"mode": "api_key", "api_keys": API_KEYS, "operator_keys": OPERATOR_KEYS},
        cors_origins=["http://allowed.example"],
        limits={"max_sessions_per_key": 3, "frames_per_s": 2.0, "max_in_flight": 12},
    )
    return deploy(serve_url, "secure", args)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server (Debian package; `make test` installs it) on a free loopback port, for this test
    session only: no persistence, its own temp dir, stopped at the end."""
    import shutil
    import subprocess
    import time

    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run `make test` (it runs .ci/install-redis)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir), "--daemonize", "no", "--logfile", str(workdir / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.time() + 20
        while True:
            try:
                if redis.Redis.from_url(url, socket_timeout=1).ping():
                    break
            except redis.exceptions.ConnectionError:
                if proc.poll() is not None or time.time() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def redis_app(serve_url, redis_url):
    """Oracle backend whose session actor keeps its sessions in the test session's redis-server."""
    args = app_args(model={"backend": "oracle", "oracle_scene": SCENE},
                    session_actor={"backend": "redis", "redis_url": redis_url})
    return deploy(serve_url, "redisapp", args), args


class InProcess:
    """The session actor's class driven in this process: `handle.method.remote(...)` is its coroutine."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):
        method = getattr(self.actor, name)
        return type("M", (), {"remote": staticmethod(lambda *a, **k: method(*a, **k))})
