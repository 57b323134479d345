"""The session store alone (no model, no ingress): how much one SessionActor takes, and what N would.

Several driver processes play ingress replicas against real SessionActors with realistic payloads, taken from a
real session at the chosen resolution (the oracle model + StreamReconstructor, in-process): each frame's client
JPEG, each window's points, colours, frame results and the snapshot the worker commits with them. Every
simulated stream does what the ingress does per window: `accept_frame` per new frame (the ack waits for it;
through the app's SessionShards, so a driver's frames that arrive together share a call, `--accept-batch`),
one `commit_window`, a reader's long-poll (`attach` + `wait_records`; `--reader local` as the app when its own
worker commits, `full` every record through the poll), and every `--takeover-every` windows a takeover
(`take_worker` + `point_cloud`, what a reconnect to another replica costs). Streams are closed loops (the next
call goes when the last returned), so frames/s at saturation is the store's capacity; then one shard paced
(open loop) at fractions of it (`--paced`) for the latency targets, and the highest rate that meets them.
`--pin` (default with 2+ cores) gives the shard a core of its own: the driver processes, this process and Ray's
own (GCS, raylet, workers) run on the other cores.

The profile first: where one call's time goes, Ray's floor (an empty method with the same arguments) for an
async, a sync and a threaded actor, and the shard's CPU per call kind (back to back, and pings 5 ms apart).

Shards: through the app's own sharding (`session_actor.shards: N`, serve_app/deployments/session_actor.py:
`get_session_shards` names, places and creates the actors; sessions are created through its admission actor
and every call goes to `of(session_id)`, the shard read from the id). On this 2-core box the shards share the
cores with the drivers, so the figure to project from is the per-shard rate at one shard with a core of its own
(printed with its assumptions).

Reconnect storm: `--storm` sessions, each with `--storm-windows` committed windows, are all taken over at once
(take_worker + point_cloud + the first long-poll answer with the replayed records): time until each stream has
its first record again.

    python bench/store.py                       # 504x378, 1 and 2 shards, 4 driver processes, storm of 64
    python bench/store.py --shards 1 --procs 2 --streams 8 --storm 0   # bench/README.md, third pass
    python bench/store.py --shards 1,2,4 --procs 4 --streams 8 --seconds 15
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from measure import fmt, pct, print_table

NAMESPACE = "da3-bench-store"
KINDS = ("accept_frame", "commit_window", "wait_records", "take_worker", "point_cloud")


# --- payloads ---------------------------------------------------------------------------------------------
def make_payloads(width: int, height: int, window: int, overlap: int) -> dict:
    """One real session's per-frame and per-window payloads at this size (oracle model, in-process)."""
    import cv2

    from serve_app.config import SessionParams
    from serve_app.evaluation.synthetic import SceneSpec, render_sequence
    from serve_app.model.oracle import OracleModel
    from serve_app.recon.reconstruction import FrameInput, StreamReconstructor

    spec = SceneSpec.from_dict({"seed": 3, "num_frames": window + 2 * (window - overlap), "width": width,
                                "height": height, "trajectory": "orbit"})
    oracle = OracleModel(spec)
    seq = render_sequence(spec)
    params = SessionParams(window_size=window, overlap=overlap, process_res=max(width, height))
    recon = StreamReconstructor(params)
    jpegs = [cv2.imencode(".jpg", im[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for im in seq.images]
    for i, im in enumerate(seq.images):
        recon.add_frame(FrameInput(index=i, frame_id=i, image=im, original_size=(width, height), encoded=jpegs[i]))
    outs = []
    while (plan := recon.next_window()) is not None:
        pred = oracle.forward_windows([plan.request()])[0]
        outs.append((recon.integrate(plan, pred), recon.snapshot()))
    out, snap = outs[-1]  # a steady-state window: context frames in its snapshot
    return {"jpeg": jpegs[-1], "window": out.window, "frames": out.frames, "points": out.points,
            "colors": out.colors, "snapshot": snap, "new_frames": window - overlap}


def payload_sizes(p: dict) -> dict:
    import pickle

    return {"frame_kB": len(p["jpeg"]) / 1e3,
            "points": len(p["points"]),
            "commit_kB": len(pickle.dumps((p["window"], p["frames"], p["points"], p["colors"], p["snapshot"]))) / 1e3,
            "snapshot_kB": len(pickle.dumps(p["snapshot"])) / 1e3}


# --- actors -----------------------------------------------------------------------------------------------
def store_config(run: str, shards: int):
    from serve_app.config import LimitsConfig, SessionActorConfig

    limits = LimitsConfig(max_sessions=100_000, max_sessions_per_key=100_000, sessions_per_minute=1e9,
                          max_in_flight=4096)
    return SessionActorConfig(name=f"bench_store_{run}", namespace=NAMESPACE, shards=shards), limits


def open_store(cfg):
    """The app's view of the sharded store (get_if_exists: every driver process gets the same actors)."""
    from serve_app.deployments.session_actor import get_session_shards

    return get_session_shards(*cfg)


def kill_store(store) -> None:
    import ray

    for a in store.actors + ([store.admission] if store.admission is not None else []):
        ray.kill(a)


def session_params(max_points: int) -> dict:
    return {"max_points": max_points, "max_frames": 1_000_000}


# --- one driver process (an ingress replica's worth of streams) ---------------------------------------------
class Stream:
    def __init__(self, actor, sid: str, payloads: dict, lat: dict, nbytes: dict, shard: int = 0,
                 per_shard: dict | None = None, store=None, reader: str = "local"):
        self.actor, self.sid, self.p, self.lat, self.nbytes = actor, sid, payloads, lat, nbytes
        self.store, self.reader_mode = store, reader  # accepts go through the app's SessionShards (batching)
        self.shard, self.per_shard = shard, per_shard if per_shard is not None else {}
        self.epoch = 0
        self.late = 0  # paced windows that started late (the store or the box could not keep up)
        self.index = 0
        self.windows = 0

    async def timed(self, kind: str, method, *args, size: int = 0):
        t0 = time.perf_counter()
        res = await (method(*args) if kind == "accept_frame" and self.store is not None else method.remote(*args))
        self.lat[kind].append((time.perf_counter() - t0) * 1000.0)
        self.nbytes[kind] += size
        self.per_shard[self.shard] = self.per_shard.get(self.shard, 0) + 1
        return res

    async def take_over(self) -> None:
        took = await self.timed("take_worker", self.actor.take_worker, self.sid)
        self.epoch = took.epoch
        if took.stream_state is not None:
            pts, _ = await self.timed("point_cloud", self.actor.point_cloud, self.sid, None)
            self.nbytes["point_cloud"] += int(pts.nbytes * 1.25)  # + uint8 colours

    async def window(self) -> None:
        from serve_app.recon.reconstruction import FrameInput

        p = self.p
        frames = []
        for _ in range(p["new_frames"]):
            f = FrameInput(index=self.index, frame_id=self.index, image=None, original_size=(0, 0),
                           encoded=p["jpeg"])
            await self.timed("accept_frame", self.store.accept_frame if self.store is not None else
                             self.actor.accept_frame, self.sid, None, self.epoch, f, self.index, size=len(p["jpeg"]))
            frames.append({**p["frames"][len(frames) % len(p["frames"])], "index": self.index})
            self.index += 1
        await self.timed("commit_window", self.actor.commit_window, self.sid, p["window"], frames, p["points"],
                         p["colors"], p["snapshot"], False, self.epoch, size=p["commit_bytes"])
        self.windows += 1

    async def writer(self, until: float, takeover_every: int) -> None:
        await self.take_over()
        while time.perf_counter() < until:
            await self.window()
            if takeover_every and self.windows % takeover_every == 0:
                await self.take_over()

    async def paced_writer(self, until: float, takeover_every: int, period: float, offset: float) -> None:
        """Open loop: a window every `period` seconds (its frames back to back, as a camera's arrive between
        two windows), whatever the store's latency; a window due while the last is still out starts at once."""
        await self.take_over()
        due = time.perf_counter() + offset
        while time.perf_counter() < until:
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.25 * period:
                self.late += 1
            await self.window()
            due += period
            if takeover_every and self.windows % takeover_every == 0:
                await self.take_over()

    async def reader(self, until: float) -> None:
        conn = uuid.uuid4().hex
        await self.actor.attach.remote(self.sid, None, conn)
        seq = 0
        while time.perf_counter() < until:
            # "local": as the app's ingress when its own worker commits (the records reach the client straight
            # from the worker; the long-poll leaves them out and waits for status changes); "full": a reader
            # on another replica, every record through the long-poll
            res = await self.timed("wait_records", self.actor.wait_records, self.sid, seq, conn,
                                   max(until - time.perf_counter(), 0.05),
                                   self.epoch if self.reader_mode == "local" else None)
            recs = res.records
            if recs:
                seq = recs[-1].seq
            if res.gone or res.displaced:
                return


async def drive(cfg, streams: int, seconds: float, payloads: dict, takeover_every: int,
                max_points: int, worker_id: int, window_period: float | None = None, reader: str = "local",
                accept_batch: int = 32) -> dict:
    """One driver's streams: closed loop, or paced at one window per `window_period` s per stream."""
    from serve_app.sessions.shards import shard_of

    store = open_store(cfg)
    store.accept_batch = accept_batch  # as an ingress replica with session_actor.accept_batch
    lat = {k: [] for k in KINDS}
    nbytes = {k: 0 for k in KINDS}
    per_shard: dict[int, int] = {}
    made = []
    for _ in range(streams):
        info = await store.create(session_params(max_points), None)  # the shard is chosen here, as in the app
        sid = info["session_id"]
        made.append(Stream(store.of(sid), sid, payloads, lat, nbytes, shard_of(sid, len(store.actors)), per_shard,
                           store, reader))
    until = time.perf_counter() + seconds
    t0 = time.perf_counter()
    if window_period:  # streams spread over the period, so the load is even rather than in bursts
        writers = [s.paced_writer(until, takeover_every, window_period, window_period * (k + worker_id / 7) / streams)
                   for k, s in enumerate(made)]
    else:
        writers = [s.writer(until, takeover_every) for s in made]
    await asyncio.gather(*writers, *[s.reader(until) for s in made])
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*[s.actor.delete.remote(s.sid, None) for s in made])
    acc = store.accept_counts()
    calls = sum(per_shard.values()) - len(lat["accept_frame"]) + (acc["calls"] if accept_batch > 1 else
                                                                   len(lat["accept_frame"]))
    return {"lat": lat, "bytes": nbytes, "elapsed": elapsed, "windows": sum(s.windows for s in made),
            "per_shard": per_shard, "late": sum(s.late for s in made), "store_calls": calls}


def _driver(address: str, cfg, streams, seconds, payloads, takeover_every, max_points, worker_id, period, out_q,
            reader="local", accept_batch=32, cpus=None):
    import ray

    from serve_app.ray_env import RAY_ENV_VARS

    # An ingress replica runs with the app's Ray settings (its runtime_env): arguments up to 1 MiB (a commit's
    # points and snapshot) travel inside the call, not through the object store. The caller decides, so the
    # drivers that play the replicas need them too.
    os.environ.update(RAY_ENV_VARS)
    if cpus:  # the drivers keep off the shard's core (--pin)
        os.sched_setaffinity(0, cpus)
    ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    out_q.put(asyncio.run(drive(cfg, streams, seconds, payloads, takeover_every, max_points, worker_id, period,
                                reader, accept_batch)))


def run_load(address: str, cfg, args, payloads: dict, window_period: float | None = None,
             accept_batch: int = 32, driver_cpus=None) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_driver, args=(address, cfg, args.streams, args.seconds, payloads,
                                                args.takeover_every, args.max_points, w, window_period, q,
                                                args.reader, accept_batch, driver_cpus))
             for w in range(args.procs)]
    for pr in procs:
        pr.start()
    results = [q.get(timeout=args.seconds + 300) for _ in procs]
    for pr in procs:
        pr.join()
    lat = {k: [x for r in results for x in r["lat"][k]] for k in KINDS}
    nbytes = {k: sum(r["bytes"][k] for r in results) for k in KINDS}
    elapsed = max(r["elapsed"] for r in results)
    per_shard: dict[int, int] = {}
    for r in results:
        for k, v in r["per_shard"].items():
            per_shard[k] = per_shard.get(k, 0) + v
    return {"lat": lat, "bytes": nbytes, "elapsed": elapsed, "windows": sum(r["windows"] for r in results),
            "per_shard": per_shard, "late": sum(r["late"] for r in results),
            "store_calls": sum(r["store_calls"] for r in results)}


