"""Serving benchmark: what the app delivers end to end versus what the bare model can do, in one run.

    .venv/bin/python bench/serving.py                      # CPU defaults (random:da3-small, 154x112, W=4, k=2)
    .venv/bin/python bench/serving.py --ks 1,4 --long-frames 120 --skip c

Sections (all ratios use numbers measured in this same run):
  (a) raw runtime: backend.forward_windows in-process at batch 1 and at max_batch_size -> views/s, new-frames/s
  (b) end to end: K concurrent sessions at full speed with flow control -> frames/s, (b)/(a), batch size,
      p50/p95 frame latency and window split queue / model / geometry / delivery; then --pairs back-to-back
      (a)+(b) pairs at K=4, whose median ratio is the one judged against the target
  (c) batching gain: K=4 with max_batch_size=1 vs the default
  (d) long stream: first 10 vs last 10 windows of one long session, ingress / session-actor RSS
  (e) wire efficiency: DA3P float16 vs float32 JSON vs a full GLB after each window
  (f) single stream paced at --fps: sustained frames/s and latency vs model time
  (g) the shape's floor: the same hops as (f)'s last frame (proxy, model deployment, session-store commit, proxy)
      with window-sized payloads and no work, so (f)'s overhead splits into what Ray Serve costs on this machine
      and what the app's own code adds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import LocalApp, app_args, rss_mb, stats, stream_many, stream_session, synthetic_frames
from measure import fmt, mean, median_time_s, parse_pair, pct, print_table

from serve_app.config import ModelConfig, SessionParams
from serve_app.media.imaging import decode_image
from serve_app.model.backends import make_backend
from serve_app.model.preprocess import resize_for_model
from serve_app.prediction import WindowRequest
from serve_app.protocol import ENC_FLOAT16
from serve_app.recon.exports import glb_bytes
from serve_app.recon.reconstruction import FrameInput, StreamReconstructor


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "NOT MET")


# --- (a) ----------------------------------------------------------------------------------------------------
def raw_runtime(a, frames: list[bytes], record: bool = False) -> dict:
    import torch

    torch.set_num_threads(a.threads)  # the model replica gets OMP_NUM_THREADS=a.threads too
    cfg = ModelConfig(backend=a.backend, checkpoint=a.model, amp="auto",
                      oracle_scene={"seed": 3, "num_frames": 48, "width": a.width, "height": a.height,
                                    "trajectory": "orbit"})
    be = make_backend(cfg)
    imgs = [resize_for_model(decode_image(f), a.process_res).image for f in frames]
    W = a.window
    wins = [np.stack(imgs[i:i + W]) for i in range(0, len(imgs) - W + 1, W - a.overlap)]
    out = {"shape": tuple(wins[0].shape)}
    for b in sorted({1, a.max_batch}):
        reqs = [WindowRequest(images=wins[i % len(wins)], tag=f"b{i}") for i in range(b)]
        t = median_time_s(lambda reqs=reqs, fw=be.forward_windows: fw(reqs), a.repeats)
        out[b] = {"s_per_batch": t, "views_s": b * W / t, "windows_s": b / t, "new_frames_s": b * (W - a.overlap) / t}
    if record:
        out["record"] = record_sizes(a, be, frames, imgs)
    del be
    gc.collect()
    return out


def record_sizes(a, be, frames: list[bytes], imgs: list[np.ndarray], windows: int = 3) -> dict:
    """Points per window and the pickled session snapshot a commit carries, from a few windows integrated
    in-process (section (g) sends payloads of these sizes)."""
    rec = StreamReconstructor(SessionParams(process_res=a.process_res, window_size=a.window, overlap=a.overlap))
    for i, (f, im) in enumerate(zip(frames, imgs)):
        rec.add_frame(FrameInput(index=i, frame_id=i, image=im, original_size=(a.width, a.height), encoded=f))
    points, snap = [], 0
    for _ in range(windows):
        plan = rec.next_window()
        if plan is None:
            break
        points.append(len(rec.integrate(plan, be.forward_windows([plan.request()])[0]).points))
        snap = len(pickle.dumps(rec.snapshot(), protocol=5))
    return {"points": int(statistics.median(points)), "snapshot_bytes": snap}


# --- (b) helpers --------------------------------------------------------------------------------------------
def summarize(results, wall: float) -> dict:
    rows = [w for r in results for w in r.window_rows()]
    lat = [v for r in results for v in r.frame_latency_ms.values()]
    frames = sum(len(r.results) for r in results)
    windows = sum(len(r.windows) for r in results)
    g = lambda k, q: pct([w[k] for w in rows], q)
    return {
        "frames": frames, "windows": windows, "wall": wall, "fps": frames / wall, "wps": windows / wall,
        "mean_batch": mean([w["batch_size"] for w in rows]), "lat50": pct(lat, 50), "lat95": pct(lat, 95),
        **{f"{k}{q}": g(k, q) for k in ("queue", "model", "geometry", "network", "total", "client_last",
                                         "overhead")
           for q in (50, 95)},
        "lost": sum(len(r.lost) for r in results), "errors": sum((r.errors for r in results), start=__import__(
            "collections").Counter()), "failed": sum(r.failed_frames for r in results),
    }


def run_k(url: str, frames, k: int, n: int, cap: int | None = None) -> dict:
    busy0 = stats(url)["model"]["busy_s"]
    results, wall = asyncio.run(stream_many(url, frames, k, n, max_in_flight=cap))
    s = summarize(results, wall)
    s["k"], s["n"] = k, n
    # Fraction of the wall time the model replica spent in forwards: ~1 means the model, not serving, limits.
    s["busy"] = (stats(url)["model"]["busy_s"] - busy0) / wall
    return s


# --- (e) ----------------------------------------------------------------------------------------------------
def wire_efficiency(res, glb_samples: int = 24) -> dict:
    chunks = res.chunks
    pts = sum(c.count for c in chunks)
    frames = max(len(res.results), 1)
    binary = sum(w.get("points_bytes", 0) for w in res.windows)
    json32 = 0
    for c in chunks:
        json32 += len(json.dumps({"seq": c.seq, "points": c.points.astype(np.float32).tolist(),
                                  "colors": c.colors.tolist()}, separators=(",", ":")))
    # GLB of the whole cloud after every window: its size is affine in the point count, so measure a sample
    # of windows exactly and sum the fitted line over all windows.
    cum = np.cumsum([c.count for c in chunks])
    idx = sorted(set(np.linspace(0, len(chunks) - 1, min(glb_samples, len(chunks))).astype(int)))
    allp = np.concatenate([c.points for c in chunks]) if chunks else np.zeros((0, 3), np.float32)
    allc = np.concatenate([c.colors for c in chunks]) if chunks else np.zeros((0, 3), np.uint8)
    xs, ys = [], []
    for i in idx:
        n = int(cum[i])
        xs.append(n)
        ys.append(len(glb_bytes(allp[:n], allc[:n])))
    if len(set(xs)) >= 2:
        slope, icpt = np.polyfit(xs, ys, 1)
    else:
        slope, icpt = (ys[0] / max(xs[0], 1) if ys else 0.0), 0.0
    glb_total = float(sum(icpt + slope * n for n in cum))
    # positions + colours; the rest of each message is its fixed prefix and JSON header (seq, ids, origin)
    payload = sum(c.count * (3 * (2 if c.encoding == ENC_FLOAT16 else 4) + 3) for c in chunks)
    return {"points": pts, "frames": frames, "windows": len(chunks), "binary": binary, "json32": json32,
            "payload": payload,
            "glb": glb_total, "glb_bpp_final": slope, "json_meta": res.json_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:da3-small", help="checkpoint spec (random:<name> = random init)")
    ap.add_argument("--backend", default="da3", choices=["da3", "oracle"])
    ap.add_argument("--size", default="154x112", help="WxH of the synthetic frames")
    ap.add_argument("--process-res", type=int, default=154)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8, help="the deployment's max_batch_size")
    ap.add_argument("--batch-wait", type=float, default=0.0, help="batch_wait_timeout_s")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="torch threads in (a) and OMP_NUM_THREADS in Ray (default: half the cores, so the model "
                         "replica's threads are not preempted by the serving processes)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ks", default="1,4,16", help="concurrent sessions for (b)")
    ap.add_argument("--pairs", type=int, default=3,
                    help="(b) K=4: this many extra back-to-back (a)+(b) pairs for the target's ratio (0: the ratio "
                         "against the (a) measured before the app started)")
    ap.add_argument("--frames", default="24,16,6", help="frames per session for each K (same order)")
    ap.add_argument("--long-frames", type=int, default=400, help="(d) frames in the long session")
    ap.add_argument("--fps", type=float, default=30.0, help="(f) target pacing")
    ap.add_argument("--single-frames", type=int, default=60, help="(f) frames")
    ap.add_argument("--skip", default="", help="sections to skip, e.g. 'c,d'")
    a = ap.parse_args(argv)
    a.width, a.height = parse_pair(a.size)  # WxH here
    skip = set(a.skip.replace(" ", "").split(",")) - {""}
    ks = [int(x) for x in a.ks.split(",")]
    ns = [int(x) for x in a.frames.split(",")]
    ns = (ns + [ns[-1]] * len(ks))[:len(ks)]
    new_per_window = a.window - a.overlap
    frames = synthetic_frames(48, a.width, a.height)
    print(f"# serving benchmark: backend={a.backend} model={a.model} frames={a.width}x{a.height} "
          f"process_res={a.process_res} window={a.window} overlap={a.overlap} max_batch={a.max_batch} "
          f"batch_wait={a.batch_wait}s threads={a.threads}")
    t_start = time.time()

    # (a) before Ray starts, so the two never compete for the CPU.
    raw = raw_runtime(a, frames, record="g" not in skip)
    print_table(f"(a) raw runtime, in-process, window shape {raw['shape']}",
                ["batch", "s/forward", "views/s", "windows/s", "new-frames/s"],
                [[b, fmt(r["s_per_batch"], ".2f"), fmt(r["views_s"], ".2f"), fmt(r["windows_s"], ".2f"),
                  fmt(r["new_frames_s"], ".2f")] for b, r in raw.items() if isinstance(b, int)])
    raw_best = max(r["new_frames_s"] for b, r in raw.items() if isinstance(b, int))
    raw_wps = max(r["windows_s"] for b, r in raw.items() if isinstance(b, int))
    raw_b1_ms = raw[1]["s_per_batch"] * 1000.0

    app = LocalApp(omp_threads=a.threads)
    base = {"model": a.model, "backend": a.backend, "process_res": a.process_res, "window_size": a.window,
            "overlap": a.overlap, "batch_wait_timeout_s": a.batch_wait,
            "oracle_scene": {"seed": 3, "num_frames": 48, "width": a.width, "height": a.height,
                             "trajectory": "orbit"}}
    actor = f"bench_sessions_{int(time.time())}"
    targets = []
    try:
        url = app.deploy(app_args(max_batch_size=a.max_batch, actor_name=actor, **base))
        pids = app.replica_pids()
        print(f"\napp up at {url}; pids {pids}")
        asyncio.run(stream_session(url, frames, a.window + new_per_window))  # warm the deployment

        # (b)
        bres = {}
        if "b" not in skip:
            for k, n in zip(ks, ns):
                bres[k] = run_k(url, frames, k, n)
                print(f"  K={k} done in {bres[k]['wall']:.1f}s", flush=True)
            rows = []
            for k, s in bres.items():
                rows.append([k, s["n"], s["frames"], fmt(s["wall"]), fmt(s["fps"], ".2f"),
                             fmt(s["fps"] / raw_best, ".2f"), fmt(s["wps"] / raw_wps, ".2f"),
                             fmt(s["mean_batch"], ".2f"), fmt(s["busy"], ".2f"),
                             f"{fmt(s['lat50'], '.0f')}/{fmt(s['lat95'], '.0f')}",
                             f"{fmt(s['queue50'], '.0f')}/{fmt(s['queue95'], '.0f')}",
                             f"{fmt(s['model50'], '.0f')}/{fmt(s['model95'], '.0f')}",
                             f"{fmt(s['geometry50'], '.0f')}/{fmt(s['geometry95'], '.0f')}",
                             f"{fmt(s['network50'], '.0f')}/{fmt(s['network95'], '.0f')}",
                             f"{fmt(s['overhead50'], '.0f')}/{fmt(s['overhead95'], '.0f')}",
                             s["lost"], dict(s["errors"]) or "-"])
            print_table(f"(b) end to end, K sessions at full speed (raw best: {raw_best:.2f} new-frames/s, "
                        f"{raw_wps:.2f} windows/s); latencies p50/p95 ms",
                        ["K", "frames/sess", "frames", "wall s", "frames/s", "(b)/(a) fr", "(b)/(a) win",
                         "batch", "model busy", "frame lat", "queue", "model", "geometry", "delivery",
                         "overhead", "lost", "errors"], rows)
            if 4 in bres and not a.pairs:
                r4 = bres[4]["wps"] / raw_wps
                targets.append((f"(b)/(a) >= 0.9 at K=4 (windows basis), max_batch_size={a.max_batch}", f"{r4:.2f}",
                                r4 >= 0.9))
            if 4 in bres and a.pairs:
                # This box's speed drifts 10-20 % within minutes, as much as the ratio's margin: measure (a) right
                # before each K=4 run, with the app deployed and idle, and judge the median of the pairs.
                n4, rows, ratios = bres[4]["n"], [], []
                for i in range(a.pairs):
                    ra = raw_runtime(a, frames)
                    wa = max(r["windows_s"] for b, r in ra.items() if isinstance(b, int))
                    rb = run_k(url, frames, 4, n4)
                    ratios.append((rb["fps"] / max(r["new_frames_s"] for b, r in ra.items() if isinstance(b, int)),
                                   rb["wps"] / wa))
                    rows.append([i + 1, fmt(wa, ".2f"), fmt(rb["wps"], ".2f"), fmt(ratios[-1][0], ".2f"),
                                 fmt(ratios[-1][1], ".2f"), fmt(rb["mean_batch"], ".2f"), fmt(rb["busy"], ".2f")])
                med = [statistics.median(r[j] for r in ratios) for j in (0, 1)]
                rows.append(["median", "", "", fmt(med[0], ".2f"), fmt(med[1], ".2f"), "", ""])
                print_table(f"(b)/(a) at K=4 in {a.pairs} back-to-back pairs ((a) just before each (b), app idle)",
                            ["pair", "(a) windows/s", "(b) windows/s", "(b)/(a) fr", "(b)/(a) win", "batch",
                             "model busy"], rows)
                label = (f"(b)/(a) >= 0.9 at K=4 (windows basis, median of {a.pairs} pairs), "
                         f"max_batch_size={a.max_batch}")
                targets.append((label, f"{med[1]:.2f}", med[1] >= 0.9))
        st = stats(url)
        print(f"  /stats model batch_sizes: {st['model']['batch_sizes']}  frames_per_s(30s): "
              f"{st['frames_per_s']:.2f}  errors: {st['errors']}")

        # (f) single paced stream
        if "f" not in skip:
            r = asyncio.run(stream_session(url, frames, a.single_frames, fps=a.fps))
            rows = r.window_rows()
            lat = list(r.frame_latency_ms.values())
            sustained = len(r.results) / r.span_s
            p50 = lambda k: pct([w[k] for w in rows if w.get(k) is not None], 50)
            print_table(f"(f) one session paced at {a.fps:g} fps, {a.single_frames} frames: p50 over {len(rows)} "
                        f"windows (ms) of the last new frame sent -> its points received",
                        ["sustained fps", "frame->points (p50 frames)", "last->points", "model (forward)",
                         "raw b1 (a)", "overhead", "= upload+decode", "ingest", "batch wait", "transfer",
                         "geometry wait", "geometry", "ready->client"],
                        [[fmt(sustained, ".2f"), fmt(pct(lat, 50), ".0f"), fmt(p50("client_last"), ".0f"),
                          fmt(p50("model"), ".0f"), fmt(raw_b1_ms, ".0f"), fmt(p50("overhead_last"), ".0f"),
                          *(fmt(p50(k), ".1f") for k in ("upload_decode", "ingest", "batch_wait", "transfer",
                                                         "geometry_wait", "geometry", "ready_to_client"))]])
            print("  overhead = last->points - forward; its parts are p50s each, so they need not add up exactly. "
                  "ready->client = storing the record in the session actor, the long-poll, encoding, the proxy, "
                  "the client's decode. frame->points also holds the wait for the window to fill.")
            over = p50("overhead_last")
            paced = sustained >= 0.95 * a.fps  # else windows queue for the model and latency is backlog
            if not paced:
                print(f"  the stream outpaces the model ({sustained:.2f} of {a.fps:g} fps sustained): latency is "
                      f"queueing for the model; measure the overhead with --fps below the model's speed")
            targets.append(("serving overhead: p50 (last frame sent -> points) - forward < 30 ms",
                            f"{over:.0f} ms" + ("" if paced else " (queued)"), over < 30 if paced else None))

        # (g) the floor of the shape on this machine
        if "g" not in skip:
            import floor

            rs = raw["record"]
            floor.deploy(raw["shape"], rs["points"], rs["snapshot_bytes"])
            try:
                fl = asyncio.run(floor.measure(url, frames[0]))
            finally:
                floor.remove()
            print_table(f"(g) the shape's floor: (f)'s hops with no work in them, p50 over {fl['rounds']} paced rounds "
                        f"(ms); window {raw['shape']} uint8 in, depth + confidence float32 out, commit of "
                        f"{rs['points']} points + a {rs['snapshot_bytes'] / 1e3:.0f} kB snapshot, "
                        f"{9 * rs['points'] / 1e3:.0f} kB points message",
                        ["frame -> points", "model hop", "commit hop", "proxy in + out, sends"],
                        [[fmt(fl["total"], ".1f"), fmt(fl["model"], ".1f"), fmt(fl["commit"], ".1f"),
                          fmt(fl["proxy"], ".1f")]])
            if "f" not in skip:
                print(f"  (f)'s overhead {over:.0f} ms = this floor {fl['total']:.0f} ms + {over - fl['total']:.0f} ms "
                      f"of the app's own work (decode, planning, geometry {p50('geometry'):.0f} ms, encoding, "
                      f"bookkeeping, and the hops' extra time when they carry real work)")

        # (d) long stream, keeping points for (e)
        longres = None
        if "d" not in skip or "e" not in skip:
            rss0 = {k: rss_mb(p) for k, p in app.replica_pids().items()}
            cap = 2 * a.window  # a short backlog, so `total` measures work rather than queueing
            longres = asyncio.run(stream_session(url, frames, a.long_frames, keep_points=True,
                                                 max_in_flight=cap, delete=False))
            rss1 = {k: rss_mb(p) for k, p in app.replica_pids().items()}
            import httpx

            sinfo = httpx.get(f"{url}/ws/session/{longres.session_id}", timeout=30).json()
            httpx.delete(f"{url}/ws/session/{longres.session_id}", timeout=30)
            rows = longres.window_rows()
            if "d" not in skip and len(rows) >= 20:
                first, last = rows[:10], rows[-10:]
                work = lambda ws: [w["total"] - w["queue"] for w in ws]
                table = []
                for name, f in (("geometry", lambda ws: [w["geometry"] for w in ws]),
                                ("model", lambda ws: [w["model"] for w in ws]),
                                ("total - queue", work), ("total", lambda ws: [w["total"] for w in ws]),
                                ("delivery", lambda ws: [w["network"] for w in ws])):
                    m0, m1 = statistics.median(f(first)), statistics.median(f(last))
                    table.append([name, fmt(m0), fmt(m1), fmt(m1 / m0 if m0 else float("nan"), ".2f")])
                print_table(f"(d) long stream: {len(longres.results)} frames, {len(rows)} windows, "
                            f"{len(longres.results) / longres.span_s:.2f} frames/s; median ms per window",
                            ["timing", "first 10", "last 10", "last/first"], table)
                print_table("(d) memory (RSS MiB) before -> after the long stream",
                            ["process", "before", "after"],
                            [[k, fmt(rss0.get(k, float('nan'))), fmt(v)] for k, v in rss1.items()]
                            + [["session store memory_bytes (MiB)", "-", fmt(sinfo.get("memory_bytes", 0) / 2**20)]])
                g0 = statistics.median([w["geometry"] for w in first])
                g1 = statistics.median([w["geometry"] for w in last])
                w0, w1 = statistics.median(work(first)), statistics.median(work(last))
                targets.append(("long stream geometry last/first ~1 (<= 1.5)", f"{g1 / g0:.2f}", g1 / g0 <= 1.5))
                targets.append(("long stream server work (total-queue) last/first ~1 (<= 1.5)", f"{w1 / w0:.2f}",
                                w1 / w0 <= 1.5))
            print(f"  long stream: lost={len(longres.lost)} failed frames={longres.failed_frames} "
                  f"errors={dict(longres.errors)}")

        # (e)
        if "e" not in skip and longres is not None and longres.chunks:
            e = wire_efficiency(longres)
            p, f = max(e["points"], 1), e["frames"]
            print_table(f"(e) wire efficiency over the long stream: {e['points']} points, {f} frames, "
                        f"{e['windows']} windows", ["encoding", "total MB", "bytes/point", "bytes/frame", "vs ours"],
                        [["DA3P float16 (ours)", fmt(e["binary"] / 1e6, ".2f"), fmt(e["binary"] / p, ".2f"),
                          fmt(e["binary"] / f, ".0f"), "1.00x"],
                         ["+ window/frame_result JSON", fmt((e["binary"] + e["json_meta"]) / 1e6, ".2f"),
                          fmt((e["binary"] + e["json_meta"]) / p, ".2f"), fmt((e["binary"] + e["json_meta"]) / f, ".0f"),
                          f"{(e['binary'] + e['json_meta']) / e['binary']:.2f}x"],
                         ["float32 JSON lists", fmt(e["json32"] / 1e6, ".2f"), fmt(e["json32"] / p, ".2f"),
                          fmt(e["json32"] / f, ".0f"), f"{e['json32'] / e['binary']:.2f}x"],
                         ["full GLB after each window", fmt(e["glb"] / 1e6, ".2f"), fmt(e["glb"] / p, ".2f"),
                          fmt(e["glb"] / f, ".0f"), f"{e['glb'] / e['binary']:.2f}x"]])
            bpp = e["payload"] / p
            print(f"  DA3P: {bpp:.2f} bytes/point of positions + colours, plus "
                  f"{(e['binary'] - e['payload']) / max(e['windows'], 1):.0f} bytes of prefix + header per message "
                  f"({e['points'] / max(e['windows'], 1):.0f} points per message here)")
            targets.append(("<= 9 bytes/point in DA3P messages (positions + colours; header per message above)",
                            f"{bpp:.2f}", bpp <= 9.0))

        # (c) batching gain: redeploy with max_batch_size=1, same K=4 load
        if "c" not in skip and 4 in bres:
            url = app.deploy(app_args(max_batch_size=1, actor_name=actor, **base))
            asyncio.run(stream_session(url, frames, a.window + new_per_window))
            c1 = run_k(url, frames, 4, bres[4]["n"])
            d = bres[4]
            print_table("(c) batching gain, K=4, same load", ["max_batch_size", "frames/s", "mean batch",
                                                            "frame lat p50", "model p50 ms"],
                        [[a.max_batch, fmt(d["fps"], ".2f"), fmt(d["mean_batch"], ".2f"), fmt(d["lat50"], ".0f"),
                          fmt(d["model50"], ".0f")],
                         [1, fmt(c1["fps"], ".2f"), fmt(c1["mean_batch"], ".2f"), fmt(c1["lat50"], ".0f"),
                          fmt(c1["model50"], ".0f")]])
            print(f"  throughput ratio default/batch1 = {d['fps'] / c1['fps']:.2f}x; (b)/(a) at max_batch_size=1: "
                  f"{c1['fps'] / raw_best:.2f} (frames basis), {c1['wps'] / raw_wps:.2f} (windows basis)")
    finally:
        app.close()

    if "a2" not in skip:  # the CPU is shared: measure (a) again to show how much it drifted during the run
        raw2 = raw_runtime(a, frames)
        print_table("(a) again after the app run (drift check)", ["batch", "s/forward", "new-frames/s", "vs first"],
                    [[b, fmt(r["s_per_batch"], ".2f"), fmt(r["new_frames_s"], ".2f"),
                      fmt(r["new_frames_s"] / raw[b]["new_frames_s"], ".2f")] for b, r in raw2.items() if isinstance(b, int)])

    print_table("targets", ["target", "measured", "verdict"], [[t, m, verdict(ok)] for t, m, ok in targets])
    print(f"\n(total {time.time() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
