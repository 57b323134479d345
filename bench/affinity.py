"""Session affinity: does a reconnect reach the ingress replica that already holds the session's worker?

Deploys the app (oracle model) with 2 ingress replicas behind the Serve proxy, under each request router, and for
`--sessions` sessions opens a stream and then `--reconnects` more streams to the same session while the previous
one is still open (what a client does after a network blip the server has not noticed yet: the new stream
displaces the old one). A stream that reaches another replica takes the session over (`take_worker`: the fencing
epoch grows, the snapshot and the whole map are copied to that replica); one that reaches the same replica keeps
its worker. Counted from the session's `worker_epoch`, so no timing is involved.

Routers: Serve's default (power of two choices), and the experimental `ConsistentHashRouter`
(ray.serve.experimental.consistent_hash_router) keyed on the `x-session-id` header, once with the header set by
the client (what a load balancer copying the id from the path would do) and once without (a browser: its
WebSocket API cannot set headers).

    python bench/affinity.py                     # 12 sessions x 4 reconnects per router
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from measure import print_table

ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
SCENE = {"seed": 3, "num_frames": 8, "width": 154, "height": 112, "trajectory": "orbit"}


def build(name: str, hashed: bool, replicas: int):
    from ray.serve.config import RequestRouterConfig

    from serve_app.config import AppArgs
    from serve_app.deployments.ingress import Ingress
    from serve_app.deployments.model_server import DA3ModelServer

    cfg = AppArgs.model_validate({
        "model": {"backend": "oracle", "oracle_scene": SCENE},
        "session_defaults": {"process_res": 154, "window_size": 4, "overlap": 2},
        "session_actor": {"name": f"bench_affinity_{name}_{uuid.uuid4().hex[:6]}", "namespace": "da3-bench"}})
    opts = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0}}
    if hashed:
        opts["request_router_config"] = RequestRouterConfig(request_router_class=ROUTER,
                                                            request_router_kwargs={"num_fallback_replicas": 0})
    model = DA3ModelServer.options(user_config=cfg.batching.model_dump(),
                                   ray_actor_options={"num_cpus": 0, "num_gpus": 0}).bind(cfg.model.model_dump())
    return Ingress.options(**opts).bind(model, cfg.model_dump(mode="json"))


async def measure(url: str, sessions: int, reconnects: int, header: bool) -> tuple[int, int]:
    """(takeovers, reconnects) over all sessions."""
    import httpx
    import websockets

    takeovers = total = 0
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(sessions):
            sid = (await http.post(f"{url}/ws/session/create", json={})).json()["session_id"]
            ws_url = url.replace("http://", "ws://") + f"/ws/reconstruct/{sid}"
            headers = {"x-session-id": sid} if header else {}
            open_, last = [], 0
            try:
                for i in range(reconnects + 1):
                    ws = await websockets.connect(ws_url, additional_headers=headers, max_size=None)
                    open_.append(ws)
                    assert json.loads(await ws.recv())["type"] == "ready"
                    epoch = (await http.get(f"{url}/ws/session/{sid}")).json()["worker_epoch"]
                    if i:
                        total += 1
                        takeovers += epoch > last
                    last = epoch
            finally:
                for ws in open_:
                    await ws.close()
            await http.delete(f"{url}/ws/session/{sid}")
    return takeovers, total


def wait_replicas(app: str, n: int, timeout: float = 300) -> None:
    """Until all `n` ingress replicas run: the app answers as soon as one does."""
    import time

    from ray import serve

    deadline = time.time() + timeout
    while time.time() < deadline:
        d = serve.status().applications[app].deployments["Ingress"]
        if d.replica_states.get("RUNNING", 0) >= n:
            return
        time.sleep(1)
    raise TimeoutError(f"{app}: {n} ingress replicas not running after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--reconnects", type=int, default=4, help="extra streams per session")
    ap.add_argument("--replicas", type=int, default=2, help="ingress replicas")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from serve_app.demo import wait_healthy
    from serve_app.ray_env import RAY_ENV_VARS

    ray.init(num_cpus=8, include_dashboard=False, namespace="da3-bench", logging_level="ERROR",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", **RAY_ENV_VARS}})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = []
    try:
        for name, hashed, header in (("default", False, True), ("hash", True, True), ("hash_nohdr", True, False)):
            serve.run(build(name, hashed, args.replicas), name=name, route_prefix=f"/{name}", blocking=False)
            url = f"http://127.0.0.1:{port}/{name}"
            wait_healthy(url, 300)
            wait_replicas(name, args.replicas)
            took, total = asyncio.run(measure(url, args.sessions, args.reconnects, header))
            rows.append(["ConsistentHashRouter" if hashed else "default (pow-2)", "yes" if header else "no",
                         total, took, f"{took / max(total, 1):.0%}"])
            print("result:", rows[-1], flush=True)
            serve.delete(name)
        print_table(f"session affinity: {args.replicas} ingress replicas, {args.sessions} sessions x "
                    f"{args.reconnects} reconnects (each while the previous stream is open)",
                    ["router", "x-session-id", "reconnects", "takeovers", "takeover rate"], rows)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