def actor_pid(a) -> int:
    import ray

    return ray._private.state.actors(a._actor_id.hex())["Pid"]


def pin_process(p, cpus: set[int]) -> None:
    """Every thread of psutil process `p` on `cpus` (affinity is per thread on Linux)."""
    for t in p.threads():
        os.sched_setaffinity(t.id, cpus)


def pin_actors(actors, cpus: set[int] | None) -> None:
    """Each shard's process (and its threads) on `cpus` (--pin: a core of its own, the drivers elsewhere)."""
    import psutil

    if cpus:
        for a in actors:
            pin_process(psutil.Process(actor_pid(a)), cpus)


def pin_ray_processes(cpus: set[int] | None) -> int:
    """This process and every process Ray started for it (GCS, raylet, idle workers) off the shard's core, so
    that with --pin the shard has its core to itself; workers started later inherit the raylet's affinity (a
    shard actor is then moved by pin_actors). Returns the processes pinned."""
    import psutil

    if not cpus:
        return 0
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]
    for p in procs:
        try:
            pin_process(p, cpus)
        except (psutil.Error, OSError):  # exited meanwhile
            continue
    return len(procs)


def actor_cpu_s(actors) -> list[float]:
    """CPU seconds (user + system) each shard actor's process has used so far (same machine)."""
    import psutil

    out = []
    for a in actors:
        t = psutil.Process(actor_pid(a)).cpu_times()
        out.append(t.user + t.system)
    return out


