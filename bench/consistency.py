"""Global consistency, in process: the session reconstructor driven like the session worker, with the oracle.

    python bench/consistency.py --errors realistic --scene loop --frames 120 --size 154x112

No Ray: frames go through StreamReconstructor (plan -> oracle forward -> integrate), then, with
global_consistency on, the worker's off-path steps in the worker's order (graph_prepare, solve, graph_apply,
loop windows through the same oracle, integrate_loop, maintain). Points and poses are collected as first emitted
and the final corrections applied to them, as a client does. Prints, with the machinery off and on:

- ATE (camera-centre RMSE after one Sim(3) onto the truth, % of path); rotation error median / max (degrees,
  after that Sim(3)); loop gap (distance between the estimated first and last centres, % of path; the "loop"
  scene ends exactly where it starts); Chamfer (% of the true surface's bounding-box diagonal);
- rot*: rotation error median after the best rotation alone (orientation consistency, without the tilt the
  centres' Sim(3) gives a nearly planar path);
- loops accepted / rejected, corrections, and per-window geometry time (integrate only: the latency path)
  and the off-path time (median ms).

Targets (issue 16, realistic errors, W=6 k=2, one 120-frame loop): ATE <= 1 %, rotation median <= 2 deg,
loop gap <= 0.3 %, Chamfer <= 0.6 %; zero accepted loops on the look-alike scene.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.alignment import chamfer_distance, trajectory_length, umeyama_sim3
from serve_app.config import SessionParams
from serve_app.consistency import Consistency
from serve_app.geometry import Sim3, orthonormalize
from serve_app.oracle import OracleModel
from serve_app.reconstruction import FrameInput, StreamReconstructor
from serve_app.synthetic import SceneSpec, surface_points


def run(oracle: OracleModel, params: SessionParams, pipeline: int = 1) -> dict:
    seq = oracle.seq
    rec = StreamReconstructor(params)
    n = len(seq.images)
    emitted: dict[int, tuple[int, np.ndarray]] = {}  # frame -> (window, c2w as first emitted)
    points: list[tuple[int, np.ndarray]] = []
    corr: dict[int, Sim3] = {}
    geo, off = [], []
    corrections = 0
    loop_reports = []

    def window(plan):
        pred = oracle.forward_windows([plan.request()])[0]
        t0 = time.perf_counter()
        out = rec.integrate(plan, pred)
        geo.append((time.perf_counter() - t0) * 1000)
        for fr in out.frames:
            if fr["pose"] is not None:
                emitted[fr["index"]] = (plan.window, np.array(fr["pose"]))
        points.append((plan.window, out.points))
        return out

    def after():
        nonlocal corrections
        t0 = time.perf_counter()
        while True:
            job = rec.graph_prepare()
            if job is not None:
                poses = Consistency.run_job(job, rec.graph_params)
                c = rec.graph_apply(job, poses)
                if c is not None:
                    corrections += 1
                    corr.update(c.transforms)
            lp = rec.next_loop()
            if lp is None:
                break
            pred = oracle.forward_windows([lp.request()])[0]
            loop_reports.append(rec.integrate_loop(lp, pred))
            if not rec.consistency.loop_due:
                break
        if rec.maintenance_due:
            rec.maintain()
        off.append((time.perf_counter() - t0) * 1000)

    queue = []  # planned, not yet integrated: the worker plans window k+1 while k is at the model
    for i in range(n):
        rec.add_frame(FrameInput(index=i, frame_id=i, image=seq.images[i], original_size=(0, 0)))
        while (plan := rec.next_window(force=i == n - 1)) is not None:
            queue.append(plan)
            while len(queue) > pipeline:
                window(queue.pop(0))
                if rec.consistency is not None:
                    after()
    while queue:
        window(queue.pop(0))
        if rec.consistency is not None:
            after()
    idx = sorted(emitted)
    est = []
    for i in idx:
        w, c2w = emitted[i]
        est.append(corr.get(w, Sim3.identity()).transform_c2w(c2w))
    est = np.array(est, np.float64)
    gt = seq.c2w[idx].astype(np.float64)
    sim = umeyama_sim3(est[:, :3, 3], gt[:, :3, 3])
    est_w = sim.transform_c2w(est).astype(np.float64)
    path = trajectory_length(gt)
    ate = float(np.sqrt(np.mean(np.sum((est_w[:, :3, 3] - gt[:, :3, 3]) ** 2, 1)))) / path * 100
    rel = np.einsum("nji,njk->nik", est_w[:, :3, :3], gt[:, :3, :3])
    rot = np.degrees(np.arccos(np.clip((np.trace(rel, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    # The same after the best rotation alone (how consistent the orientations are among themselves; the Sim(3)
    # on centres also tilts a nearly planar path by its small height errors).
    R_best = orthonormalize(np.einsum("nij,nkj->ik", gt[:, :3, :3], est[:, :3, :3]))
    rel2 = np.einsum("ij,njk->nik", R_best, est[:, :3, :3])
    rot_own = np.degrees(np.arccos(np.clip((np.einsum("nij,nij->n", rel2, gt[:, :3, :3]) - 1) / 2, -1, 1)))
    gap = float(np.linalg.norm(est_w[-1, :3, 3] - est_w[0, :3, 3]) / path * 100) if idx[-1] == n - 1 else np.nan
    pts = np.concatenate([corr.get(w, Sim3.identity()).apply(p) for w, p in points if len(p)])
    surf = surface_points(oracle.spec, 20000, seq=seq)
    diag = float(np.linalg.norm(surf.max(0) - surf.min(0)))
    ch = chamfer_distance(sim.apply(pts), surf) / diag * 100
    cons = rec.consistency
    return {"ate": ate, "rot_med": float(np.median(rot)), "rot_max": float(rot.max()), "gap": gap, "chamfer": ch,
            "loops": cons.loops_accepted if cons else 0, "rejected": cons.loops_rejected if cons else 0,
            "corrections": corrections, "geo_ms": float(np.median(geo)),
            "off_ms": float(np.median(off)) if off else 0.0, "placed": len(idx), "frames": n,
            "loop_reports": loop_reports, "rot": rot, "rot_own_med": float(np.median(rot_own))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--errors", default="realistic", help="oracle error preset(s), comma-separated")
    ap.add_argument("--scene", default="loop", help="trajectory(ies): loop, lookalike, orbit; comma-separated")
    ap.add_argument("--loops", type=int, default=1)
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--size", default="154x112")
    ap.add_argument("--window", type=int, default=6)
    ap.add_argument("--overlap", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--modes", default="off,on")
    ap.add_argument("--pipeline", type=int, default=1, help="windows planned ahead of integration (the worker's "
                    "max_windows_in_flight - 1; 0 = none)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args()
    w, h = (int(x) for x in a.size.split("x"))
    print(f"{'scene':10s} {'errors':10s} {'mode':4s} {'ATE%':>6s} {'rot med':>8s} {'rot max':>8s} {'gap%':>6s} "
          f"{'Chamfer%':>8s} {'rot*':>5s} {'loops':>5s} {'rej':>4s} {'corr':>5s} {'geo ms':>7s} {'off ms':>7s} placed")
    for scene in a.scene.split(","):
        spec = SceneSpec(num_frames=a.frames, width=w, height=h, trajectory=scene, loops=a.loops)
        for errors in a.errors.split(","):
            oracle = OracleModel(spec, errors=errors, seed=a.seed)
            for mode in a.modes.split(","):
                params = SessionParams(process_res=max(w, h), window_size=a.window, overlap=a.overlap,
                                       global_consistency=mode == "on")
                r = run(oracle, params, a.pipeline)
                print(f"{scene:10s} {errors:10s} {mode:4s} {r['ate']:6.2f} {r['rot_med']:8.2f} {r['rot_max']:8.2f} "
                      f"{r['gap']:6.2f} {r['chamfer']:8.2f} {r['rot_own_med']:5.2f} {r['loops']:5d} {r['rejected']:4d} "
                      f"{r['corrections']:5d} {r['geo_ms']:7.1f} {r['off_ms']:7.1f} {r['placed']}/{r['frames']}",
                      flush=True)
                if a.verbose:
                    for lr in r["loop_reports"]:
                        print("   ", lr)


if __name__ == "__main__":
    main()
