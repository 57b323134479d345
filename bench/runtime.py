"""Throughput of DA3Runtime.forward_windows against the batch size, on a random-init network.

    python bench/runtime.py --model da3-small --size 112x154 --views 4 --batches 1,2,4 --repeats 3

Random weights cost the same compute as trained ones, so the timings hold for real checkpoints.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.prediction import WindowRequest
from serve_app.runtime import DA3Runtime


def parse_size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="da3-small")
    ap.add_argument("--size", default="112x154", help="HxW of each view; sides multiples of 14")
    ap.add_argument("--views", type=int, default=4, help="views per window")
    ap.add_argument("--batches", default="1,2,4", help="windows per forward, comma separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)

    h, w = parse_size(args.size)
    batches = [int(b) for b in args.batches.split(",")]
    rt = DA3Runtime(f"random:{args.model}", device=args.device, amp=args.amp, compile=args.compile)
    info = rt.info()
    print(f"model={rt.model_name} device={info['device']} amp={info['amp']} any_view={rt.any_view} "
          f"size={h}x{w} views={args.views} repeats={args.repeats}")
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (args.views, h, w, 3), dtype=np.uint8) for _ in range(max(batches))]
    rt.warmup([(h, w)], views=args.views, batch=1)

    rows = []
    for b in batches:
        reqs = [WindowRequest(images=pool[i]) for i in range(b)]
        rt.forward_windows(reqs)  # warm this batch shape
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rt.forward_windows(reqs)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rows.append((b, b * args.views / t, 1000.0 * t / b))

    base = rows[0][1] if rows and rows[0][0] == 1 else None
    print(f"{'batch':>5} {'views/s':>10} {'ms/window':>10} {'vs batch 1':>11}")
    for b, vps, ms in rows:
        ratio = f"{vps / base:.2f}x" if base else "-"
        print(f"{b:>5} {vps:>10.2f} {ms:>10.1f} {ratio:>11}")


if __name__ == "__main__":
    main()