# --- reconnect storm ----------------------------------------------------------------------------------------
async def storm(cfg, sessions: int, windows: int, payloads: dict, max_points: int) -> list[float]:
    """Seconds until each of `sessions` streams, all taken over at the same moment, has its first record."""
    store = open_store(cfg)
    lat = {k: [] for k in KINDS}
    nbytes = {k: 0 for k in KINDS}
    made = []
    for _ in range(sessions):
        info = await store.create(session_params(max_points), None)
        sid = info["session_id"]
        made.append(Stream(store.of(sid), sid, payloads, lat, nbytes))
    for s in made:
        await s.take_over()
    for _ in range(windows):
        await asyncio.gather(*[s.window() for s in made])

    async def reconnect(s: Stream, t0: float) -> float:
        await s.take_over()
        conn = uuid.uuid4().hex
        await s.actor.attach.remote(s.sid, None, conn)
        res = await s.actor.wait_records.remote(s.sid, 0, conn, 30.0, None)
        assert res.records, res
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    times = await asyncio.gather(*[reconnect(s, t0) for s in made])
    await asyncio.gather(*[s.actor.delete.remote(s.sid, None) for s in made])
    return list(times)


# --- where a call's time goes -------------------------------------------------------------------------------
def _frame(p: dict, i: int):
    from serve_app.recon.reconstruction import FrameInput

    return FrameInput(index=i, frame_id=i, image=None, original_size=(0, 0), encoded=p["jpeg"])


