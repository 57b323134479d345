"""The session store alone (no model, no ingress): how much one SessionActor takes, and what N would.

Several driver processes play ingress replicas against real SessionActors with realistic payloads, taken from a
real session at the chosen resolution (the oracle model + StreamReconstructor, in-process): each frame's client
JPEG, each window's points, colours, frame results and the snapshot the worker commits with them. Every
simulated stream does what the ingress does per window: `accept_frame` per new frame (the ack waits for it),
one `commit_window`, a reader's long-poll (`attach` + `wait_records`), and every `--takeover-every` windows a
takeover (`take_worker` + `point_cloud`, what a reconnect to another replica costs). Streams are closed loops
(the next call goes when the last returned), so calls/s at saturation is the store's capacity.

Shards: through the app's own sharding (`session_actor.shards: N`, serve_app/deployments/session_actor.py:
`get_session_shards` names, places and creates the actors; sessions are created through its admission actor
and every call goes to `of(session_id)`, the shard read from the id). On this 2-core box the shards share the
cores with the drivers, so the figure to project from is the per-shard rate at one shard with a core of its own
(printed with its assumptions).

Reconnect storm: `--storm` sessions, each with `--storm-windows` committed windows, are all taken over at once
(take_worker + point_cloud + the first long-poll answer with the replayed records): time until each stream has
its first record again.

    python bench/store.py                       # 504x378, 1 and 2 shards, 4 driver processes, storm of 64
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
                          max_in_flight=64)
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
    def __init__(self, actor, sid: str, payloads: dict, lat: dict, nbytes: dict):
        self.actor, self.sid, self.p, self.lat, self.nbytes = actor, sid, payloads, lat, nbytes
        self.epoch = 0
        self.index = 0
        self.windows = 0

    async def timed(self, kind: str, method, *args, size: int = 0):
        t0 = time.perf_counter()
        res = await method.remote(*args)
        self.lat[kind].append((time.perf_counter() - t0) * 1000.0)
        self.nbytes[kind] += size
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
            await self.timed("accept_frame", self.actor.accept_frame, self.sid, None, self.epoch, f, self.index,
                             size=len(p["jpeg"]))
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

    async def reader(self, until: float) -> None:
        conn = uuid.uuid4().hex
        await self.actor.attach.remote(self.sid, None, conn)
        seq = 0
        while time.perf_counter() < until:
            res = await self.timed("wait_records", self.actor.wait_records, self.sid, seq, conn,
                                   max(until - time.perf_counter(), 0.05), None)
            recs = res.records
            if recs:
                seq = recs[-1].seq
            if res.gone or res.displaced:
                return


async def drive(cfg, streams: int, seconds: float, payloads: dict, takeover_every: int,
                max_points: int, worker_id: int) -> dict:
    store = open_store(cfg)
    lat = {k: [] for k in KINDS}
    nbytes = {k: 0 for k in KINDS}
    made = []
    for _ in range(streams):
        info = await store.create(session_params(max_points), None)  # the shard is chosen here, as in the app
        sid = info["session_id"]
        made.append(Stream(store.of(sid), sid, payloads, lat, nbytes))
    until = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*[s.writer(until, takeover_every) for s in made], *[s.reader(until) for s in made])
    elapsed = time.perf_counter() - t0
    await asyncio.gather(*[s.actor.delete.remote(s.sid, None) for s in made])
    return {"lat": lat, "bytes": nbytes, "elapsed": elapsed, "windows": sum(s.windows for s in made)}


def _driver(address: str, cfg, streams, seconds, payloads, takeover_every, max_points, worker_id, out_q):
    import ray

    ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
    out_q.put(asyncio.run(drive(cfg, streams, seconds, payloads, takeover_every, max_points, worker_id)))


def run_load(address: str, cfg, args, payloads: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_driver, args=(address, cfg, args.streams, args.seconds, payloads,
                                                args.takeover_every, args.max_points, w, q))
             for w in range(args.procs)]
    for pr in procs:
        pr.start()
    results = [q.get(timeout=args.seconds + 300) for _ in procs]
    for pr in procs:
        pr.join()
    lat = {k: [x for r in results for x in r["lat"][k]] for k in KINDS}
    nbytes = {k: sum(r["bytes"][k] for r in results) for k in KINDS}
    elapsed = max(r["elapsed"] for r in results)
    return {"lat": lat, "bytes": nbytes, "elapsed": elapsed, "windows": sum(r["windows"] for r in results)}


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

    ctx = ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, namespace=NAMESPACE,
                   logging_level="ERROR", runtime_env={"env_vars": dict(RAY_ENV_VARS)})
    address = ctx.address_info["address"]
    run = uuid.uuid4().hex[:6]
    rows, per_shard = [], {}
    try:
        for n in [int(x) for x in args.shards.split(",")]:
            cfg = store_config(f"{run}_{n}", n)
            store = open_store(cfg)
            ray.get([a.ping.remote() for a in store.actors])
            r = run_load(address, cfg, args, payloads)
            calls = sum(len(v) for v in r["lat"].values())
            mb = sum(r["bytes"].values()) / 1e6
            per_shard[n] = calls / r["elapsed"]
            for k in KINDS:
                v = r["lat"][k]
                rows.append([n, k, len(v), fmt(len(v) / r["elapsed"]), fmt(r["bytes"][k] / 1e6 / r["elapsed"], ".2f"),
                             fmt(pct(v, 50), ".2f"), fmt(pct(v, 99), ".2f")])
            rows.append([n, "all", calls, fmt(calls / r["elapsed"]), fmt(mb / r["elapsed"], ".2f"), "", ""])
            rows.append([n, "frames/s", "", fmt(r["windows"] * payloads["new_frames"] / r["elapsed"]), "", "", ""])
            kill_store(store)
        print_table(f"session store under load: {args.procs} processes x {args.streams} closed-loop streams, "
                    f"{args.seconds:.0f} s per shard count, {os.cpu_count()} cores in all",
                    ["shards", "call", "count", "calls/s", "MB/s", "p50 ms", "p99 ms"], rows)
        base = per_shard.get(1)
        if base:
            print("\nscaling (calls/s relative to 1 shard): "
                  + ", ".join(f"{n} shards {v / base:.2f}x" for n, v in per_shard.items()))
            print(f"projection: one shard with a core of its own serves ~{base:.0f} calls/s here "
                  f"(~{base / (1 + 1 / payloads['new_frames']):.0f} frames/s: one accept per frame + one commit "
                  "per window, long-polls and takeovers aside); N shards on N free cores ~N x that, assuming the "
                  "drivers (ingress replicas) and Ray's object transfers are not the bottleneck, which on this "
                  "box they share the cores with")
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
                        "once", ["shards", "streams", "p50 s", "p99 s", "max s"], rows)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
