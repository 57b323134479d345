"""Size of a global_consistency session's snapshot, per commit, with and without the loop keyframes it carries.

The worker commits a snapshot with every window; since issue 16 item 6 it carries up to `loop_snapshot_keyframes`
loop keyframes (model-size JPEG + depth sample) so a takeover can still verify loops to places seen before it.
Each entry is sent once (serve_app/sessions/stream_state.py); the store keeps the merged state. This streams the
oracle's loop scene through the reconstructor in process (no Ray) and prints, from one run:

- sent: bytes of the snapshot a commit sends to the session store (pickled, as a Ray call carries it), median
  and max over the commits;
- stored: bytes of the merged state the store keeps and the journal writes (journal codec), at the end;
- naive: what each commit would send if it carried every kept entry again (the stored state, per commit).

    .venv/bin/python bench/loop_snapshot.py --size 504x378 --frames 120
"""

from __future__ import annotations

import argparse
import pickle
import statistics

from serve_app.config import SessionParams
from serve_app.evaluation.synthetic import SceneSpec
from serve_app.media.imaging import encode_image
from serve_app.model.oracle import OracleModel
from serve_app.recon.consistency import Consistency
from serve_app.recon.plan import is_world_part_key
from serve_app.recon.reconstruction import FrameInput, StreamReconstructor
from serve_app.sessions import journal_codec, stream_state


def run(oracle: OracleModel, params: SessionParams) -> dict:
    rec = StreamReconstructor(params)
    seq = oracle.seq
    n = len(seq.images)
    held, sent, naive = None, [], []
    encoded = [encode_image(im, "JPEG", 90) for im in seq.images]
    for i in range(n):
        # As a client sends it (JPEG q90): world frames travel as this encoding.
        rec.add_frame(FrameInput(index=i, frame_id=i, image=seq.images[i], original_size=(0, 0),
                                 encoded=encoded[i]))
        while (plan := rec.next_window(force=i == n - 1)) is not None:
            out = rec.integrate(plan, oracle.forward_windows([plan.request()])[0])
            if not out.ok:
                continue
            snap = rec.snapshot()
            sent.append(len(pickle.dumps(snap, protocol=5)))
            held = stream_state.merge(held, snap)
            naive.append(len(pickle.dumps(held, protocol=5)))
            job = rec.graph_prepare()
            if job is not None:
                rec.graph_apply(job, Consistency.run_job(job, rec.graph_params))
            while plans := rec.next_loops():
                for p, pred in zip(plans, oracle.forward_windows([p.request() for p in plans])):
                    rec.integrate_loop(p, pred)
    return {"commits": len(sent), "sent_median": statistics.median(sent), "sent_max": max(sent),
            "naive_median": statistics.median(naive), "stored": len(journal_codec.dumps(held)),
            "carried": sum(not is_world_part_key(k) for k in stream_state.items(held)), "keyframes": len(rec.consistency.detector.keyframes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="504x378", help="frame size WxH (= model input size here)")
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--carry", type=int, default=SessionParams().loop_snapshot_keyframes,
                    help="loop_snapshot_keyframes for the 'with' run")
    a = ap.parse_args()
    w, h = (int(x) for x in a.size.split("x"))
    oracle = OracleModel(SceneSpec(num_frames=a.frames, width=w, height=h, trajectory="loop"), errors="realistic",
                         seed=1)
    base = {"process_res": max(w, h), "window_size": 6, "overlap": 2, "global_consistency": True}
    print(f"loop scene {a.frames} frames at {w}x{h}, W=6 k=2, oracle with realistic errors")
    print(f"{'loop_snapshot_keyframes':>24} {'commits':>8} {'sent median kB':>15} {'sent max kB':>12} "
          f"{'naive median kB':>16} {'stored kB':>10} {'carried':>8}")
    for carry in (0, a.carry):
        r = run(oracle, SessionParams(**base, loop_snapshot_keyframes=carry))
        print(f"{carry:>24} {r['commits']:>8} {r['sent_median'] / 1e3:>15.1f} {r['sent_max'] / 1e3:>12.1f} "
              f"{r['naive_median'] / 1e3:>16.1f} {r['stored'] / 1e3:>10.1f} {r['carried']:>8}")


if __name__ == "__main__":
    main()