def _commit_args(p: dict, sid: str, first: int, epoch: int) -> tuple:
    frames = [{**p["frames"][k % len(p["frames"])], "index": first + k} for k in range(p["new_frames"])]
    return (sid, p["window"], frames, p["points"], p["colors"], p["snapshot"], False, epoch)


def profile_path(p: dict, max_points: int, windows: int = 300) -> dict:
    """ms per call of: Ray's serialisation of the arguments, the actor method itself (in-process, memory
    backend, no Ray), and with `ray` up the whole call through a fresh one-shard store with nothing else
    running (one call at a time). What the whole call costs beyond the first two is Ray's RPC and the loops."""
    import ray

    from serve_app.config import LimitsConfig
    from serve_app.deployments.session_actor import SessionActor

    ctx = ray._private.worker.global_worker.get_serialization_context()
    out: dict = {}

    def ser(args) -> float:
        ts = []
        for _ in range(30):
            t0 = time.perf_counter()
            ctx.serialize(args)
            ts.append((time.perf_counter() - t0) * 1000.0)
        return pct(ts, 50)

    out["serialise"] = {"accept_frame": ser(("sid", None, 1, _frame(p, 0), 0)),
                        "commit_window": ser(_commit_args(p, "sid", 0, 1))}

    async def inproc() -> dict:
        a = SessionActor(LimitsConfig(max_sessions=10, max_in_flight=64).model_dump())
        sid = (await a.create(session_params(max_points), None))["session_id"]
        ep = (await a.take_worker(sid)).epoch
        lat: dict = {"accept_frame": [], "commit_window": []}
        idx = 0
        for _ in range(windows):
            for _ in range(p["new_frames"]):
                t0 = time.perf_counter()
                await a.accept_frame(sid, None, ep, _frame(p, idx), idx)
                lat["accept_frame"].append((time.perf_counter() - t0) * 1000.0)
                idx += 1
            args = _commit_args(p, sid, idx - p["new_frames"], ep)
            t0 = time.perf_counter()
            await a.commit_window(*args)
            lat["commit_window"].append((time.perf_counter() - t0) * 1000.0)
        return lat

    out["in_process"] = asyncio.run(inproc())

    async def remote() -> dict:
        cfg = store_config(uuid.uuid4().hex[:6] + "_prof", 1)
        store = open_store(cfg)
        lat = {k: [] for k in KINDS}
        st = Stream(store.actors[0], (await store.create(session_params(max_points), None))["session_id"], p, lat,
                    {k: 0 for k in KINDS})
        await st.take_over()
        for _ in range(windows // 3):
            await st.window()
        kill_store(store)
        return lat

    out["remote"] = asyncio.run(remote())

    class Bare:
        """Ray's floor: an async actor with the shard's options that does nothing with the same arguments."""

        async def echo(self, *args) -> None:
            return None

    class BareSync:
        """The same as a sync actor (one thread, or a pool with max_concurrency > 1): no event-loop hand-off."""

        def echo(self, *args) -> None:
            return None

    async def floor(cls, **options) -> dict:
        a = ray.remote(cls).options(num_cpus=0, **options).remote()
        await a.echo.remote()
        lat: dict = {"accept_frame": [], "commit_window": []}
        c0 = actor_cpu_s([a])[0]
        for i in range(windows // 3 * p["new_frames"]):
            for kind, args in (("accept_frame", ("sid", None, 1, _frame(p, i), i)),
                               ("commit_window", _commit_args(p, "sid", i, 1))):
                if kind == "commit_window" and i % p["new_frames"]:
                    continue
                t0 = time.perf_counter()
                await a.echo.remote(*args)
                lat[kind].append((time.perf_counter() - t0) * 1000.0)
        lat["cpu_ms"] = (actor_cpu_s([a])[0] - c0) * 1000.0 / (len(lat["accept_frame"]) + len(lat["commit_window"]))
        ray.kill(a)
        return lat

    # The shard is an async actor (long-polls wait in it); a sync or threaded one would not be cheaper per call.
    out["floor_kinds"] = {"async (the shard's kind)": asyncio.run(floor(Bare, max_concurrency=1000)),
                          "sync": asyncio.run(floor(BareSync)),
                          "threaded (8)": asyncio.run(floor(BareSync, max_concurrency=8))}
    out["floor"] = out["floor_kinds"]["async (the shard's kind)"]

    async def cpu_per_call(n: int = 200, batch: int = 8) -> dict:
        """The shard process's CPU ms per call of each kind, one call at a time (its fixed per-call cost is
        what a batch of accepts shares)."""
        cfg = store_config(uuid.uuid4().hex[:6] + "_cpu", 1)
        store = open_store(cfg)
        a = store.actors[0]
        sid = (await store.create(session_params(max_points), None))["session_id"]
        ep = (await a.take_worker.remote(sid)).epoch
        idx = 0
        res: dict = {}

        async def measure(name, make_call, calls_per=1):
            c0 = actor_cpu_s([a])[0]
            for _ in range(n):
                await make_call()
            res[name] = (actor_cpu_s([a])[0] - c0) * 1000.0 / n / calls_per

        await measure("ping (no work)", lambda: a.ping.remote())

        async def spaced_ping():
            await asyncio.sleep(0.005)
            await a.ping.remote()

        # A paced load's calls find the process idle: waking its threads costs more than back-to-back calls.
        await measure("ping, one every 5 ms", spaced_ping)

        async def one_accept():
            nonlocal idx
            await a.accept_frame.remote(sid, None, ep, _frame(p, idx), idx)
            idx += 1

        async def batch_accept():
            nonlocal idx
            await a.accept_frames.remote([(sid, None, ep, _frame(p, idx + k), idx + k) for k in range(batch)])
            idx += batch

        async def commit():
            nonlocal idx
            await a.commit_window.remote(*_commit_args(p, sid, idx - p["new_frames"], ep))

        await measure("accept_frame (1 frame)", one_accept)
        await measure(f"accept_frames ({batch} frames), per frame", batch_accept, batch)
        await measure("commit_window", commit)
        kill_store(store)
        return res

    out["cpu"] = asyncio.run(cpu_per_call())
    return out


# --- main -----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="504x378", help="frame W x H of the payloads (default 504x378)")
    ap.add_argument("--window", type=int, default=6)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--shards", default="1,2", help="comma-separated shard counts to measure")
    ap.add_argument("--procs", type=int, default=4, help="driver processes (ingress replicas)")
    ap.add_argument("--streams", type=int, default=4, help="closed-loop streams per driver process")
    ap.add_argument("--seconds", type=float, default=12.0, help="load duration per shard count")
    ap.add_argument("--takeover-every", type=int, default=20, help="windows between takeovers of a stream (0: none)")
    ap.add_argument("--max-points", type=int, default=300_000, help="per-session point budget")
    ap.add_argument("--accept-batch", default="1,32",
                    help="comma-separated session_actor.accept_batch values for the saturation runs (1: a call "
                         "per frame, as before issue 19's third pass); the last one is used for the paced sweep")
    ap.add_argument("--reader", choices=("local", "full"), default="local",
                    help="long-polls as the app's ingress when its own worker commits (local: the records go "
                         "to the client from the worker, the poll waits for status changes) or every record "
                         "through the long-poll (full: a reader on another replica)")
    ap.add_argument("--paced", default="0.25,0.5,0.75,0.9,1.0",
                    help="then paced (open-loop) runs on one shard at these fractions of its measured saturation "
                         "throughput, for the latency targets (empty: skip)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=(os.cpu_count() or 1) >= 2,
                    help="the shard on core 0, the driver processes on the other cores (default: with 2+ cores)")
    ap.add_argument("--project", default="1,2,4,8,16", help="shard counts to project capacity for")
    ap.add_argument("--storm", type=int, default=64, help="sessions in the reconnect storm (0: skip)")
    ap.add_argument("--storm-windows", type=int, default=10, help="committed windows per storm session")
    ap.add_argument("--storm-shards", default="1", help="comma-separated shard counts for the storm")
    args = ap.parse_args(argv)

    import pickle

    import ray

    from serve_app.ray_env import RAY_ENV_VARS

    w, h = (int(x) for x in args.size.lower().split("x"))
    payloads = make_payloads(w, h, args.window, args.overlap)
    payloads["commit_bytes"] = len(pickle.dumps((payloads["window"], payloads["frames"], payloads["points"],
                                                 payloads["colors"], payloads["snapshot"])))
    sizes = payload_sizes(payloads)
    print(f"payloads at {w}x{h}, W={args.window} k={args.overlap}: frame {sizes['frame_kB']:.1f} kB, window "
          f"{sizes['points']} points, commit {sizes['commit_kB']:.0f} kB (snapshot {sizes['snapshot_kB']:.0f} kB)",
          flush=True)
    ncpu = os.cpu_count() or 1
    shard_cpus = {0} if args.pin else None
    driver_cpus = set(range(1, ncpu)) if args.pin else None
    os.environ.update(RAY_ENV_VARS)  # this process calls the store too (profile, storm): as an ingress would
    for attempt in range(3):  # Ray gives its raylet 30 s to register: not always enough on a loaded box
        try:
            ctx = ray.init(num_cpus=ncpu, include_dashboard=False, namespace=NAMESPACE,
                           logging_level="ERROR", runtime_env={"env_vars": dict(RAY_ENV_VARS)})
            break
        except Exception as exc:
            print(f"ray.init failed ({exc}); retrying", flush=True)
            ray.shutdown()
            if attempt == 2:
                raise
    address = ctx.address_info["address"]
    run = uuid.uuid4().hex[:6]
    batches = [int(x) for x in args.accept_batch.split(",")]
    try:
        prof = profile_path(payloads, args.max_points)
        rows = []
        for k in ("accept_frame", "commit_window"):
            ip, rm, fl = prof["in_process"][k], prof["remote"][k], prof["floor"][k]
            rows.append([k, fmt(prof["serialise"][k], ".2f"), fmt(pct(ip, 50), ".3f"), fmt(pct(ip, 99), ".3f"),
                         fmt(pct(rm, 50), ".2f"), fmt(pct(rm, 99), ".2f"),
                         fmt(pct(rm, 50) - prof["serialise"][k] - pct(ip, 50), ".2f"),
                         f"{pct(fl, 50):.2f} / {pct(fl, 99):.2f}"])
        print_table("where one call's time goes (one call at a time, nothing else running on the store); the "
                    "floor: an empty async actor method called with the same arguments (Ray on this box)",
                    ["call", "serialise ms", "actor p50 ms", "actor p99 ms", "whole call p50", "p99",
                     "Ray + loops p50 ms", "floor p50 / p99 ms"], rows)
        print_table("Ray's floor by actor kind: an empty method with the same arguments, one call at a time; CPU of "
                    "the actor's process per call", ["actor", "accept p50 / p99 ms", "commit p50 / p99 ms",
                                                      "CPU ms per call"],
                    [[kind, f"{pct(v['accept_frame'], 50):.2f} / {pct(v['accept_frame'], 99):.2f}",
                      f"{pct(v['commit_window'], 50):.2f} / {pct(v['commit_window'], 99):.2f}",
                      fmt(v["cpu_ms"], ".2f")] for kind, v in prof["floor_kinds"].items()])
        print_table("the shard process's CPU per call, one call at a time (unpinned)", ["call", "CPU ms"],
                    [[k, fmt(v, ".2f")] for k, v in prof["cpu"].items()])

        if args.pin:  # for the load runs only: the profile above and the storm below run unpinned
            n = pin_ray_processes(driver_cpus)
            print(f"\npinned: each shard's process on core 0; the {args.procs} driver processes, this process and "
                  f"Ray's own ({n} processes: GCS, raylet, workers) on cores 1-{ncpu - 1}; other processes on the "
                  "box are not pinned", flush=True)
        rows, sat = [], {}
        for n in [int(x) for x in args.shards.split(",")]:
            for b in batches:
                cfg = store_config(f"{run}_{n}_{b}", n)
                store = open_store(cfg)
                ray.get([a.ping.remote() for a in store.actors])
                pin_actors(store.actors, shard_cpus)
                cpu0 = actor_cpu_s(store.actors)
                r = run_load(address, cfg, args, payloads, accept_batch=b, driver_cpus=driver_cpus)
                cpu = [y - x for x, y in zip(cpu0, actor_cpu_s(store.actors), strict=True)]
                kill_store(store)
                frames = r["windows"] * payloads["new_frames"]
                sat[(n, b)] = v = {
                    "fps": frames / r["elapsed"], "calls_s": r["store_calls"] / r["elapsed"],
                    "cores": sum(cpu) / r["elapsed"], "cpu_call_ms": sum(cpu) * 1e3 / max(r["store_calls"], 1),
                    "cpu_frame_ms": sum(cpu) * 1e3 / max(frames, 1),
                    "calls_frame": r["store_calls"] / max(frames, 1),
                    "shard_cores": " / ".join(fmt(c / r["elapsed"], ".2f") for c in cpu)}
                acc, com = r["lat"]["accept_frame"], r["lat"]["commit_window"]
                rows.append([n, b, fmt(v["fps"]), fmt(v["calls_s"]), fmt(v["calls_frame"], ".2f"),
                             v["shard_cores"], fmt(v["cpu_call_ms"], ".2f"), fmt(v["cpu_frame_ms"], ".2f"),
                             f"{pct(acc, 50):.1f} / {pct(acc, 99):.1f}", f"{pct(com, 50):.1f} / {pct(com, 99):.1f}",
                             fmt(pct(r["lat"]["take_worker"], 99), ".1f")])
        print_table(f"saturation (closed loop): {args.procs} driver processes x {args.streams} streams, "
                    f"{args.seconds:.0f} s each, reader {args.reader}, {ncpu} cores in all",
                    ["shards", "accept_batch", "frames/s", "store calls/s", "calls/frame", "shard CPU (cores)",
                     "CPU ms/call", "CPU ms/frame", "accept p50/p99 ms", "commit p50/p99 ms", "take_worker p99"],
                    rows)
        b = batches[-1]
        base = sat.get((1, b))
        if base:
            per_frame_ms = base["cpu_frame_ms"]
            core_fps = 1000.0 / per_frame_ms
            print(f"\none shard (accept_batch {b}) used {per_frame_ms:.2f} ms of CPU per frame "
                  f"({base['cpu_call_ms']:.2f} per store call, {base['calls_frame']:.2f} calls per frame in this "
                  f"mix, {base['cores']:.2f} cores at {base['fps']:.0f} frames/s); with a core of its own: "
                  f"~{core_fps:.0f} frames/s")
            print("projection (assumptions: 1 core per shard for its event loop, its persistence threads and "
                  "Ray's per-call work; the ingress replicas on cores of their own; shards share nothing; the "
                  "memory backend - Redis adds its own round trip per call and needs its own cores):")
            for n in [int(x) for x in args.project.split(",")]:
                print(f"  {n:3d} shards: ~{n * core_fps:7.0f} frames/s")
        if base and args.paced:
            streams = args.procs * args.streams
            rows, best = [], None
            for frac in [float(x) for x in args.paced.split(",")]:
                target_fps = frac * base["fps"]
                period = streams * payloads["new_frames"] / target_fps
                cfg = store_config(f"{run}_paced{frac}", 1)
                store = open_store(cfg)
                ray.get([a.ping.remote() for a in store.actors])
                pin_actors(store.actors, shard_cpus)
                cpu0 = actor_cpu_s(store.actors)
                r = run_load(address, cfg, args, payloads, window_period=period, accept_batch=b,
                             driver_cpus=driver_cpus)
                cores = (actor_cpu_s(store.actors)[0] - cpu0[0]) / r["elapsed"]
                kill_store(store)
                got_fps = r["windows"] * payloads["new_frames"] / r["elapsed"]
                acc, com = r["lat"]["accept_frame"], r["lat"]["commit_window"]
                ok = pct(acc, 99) < 10 and pct(com, 99) < 20 and r["late"] == 0
                if ok:
                    best = (frac, target_fps, r["store_calls"] / r["elapsed"])
                rows.append([f"{frac:.0%}", fmt(target_fps), fmt(got_fps), r["late"],
                             fmt(r["store_calls"] / r["elapsed"]), fmt(cores, ".2f"),
                             f"{pct(acc, 50):.1f} / {pct(acc, 99):.1f}", f"{pct(com, 50):.1f} / {pct(com, 99):.1f}",
                             fmt(pct(r["lat"]["take_worker"], 99), ".1f"), "met" if ok else "NOT met"])
                print(f"  paced {frac:.0%}: accept p99 {pct(acc, 99):.1f} ms, commit p99 {pct(com, 99):.1f} ms",
                      flush=True)
            print_table(f"one shard paced (open loop) at fractions of its saturation throughput "
                        f"({base['fps']:.0f} frames/s, accept_batch {b}); {streams} streams, windows spread evenly; "
                        "targets: accept_frame p99 < 10 ms and commit_window p99 < 20 ms, no window started late",
                        ["load", "frames/s offered", "served", "late windows", "store calls/s", "shard cores",
                         "accept p50/p99 ms", "commit p50/p99 ms", "take_worker p99", "targets"], rows)
            if best:
                print(f"highest paced rate with both targets met: {best[1]:.0f} frames/s = {best[2]:.0f} store "
                      f"calls/s = {best[0]:.0%} of the saturation throughput")
            else:
                print("both targets met at none of the paced rates")
        if args.pin:
            pin_ray_processes(set(range(ncpu)))
        if args.storm:
            rows = []
            for n in [int(x) for x in args.storm_shards.split(",")]:
                cfg = store_config(f"{run}_storm{n}", n)
                store = open_store(cfg)
                times = asyncio.run(storm(cfg, args.storm, args.storm_windows, payloads, args.max_points))
                rows.append([n, len(times), fmt(pct(times, 50), ".3f"), fmt(pct(times, 99), ".3f"),
                             fmt(max(times), ".3f")])
                kill_store(store)
            print_table(f"reconnect storm: {args.storm} sessions x {args.storm_windows} windows, all taken over at "
                        "once (target: p99 < 2 s)", ["shards", "streams", "p50 s", "p99 s", "max s"], rows)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
