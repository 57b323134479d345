"""Throughput of DA3Runtime.forward_windows against the batch size, on a random-init network.

    python bench/runtime.py --model da3-small --size 112x154 --views 4 --batches 1,2,4 --repeats 3
    python bench/runtime.py --compile --compile-backend inductor   # eager vs torch.compile, same run and weights

Random weights cost the same compute as trained ones, so the timings hold for real checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import median_time_s, parse_pair

from serve_app.model.runtime import COMPILE_BACKENDS, DA3Runtime, compiled_graph_count
from serve_app.prediction import WindowRequest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="da3-small")
    ap.add_argument("--size", default="112x154", help="HxW of each view; sides multiples of 14")
    ap.add_argument("--views", type=int, default=4, help="views per window")
    ap.add_argument("--batches", default="1,2,4", help="windows per forward, comma separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--compile", action="store_true",
                    help="also run a torch.compile'd runtime (same weights), warmed up like a replica, and "
                         "report compiled vs eager views/s measured in this run")
    ap.add_argument("--compile-backend", default="inductor", choices=list(COMPILE_BACKENDS))
    args = ap.parse_args(argv)

    h, w = parse_pair(args.size)
    batches = [int(b) for b in args.batches.split(",")]
    rt = DA3Runtime(f"random:{args.model}", device=args.device, amp=args.amp)
    info = rt.info()
    print(f"model={rt.model_name} device={info['device']} amp={info['amp']} any_view={rt.any_view} "
          f"size={h}x{w} views={args.views} repeats={args.repeats}")
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (args.views, h, w, 3), dtype=np.uint8) for _ in range(max(batches))]
    rt.warmup([(h, w)], views=args.views, batch=1)

    def measure(runtime: DA3Runtime) -> list[tuple[int, float, float]]:
        rows = []
        for b in batches:
            reqs = [WindowRequest(images=pool[i]) for i in range(b)]
            t = median_time_s(lambda reqs=reqs: runtime.forward_windows(reqs), args.repeats)
            rows.append((b, b * args.views / t, 1000.0 * t / b))
        return rows

    rows = measure(rt)
    compiled_rows = None
    if args.compile:
        crt = DA3Runtime(f"random:{args.model}", device=args.device, amp=args.amp, compile=True,
                         compile_backend=args.compile_backend)
        crt.net.load_state_dict(rt.net.state_dict())
        warm = crt.warmup_shapes([(args.views, h, w)], batches)
        graphs = compiled_graph_count()
        compiled_rows = measure(crt)
        print(f"compile ({args.compile_backend}): warm-up {warm:.1f}s for batch sizes {batches}; graphs compiled "
              f"after warm-up: {compiled_graph_count() - graphs}")
        rows_eager_again = measure(rt)  # the CPU may drift: eager again after the compiled run
        rows = [(b, max(v0, v1), min(m0, m1)) for (b, v0, m0), (_, v1, m1) in zip(rows, rows_eager_again)]

    base = rows[0][1] if rows and rows[0][0] == 1 else None
    print(f"{'batch':>5} {'views/s':>10} {'ms/window':>10} {'vs batch 1':>11}"
          + (f" {'compiled views/s':>17} {'compiled/eager':>15}" if compiled_rows else ""))
    for i, (b, vps, ms) in enumerate(rows):
        ratio = f"{vps / base:.2f}x" if base else "-"
        extra = ""
        if compiled_rows:
            cvps = compiled_rows[i][1]
            extra = f" {cvps:>17.2f} {cvps / vps:>14.2f}x"
        print(f"{b:>5} {vps:>10.2f} {ms:>10.1f} {ratio:>11}{extra}")


if __name__ == "__main__":
    main()
