"""Cost of the multi-view depth refinement (session param `depth_refine`), measured in one run, CPU time.

    python bench/depth_refine.py                 # 120-frame realistic loop, 3 interleaved repetitions
    python bench/depth_refine.py --frames 60 --reps 2

Prints (1) refine_window alone on the scene's 6-view windows: CPU ms per window and the median |log depth error|
before / after (after the common scale), and (2) the reconstructor's geometry (`StreamReconstructor.integrate`:
refinement + placement + map update) CPU ms per window with `depth_refine` off and `field`, streams interleaved
so both see the same load, global_consistency on (its graph work is off the latency path and not counted).
Process CPU time, not wall time: on a shared box the wall clock mostly measures waiting for a core.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.config import SessionParams
from serve_app.evaluation.synthetic import SceneSpec, render_sequence
from serve_app.model.oracle import OracleModel
from serve_app.prediction import WindowRequest
from serve_app.recon.depth_refine import refine_window
from serve_app.recon.geometry import confidence_mask, invert_pose
from serve_app.recon.reconstruction import FrameInput, StreamReconstructor


def log_error(depth: np.ndarray, truth: np.ndarray) -> float:
    m = truth > 0
    e = np.log(depth[m] / truth[m])
    return float(np.median(np.abs(e - np.median(e))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--oracle-seed", type=int, default=1)
    a = ap.parse_args(argv)
    w, h = 154, 112
    spec = SceneSpec(seed=3, num_frames=a.frames, width=w, height=h, trajectory="loop", loops=1)
    seq = render_sequence(spec)
    errors = {"preset": "realistic"}

    # (1) the fit alone
    bad = OracleModel(spec, seed=a.oracle_seed, errors=errors)
    good = OracleModel(spec, seed=a.oracle_seed, errors={"preset": "none"})
    wins = []
    for s in range(0, a.frames - 6, 4):
        req = WindowRequest(images=np.stack(seq.images[s:s + 6]))
        p, g = bad.forward_windows([req])[0], good.forward_windows([req])[0]
        wins.append((s, p, g, confidence_mask(p.conf, 40.0, depth=p.depth)))
    p0 = SessionParams()
    times, res = [], []
    for _ in range(a.reps):
        c0 = time.process_time()
        res = [refine_window(p.depth, p.intrinsics, invert_pose(p.extrinsics), k, samples_per_view=p0.depth_refine_samples,
                             prior_std=p0.depth_refine_prior, frame_index=np.arange(s, s + 6),
                             max_gap=p0.depth_refine_max_gap, seed=s) for s, p, g, k in wins]
        times.append((time.process_time() - c0) * 1000 / len(wins))
    before = np.mean([log_error(p.depth, g.depth) for _, p, g, _ in wins])
    after = np.mean([log_error(r.depth, g.depth) for r, (_, _, g, _) in zip(res, wins)])
    print(f"refine_window, {len(wins)} windows of 6 views at {w}x{h}: CPU ms/window min {min(times):.1f} "
          f"median {np.median(times):.1f}; median |log depth error| {before:.4f} -> {after:.4f}")

    # (2) geometry per window, off vs field, interleaved
    oracle = OracleModel(spec, scale_range=(0.5, 2.0), seed=a.oracle_seed, errors=errors)

    def stream(mode: str) -> list[float]:
        rec = StreamReconstructor(SessionParams(process_res=w, window_size=6, overlap=2, depth_refine=mode,
                                                global_consistency=True))
        cpu = []
        for i, img in enumerate(seq.images):
            rec.add_frame(FrameInput(index=i, frame_id=i, image=img, original_size=(w, h)))
            while (plan := rec.next_window(force=i == len(seq.images) - 1)) is not None:
                pred = oracle.forward_windows([plan.request()])[0]
                c0 = time.process_time()
                rec.integrate(plan, pred)
                cpu.append((time.process_time() - c0) * 1000)
        return cpu[1:]  # the first window is the reference (no alignment)

    stream("off")  # warm-up (imports, caches)
    geo: dict[str, list[float]] = {"off": [], "field": []}
    for _ in range(a.reps):
        for mode, runs in geo.items():
            runs.append(float(np.median(stream(mode))))
    off, on = np.median(geo["off"]), np.median(geo["field"])
    print(f"geometry CPU ms/window (median over windows; median of {a.reps} interleaved repetitions): off {off:.1f} "
          f"{[round(x, 1) for x in geo['off']]}, field {on:.1f} {[round(x, 1) for x in geo['field']]}; "
          f"on - off {on - off:+.1f} ms ({on / off:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
