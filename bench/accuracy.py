"""End-to-end accuracy of the real app: local Ray + Serve with the oracle backend, frames over the WebSocket.

    python bench/accuracy.py --frames 300 --size 154x112 --window 6 --overlap 2 --noise 0,0.02

For each depth-noise level, deploys the app with the oracle answering for a rendered orbit (per-window random
scale always on), streams the scene's frames as PNG through /ws/reconstruct (keeping fewer than max_in_flight
frames outstanding), and prints per scenario:

- ATE: camera-centre RMSE after one global Sim(3) onto ground truth, % of trajectory length;
- Chamfer: symmetric Chamfer distance of the streamed map (through that Sim(3)) to the true surface
  (serve_app.synthetic.surface_points), % of the scene extent (surface bounding-box diagonal); "floor" is the
  same figure for two independent samples of the true surface, the part due to sampling alone;
- drift: RMSE of the last 10 % of camera centres after a Sim(3) fitted on the first 10 % only, % of length;
- per-window time (median, ms) from the `window` messages, `total` and `geometry`, first vs last 10 % of
  windows, and last/first ratio.

Targets: noise-free ATE < 0.1 % and no growth of per-window time (ratio < 1.5); noisy ATE < 1 %, Chamfer < 1 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.alignment import ate_rmse, chamfer_distance, trajectory_length, umeyama_sim3  # noqa: E402
from serve_app.imaging import encode_image  # noqa: E402
from serve_app.protocol import decode_points, encode_frame_message  # noqa: E402
from serve_app.synthetic import SceneSpec, render_sequence, surface_points  # noqa: E402

GROWTH_LIMIT = 1.5  # last/first per-window time ratio counted as "no growth"
CHAMFER_POINTS = 20000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_args(scene: dict, noise: float, window: int, overlap: int, max_in_flight: int) -> dict:
    return {
        "model": {"backend": "oracle", "oracle_scene": scene, "oracle_depth_noise": noise,
                  "oracle_scale_range": [0.5, 2.0], "oracle_seed": 1},
        "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01},
        "session_defaults": {"process_res": max(scene["width"], scene["height"]), "window_size": window,
                             "overlap": overlap, "point_encoding": "float32"},
        "limits": {"max_in_flight": max_in_flight},
        "session_actor": {"name": f"bench_sessions_{uuid.uuid4().hex[:8]}", "namespace": "da3-bench"},
    }


async def stream(url: str, frames: list[bytes], outstanding: int) -> dict:
    """Create a session, stream every frame with flow control, finalize; returns the messages by type."""
    import httpx
    import websockets

    async with httpx.AsyncClient(timeout=60) as http:
        r = await http.post(url + "/ws/session/create", json={})
        r.raise_for_status()
        sid = r.json()["session_id"]
    msgs: dict[str, list] = {"window": [], "frame_result": [], "error": [], "summary": [], "ack": []}
    chunks = []
    t0 = time.time()
    async with websockets.connect(url.replace("http://", "ws://") + f"/ws/reconstruct/{sid}", max_size=None) as ws:
        ready = json.loads(await ws.recv())
        limit = min(outstanding, ready["max_in_flight"] - 1)
        resend: list[int] = []

        async def reader():
            async for raw in ws:
                if isinstance(raw, bytes):
                    chunks.append(decode_points(raw))
                    continue
                m = json.loads(raw)
                msgs.setdefault(m["type"], []).append(m)
                if m["type"] == "error" and m.get("code") == "QUEUE_FULL":
                    resend.append(int(m["frame_id"]))

        task = asyncio.create_task(reader())
        sent = 0
        while sent < len(frames) or resend:
            while (sent - len(resend)) - len(msgs["frame_result"]) >= limit:
                await asyncio.sleep(0.005)
            i = resend.pop(0) if resend else sent
            await ws.send(encode_frame_message(frames[i], {"frame_id": i, "timestamp": i / 30.0}))
            if i == sent:
                sent += 1
        await ws.send(json.dumps({"type": "finalize"}))
        try:
            await asyncio.wait_for(task, timeout=600)
        except Exception:  # noqa: BLE001 - closed connection ends the reader
            pass
    msgs["chunks"] = chunks
    msgs["wall_s"] = time.time() - t0
    return msgs


def split_median(values: list[float]) -> tuple[float, float]:
    k = max(1, len(values) // 10)
    return float(np.median(values[:k])), float(np.median(values[-k:]))


def evaluate(msgs: dict, seq, spec: SceneSpec) -> dict:
    fr = {f["frame_id"]: f for f in msgs["frame_result"] if f.get("pose") is not None}
    ids = sorted(fr)
    est = np.stack([np.array(fr[i]["pose"], np.float64) for i in ids])
    gt = seq.c2w[ids].astype(np.float64)
    length = trajectory_length(seq.c2w)
    ate, sim = ate_rmse(est, gt)
    k = max(3, len(ids) // 10)
    first = umeyama_sim3(est[:k, :3, 3], gt[:k, :3, 3])
    last = first.apply(est[-k:, :3, 3]).astype(np.float64) - gt[-k:, :3, 3]
    drift = float(np.sqrt((np.linalg.norm(last, axis=1) ** 2).mean()))
    pts = np.concatenate([c.points for c in msgs["chunks"]]) if msgs["chunks"] else np.zeros((0, 3), np.float32)
    surf = surface_points(spec, CHAMFER_POINTS, seed=0, seq=seq)
    extent = float(np.linalg.norm(surf.max(0) - surf.min(0)))
    cham = chamfer_distance(sim.apply(pts), surf, max_points=CHAMFER_POINTS)
    floor = chamfer_distance(surface_points(spec, CHAMFER_POINTS, seed=1, seq=seq), surf, max_points=CHAMFER_POINTS)
    wins = sorted(msgs["window"], key=lambda w: w["seq"])
    tot = split_median([w["timings_ms"]["total"] for w in wins])
    geo = split_median([w["timings_ms"]["geometry"] for w in wins])
    return {"frames": len(ids), "failed": sum(1 for f in msgs["frame_result"] if f.get("failed")),
            "keyframes": sum(1 for f in msgs["frame_result"] if f.get("keyframe")), "windows": len(wins),
            "points": len(pts), "ate_pct": 100 * ate / length, "drift_pct": 100 * drift / length,
            "chamfer_pct": 100 * cham / extent, "floor_pct": 100 * floor / extent,
            "total_first": tot[0], "total_last": tot[1], "total_ratio": tot[1] / max(tot[0], 1e-9),
            "geo_first": geo[0], "geo_last": geo[1], "geo_ratio": geo[1] / max(geo[0], 1e-9),
            "errors": len(msgs["error"]), "wall_s": msgs["wall_s"]}


def targets(noise: float, r: dict) -> list[tuple[str, bool]]:
    if noise == 0:
        return [("ATE < 0.1%", r["ate_pct"] < 0.1),
                (f"geometry time ratio < {GROWTH_LIMIT}", r["geo_ratio"] < GROWTH_LIMIT),
                (f"total time ratio < {GROWTH_LIMIT}", r["total_ratio"] < GROWTH_LIMIT)]
    return [("ATE < 1%", r["ate_pct"] < 1.0), ("Chamfer < 1%", r["chamfer_pct"] < 1.0)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", default="154x112", help="WxH of the rendered frames (sides multiples of 14)")
    ap.add_argument("--window", type=int, default=6)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--noise", default="0,0.02", help="relative depth-noise levels, comma separated")
    ap.add_argument("--laps", type=float, default=1.0, help="orbit laps over the sequence")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--max-in-flight", type=int, default=32)
    ap.add_argument("--outstanding", type=int, default=0,
                    help="frames the client keeps outstanding (default: two windows' worth of new frames)")
    a = ap.parse_args(argv)
    w, h = (int(x) for x in a.size.lower().split("x"))
    spec = SceneSpec(seed=a.seed, num_frames=a.frames, width=w, height=h, trajectory="orbit", speed=a.laps)
    outstanding = a.outstanding or 2 * (a.window - a.overlap)
    noises = [float(x) for x in a.noise.split(",") if x.strip()]

    print(f"rendering {a.frames} frames at {w}x{h} ...", flush=True)
    seq = render_sequence(spec)
    frames = [encode_image(im, "PNG") for im in seq.images]

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app

    # A logical GPU lets the model deployment's `num_gpus: 1` schedule on a CPU-only machine.
    from serve_app.ray_env import RAY_ENV_VARS

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, namespace="da3-bench", log_to_driver=False,
             runtime_env={"env_vars": RAY_ENV_VARS})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        for n, noise in enumerate(noises):
            name, prefix = f"acc{n}", f"/acc{n}"
            serve.run(build_app(app_args(spec.to_dict(), noise, a.window, a.overlap, a.max_in_flight)),
                      name=name, route_prefix=prefix, blocking=False)
            url = base + prefix
            deadline = time.time() + 300
            while httpx.get(url + "/healthz", timeout=10).status_code != 200:
                if time.time() > deadline:
                    raise RuntimeError("app did not become healthy")
                time.sleep(1)
            print(f"streaming scenario noise={noise:g} ...", flush=True)
            msgs = asyncio.run(stream(url, frames, outstanding))
            r = evaluate(msgs, seq, spec)
            rows.append((noise, r))
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"\n{a.frames} frames {w}x{h}, window {a.window}, overlap {a.overlap}, orbit {a.laps:g} lap(s), "
          f"per-window random scale 0.5-2; times are medians over the first/last 10% of windows")
    head = (f"{'noise':>6} {'frames':>6} {'kf':>4} {'win':>4} {'points':>7} {'ATE%':>8} {'drift%':>8} "
            f"{'Chamf%':>7} {'floor%':>7} {'total ms f/l (x)':>22} {'geom ms f/l (x)':>20} {'wall s':>7}")
    print(head)
    print("-" * len(head))
    ok_all = True
    for noise, r in rows:
        print(f"{noise:>6.3f} {r['frames']:>6d} {r['keyframes']:>4d} {r['windows']:>4d} {r['points']:>7d} "
              f"{r['ate_pct']:>8.4f} {r['drift_pct']:>8.4f} {r['chamfer_pct']:>7.3f} {r['floor_pct']:>7.3f} "
              f"{r['total_first']:>8.0f}/{r['total_last']:<6.0f}({r['total_ratio']:.2f}) "
              f"{r['geo_first']:>7.1f}/{r['geo_last']:<5.1f}({r['geo_ratio']:.2f}) {r['wall_s']:>7.1f}")
    for noise, r in rows:
        checks = targets(noise, r)
        if r["failed"] or r["errors"]:
            checks.append(("no failed frames or errors", False))
        ok_all &= all(ok for _, ok in checks)
        print(f"noise {noise:g}: " + ", ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in checks))
    print("all targets met" if ok_all else "some targets NOT met")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
