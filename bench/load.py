"""Load test: N concurrent sessions streaming the synthetic orbit at a target fps for a bounded time, then
finalize; fails (exit 1) if any accepted (acked) frame got no frame_result.

    .venv/bin/python bench/load.py                               # starts its own app (random:da3-small)
    .venv/bin/python bench/load.py --sessions 8 --fps 2 --duration 30 --backend oracle
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000   # an app already running (loopback only)

Reports frames sent / acked / processed, errors by code, p50/p95/p99 frame-to-points latency (client send ->
the points message carrying the frame) and server RSS (own app only).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LocalApp, app_args, check_loopback, rss_mb, stats, stream_session, synthetic_frames
from measure import fmt, pct, print_table


async def run_load(url: str, frames, sessions: int, fps: float, duration: float, finalize_timeout: float,
                   stagger: float, cap: int | None = None):
    async def one(i: int):
        await asyncio.sleep(i * stagger)  # spread session starts so windows do not all align
        return await stream_session(url, frames, num_frames=10**9, fps=fps, duration_s=duration,
                                    finalize_timeout_s=finalize_timeout, max_in_flight=cap)

    outs = await asyncio.gather(*(one(i) for i in range(sessions)), return_exceptions=True)
    return outs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="a running app (must be loopback); default: start one here")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--fps", type=float, default=5.0, help="target frames/s per session")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of sending per session")
    ap.add_argument("--finalize-timeout", type=float, default=600.0, help="max seconds to drain after sending")
    ap.add_argument("--max-in-flight", type=int, default=None,
                    help="client-side cap on frames without a result per session (default: the server's)")
    ap.add_argument("--stagger", type=float, default=0.1, help="seconds between session starts")
    ap.add_argument("--model", default="random:da3-small")
    ap.add_argument("--backend", default="da3", choices=["da3", "oracle"])
    ap.add_argument("--size", default="154x112", help="WxH of the synthetic frames")
    ap.add_argument("--process-res", type=int, default=154)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="OMP_NUM_THREADS of the replicas (default: half the cores)")
    a = ap.parse_args(argv)
    w, _, h = a.size.lower().partition("x")
    width, height = int(w), int(h)
    frames = synthetic_frames(48, width, height)

    app = None
    url = a.url
    if url:
        check_loopback(url)
    else:
        app = LocalApp(omp_threads=a.threads)
        url = app.deploy(app_args(model=a.model, backend=a.backend, process_res=a.process_res,
                                  window_size=a.window, overlap=a.overlap, max_batch_size=a.max_batch,
                                  oracle_scene={"seed": 3, "num_frames": 48, "width": width, "height": height,
                                                "trajectory": "orbit"}))
    try:
        print(f"# load: {a.sessions} sessions x {a.fps:g} fps for {a.duration:g}s against {url} "
              f"({'own app: ' + a.backend + ' ' + a.model if app else 'external app'})", flush=True)
        pids = app.replica_pids() if app else {}
        rss0 = {k: rss_mb(p) for k, p in pids.items()}
        t0 = time.monotonic()
        outs = asyncio.run(run_load(url, frames, a.sessions, a.fps, a.duration, a.finalize_timeout, a.stagger,
                                   a.max_in_flight))
        wall = time.monotonic() - t0
        rss1 = {k: rss_mb(p) for k, p in (app.replica_pids() if app else {}).items()}
        crashed = [o for o in outs if isinstance(o, BaseException)]
        res = [o for o in outs if not isinstance(o, BaseException)]
        sent = sum(r.frames_sent for r in res)
        acked = sum(len(r.acked) for r in res)
        processed = sum(len(r.results) for r in res)
        failed = sum(r.failed_frames for r in res)
        lost = {r.session_id: r.lost for r in res if r.lost}
        incomplete = [r.session_id for r in res if not r.summary or r.summary.get("state") != "complete"]
        errors = sum((r.errors for r in res), Counter())
        lat = [v for r in res for v in r.frame_latency_ms.values()]
        windows = [w for r in res for w in r.window_rows()]
        st = stats(url)
        print_table("load result", ["sessions", "wall s", "sent", "acked", "processed", "failed (pose null)",
                                    "lost", "frames/s", "target frames/s", "mean batch"],
                    [[len(res), fmt(wall), sent, acked, processed, failed, sum(len(v) for v in lost.values()),
                      fmt(processed / wall, ".2f"), fmt(a.sessions * a.fps, ".1f"),
                      fmt(sum(w["batch_size"] or 0 for w in windows) / max(len(windows), 1), ".2f")]])
        print_table("frame-to-points latency (ms)", ["p50", "p95", "p99", "max"],
                    [[fmt(pct(lat, 50), ".0f"), fmt(pct(lat, 95), ".0f"), fmt(pct(lat, 99), ".0f"),
                      fmt(max(lat) if lat else float("nan"), ".0f")]])
        print_table("window split p50/p95 (ms)", ["queue", "model", "geometry", "delivery"],
                    [[f"{fmt(pct([w[k] for w in windows], 50), '.0f')}/{fmt(pct([w[k] for w in windows], 95), '.0f')}"
                      for k in ("queue", "model", "geometry", "network")]])
        print(f"  client errors by code: {dict(errors) or '-'}; server /stats errors: {st['errors'] or '-'}; "
              f"model batch_sizes: {st['model']['batch_sizes']}")
        if rss1:
            print("  RSS MiB before -> after: " + ", ".join(f"{k} {fmt(rss0.get(k, float('nan')))} -> {fmt(v)}"
                                                         for k, v in rss1.items()))
        ok = True
        if crashed:
            ok = False
            print(f"FAIL: {len(crashed)} session(s) raised: {[repr(c)[:200] for c in crashed[:3]]}")
        if lost:
            ok = False
            print(f"FAIL: accepted frames lost (acked, no frame_result): {lost}")
        if incomplete:
            ok = False
            print(f"FAIL: sessions without a complete summary: {incomplete}")
        if acked != processed:
            ok = False
            print(f"FAIL: acked {acked} != processed {processed}")
        print("PASS: zero accepted frames lost" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if app is not None:
            app.close()


if __name__ == "__main__":
    sys.exit(main())
