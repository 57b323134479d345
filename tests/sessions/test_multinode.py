"""Node loss on a real multi-node Ray cluster on one machine (issue 19, item 5).

The test starts its own cluster with `ray start`: a head (the Serve controller, proxy, ingress and model
replicas: it has the CPUs and the logical GPU) and two worker "nodes" with no CPUs and a `store` resource, each
with its own --temp-dir and ports. The session actor is placed on worker A; mid-stream, every process of worker A
(its raylet, agents and workers, found by node id in /proc) is killed with SIGKILL - `ray stop` would kill every
cluster on the machine. Ray restarts the actor on worker B.
- backend redis: every acked frame is processed, the streams resume, no SESSION_LOST; frame counts and maps equal
  an undisturbed session of the same frames.
- backend memory: the sessions on the lost actor report SESSION_LOST.

The scenario runs in a child process (`python tests/sessions/test_multinode.py <json>`): it connects with
`ray.init(address=...)`, which must not meet this pytest process's own Ray. Every process of the cluster (found
by the cluster's GCS port) is killed at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
STORE_NAME, STORE_NS = "mn_sessions", "da3-multinode"
FRAMES = 10

pytestmark = pytest.mark.ray


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs_matching(needles: list[str]) -> list[int]:
    """PIDs (not ours) whose command line contains any of `needles`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(n in cmd for n in needles):
            out.append(int(d.name))
    return out


def kill_matching(needles: list[str]) -> int:
    pids = _procs_matching(needles)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def node_needles(node_id: str) -> list[str]:
    return [f"--node_id={node_id}", f"--node-id={node_id}", f"--node-id-hex={node_id}"]


class Cluster:
    """A head and two worker nodes started with `ray start`, each with its own temp dir and ports."""

    def __init__(self, tmp: Path, env: dict):
        self.tmp, self.env = tmp, env
        self.gcs_port = _free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"

    def _start(self, name: str, *args: str) -> None:
        temp = self.tmp / name
        temp.mkdir(parents=True, exist_ok=True)
        cmd = [RAY, "start", "--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}", *args]
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"ray start {name} failed: {res.stdout[-2000:]}{res.stderr[-2000:]}")

    def start(self) -> None:
        self._start("head", "--head", f"--port={self.gcs_port}", "--include-dashboard=false",
                    f"--ray-client-server-port={_free_port()}", "--num-cpus=6", "--num-gpus=1",
                    '--resources={"head_node": 1}')
        for name in ("a", "b"):
            self._start(name, f"--address={self.address}", "--num-cpus=0",
                        f'--resources={{"store": 1, "node_{name}": 1}}')

    def stop(self) -> int:
        # Every process of this cluster names its GCS: raylets, workers and agents by --gcs-address, the GCS
        # server by its port. Processes of other clusters on the machine do not match.
        return kill_matching([f"--gcs-address=127.0.0.1:{self.gcs_port}", f"--gcs_server_port={self.gcs_port}",
                              f"--gcs-address={self.address}", str(self.tmp)])


def run_scenario(backend: str, redis_url: str | None) -> dict:
    # A short root: Ray's socket paths under it must fit AF_UNIX's 107 bytes (pytest's tmp_path does not).
    tmp_path = Path(tempfile.mkdtemp(prefix="da3mn", dir="/tmp"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'clients'}", "RAY_DEDUP_LOGS": "0",
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           # token authentication with this cluster's own token, for every node and the driver
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    cluster = Cluster(tmp_path, env)
    try:
        cluster.start()
        spec = {"address": cluster.address, "backend": backend, "redis_url": redis_url, "frames": FRAMES,
                "http_port": _free_port()}
        res = subprocess.run([sys.executable, __file__, json.dumps(spec)], env=env, capture_output=True,
                             text=True, timeout=900, check=False)
        # the driver's output (with the cluster's logs) stays for a look after a failure
        Path(f"/tmp/da3-multinode-{backend}.log").write_text(res.stdout + "\n---- stderr\n" + res.stderr)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise AssertionError(f"scenario failed (rc {res.returncode}):\n{res.stdout[-4000:]}\n"
                                 f"{res.stderr[-6000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        print(f"multinode {backend}: " + json.dumps(result))  # the figures, for the log (pytest -s)
        return result
    finally:
        cluster.stop()
        time.sleep(1)
        left = _procs_matching([f"--gcs-address={cluster.address}", f"--gcs_server_port={cluster.gcs_port}"])
        shutil.rmtree(tmp_path, ignore_errors=True)
        assert not left, f"processes of the test cluster left running: {left}"


def test_node_loss_with_redis_backend_loses_nothing(redis_url):
    r = run_scenario("redis", redis_url)
    assert r["actor_node"] == r["node_a"] and r["restarted_on"] == r["node_b"], r
    assert sum(k["acked"] - k["processed"] for k in r["at_kill"]) > 0, r["at_kill"]  # frames were in flight
    base = r["baseline"]
    assert base["frames_processed"] == FRAMES and not base["errors"]
    for s in r["sessions"]:
        assert s["error"] is None and "SESSION_LOST" not in s["errors"], s
        assert s["frames_processed"] == FRAMES and s["frames_acked"] == FRAMES and s["frames"] == FRAMES
        assert s["points"] == base["points"] and s["points_sum"] == pytest.approx(base["points_sum"], rel=1e-4)
        assert s["server_frames_processed"] == FRAMES


def test_node_loss_with_memory_backend_reports_session_lost():
    r = run_scenario("memory", None)
    assert r["actor_node"] == r["node_a"], r
    for s in r["sessions"]:
        assert s["error"] == "SESSION_LOST" or "SESSION_LOST" in s["errors"], s


# --- the scenario, in a child process ---------------------------------------------------------------------------

async def _session(client, sid, images, half_sent, go_on, streams: list | None = None) -> dict:
    import asyncio

    from da3_client import Da3Error

    out = {"sid": sid, "error": None, "errors": []}
    s = client.stream(sid, backoff_s=0.3, max_reconnects=30)
    if streams is not None:
        streams.append(s)
    try:
        await s.connect()
        n = len(images)
        for i in range(n // 2):
            await s.send_frame(images[i], frame_id=i)
        await s.flush()
        deadline = time.time() + 120
        while s.frames_acked < n // 2 and time.time() < deadline:  # the kill comes right after these acks
            await asyncio.sleep(0.01)
        half_sent.set()
        await go_on.wait()
        for i in range(n // 2, n):
            await s.send_frame(images[i], frame_id=i)
        await s.finalize(timeout=300)
    except Da3Error as exc:
        out["error"] = exc.code
    finally:
        half_sent.set()
        with contextlib.suppress(Exception):  # already broken
            await s.close()
    pts = s.reconstruction.points()
    out.update(errors=[e.get("code") for e in s.errors], frames_processed=s.frames_processed,
               frames_acked=s.frames_acked, frames=len(s.reconstruction.frames), points=len(pts),
               points_sum=float(abs(pts.astype("float64")).sum()) if len(pts) else 0.0, reconnects=s.reconnects)
    return out


def _actor_node(actor) -> str:
    import ray

    info = ray._private.state.actors(actor._actor_id.hex())
    return info["Address"]["NodeID"] if info.get("State") == "ALIVE" else ""


async def _scenario(spec: dict) -> dict:
    import asyncio

    import httpx
    import ray
    from da3_client import Da3Client
    from ray import serve
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from serve_app.app import build_app
    from serve_app.config import parse_args
    from serve_app.demo import wait_healthy
    from serve_app.deployments.session_actor import SessionActor
    from serve_app.evaluation.synthetic import SceneSpec, render_sequence

    scene = {"seed": 3, "num_frames": spec["frames"], "width": 154, "height": 112, "trajectory": "orbit"}
    images = render_sequence(SceneSpec.from_dict(scene)).images
    ray.init(address=spec["address"], namespace=STORE_NS)
    nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
    node_a = next(i for i, n in nodes.items() if "node_a" in n["Resources"])
    node_b = next(i for i, n in nodes.items() if "node_b" in n["Resources"])
    # Calls in flight when the node dies are retried on the restarted actor until it is back (the store's
    # accept and commit are idempotent on retry); 3 retries run out while the GCS is still noticing the loss.
    store_cfg = {"name": STORE_NAME, "namespace": STORE_NS, "backend": spec["backend"], "max_task_retries": -1}
    if spec["redis_url"]:
        store_cfg["redis_url"] = spec["redis_url"]
    args = {"model": {"backend": "oracle", "oracle_scene": scene},
            "session_defaults": {"process_res": 140, "window_size": 4, "overlap": 2, "max_points_per_frame": 500},
            "limits": {"max_sessions": 10, "max_in_flight": 12, "sweep_interval_s": 1.0},
            "session_actor": store_cfg}
    cfg = parse_args(args)
    # The store on worker A, never the head (`store` exists on the workers only); soft affinity, so Ray
    # restarts it on worker B when A is gone. The app's get_session_actor finds it by name (get_if_exists).
    actor = ray.remote(SessionActor).options(
        name=STORE_NAME, namespace=STORE_NS, lifetime="detached", max_restarts=-1, max_task_retries=-1,
        num_cpus=0, max_concurrency=1000, resources={"store": 0.01},
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_a, soft=True),
    ).remote(cfg.limits.model_dump(), None, backend=cfg.session_actor.model_dump())
    await actor.ping.remote()
    actor_node = _actor_node(actor)

    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": spec["http_port"]})
    serve.run(build_app(args), name="mn", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{spec['http_port']}"
    await asyncio.to_thread(wait_healthy, url, 600)

    async with Da3Client(url, timeout=60) as client:
        ev = asyncio.Event()
        ev.set()
        base_sid = (await client.create_session())["session_id"]
        baseline = await _session(client, base_sid, images, asyncio.Event(), ev)
        sids = [(await client.create_session())["session_id"] for _ in range(2)]
        halves = [asyncio.Event() for _ in sids]
        go_on = asyncio.Event()
        streams: list = []
        tasks = [asyncio.create_task(_session(client, sid, images, h, go_on, streams))
                 for sid, h in zip(sids, halves, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(h.wait() for h in halves)), 300)
        # acked but not yet processed when the node goes: these are what the store must not lose
        at_kill = [{"acked": s.frames_acked, "processed": s.frames_processed} for s in streams]
        killed = kill_matching(node_needles(node_a))  # worker A is gone: raylet, agents, the store's worker
        go_on.set()
        sessions = await asyncio.wait_for(asyncio.gather(*tasks), 600)
        restarted_on = ""
        deadline = time.time() + 120  # the GCS notices the lost node after its health checks fail
        while time.time() < deadline and restarted_on in ("", node_a):
            restarted_on = _actor_node(actor)
            await asyncio.sleep(0.5)
        async with httpx.AsyncClient(timeout=30) as http:
            for s in sessions:
                r = await http.get(f"{url}/ws/session/{s['sid']}")
                s["server_status"] = r.status_code
                s["server_frames_processed"] = r.json().get("frames_processed") if r.status_code == 200 else None
    return {"node_a": node_a, "node_b": node_b, "actor_node": actor_node, "restarted_on": restarted_on,
            "killed_processes": killed, "at_kill": at_kill, "baseline": baseline, "sessions": sessions}


if __name__ == "__main__":
    import asyncio

    sys.path[:0] = [str(ROOT), str(ROOT / "clients")]
    result = asyncio.run(_scenario(json.loads(sys.argv[1])))
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # do not wait on a cluster that is being torn down
