"""Pose-graph solve time and accuracy: serve_app.posegraph (scipy.sparse Gauss-Newton) vs gtsam 4.3 (LM).

    python bench/posegraph.py --nodes 1000 --loops 20 --repeat 3

A synthetic session: `nodes` windows on a multi-lap circle, odometry edges to the previous two windows (noisy
relative Sim(3), like the context frames' alignments), `loops` loop edges between laps and one wrong loop edge
(a bad verification). Initial estimate: the odometry chained (drifted). Prints per solver: median solve time
(cold: from the drifted chain; warm: one new node after a solved graph, the per-window case), the rotation and
position error against the truth, and whether the wrong edge was cut. Target: <= 50 ms at 1,000 nodes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.geometry import Sim3
from serve_app.posegraph import Edge, GraphParams, PoseGraph, so3_exp, solve, solve_gtsam

TARGET_MS = 50.0


def make_problem(n: int, loops: int, seed: int = 0, rot_deg: float = 0.5, trans: float = 0.01):
    rng = np.random.default_rng(seed)
    laps = 3
    th = 2 * np.pi * laps * np.arange(n) / n
    truth = []
    for a in th:
        R = so3_exp(np.array([0.0, a, 0.0]))
        truth.append(Sim3(1.0, R, np.array([3 * np.cos(a), 0.1 * np.sin(3 * a), 3 * np.sin(a)])))

    def noisy_rel(a: int, b: int, scale: float = 1.0) -> Sim3:
        z = truth[a].inverse().compose(truth[b])
        dR = so3_exp(rng.normal(size=3) * np.deg2rad(rot_deg) * scale)
        return Sim3(z.s * np.exp(rng.normal() * 0.01 * scale), dR @ z.R, z.t + rng.normal(size=3) * trans * scale)

    edges = []
    for b in range(1, n):
        for a in (b - 1, b - 2):
            if a >= 0:
                edges.append(Edge(a, b, noisy_rel(a, b)))
    per_lap = n // laps
    for i in range(loops):
        b = int(rng.integers(per_lap, n))
        edges.append(Edge(b - per_lap, b, noisy_rel(b - per_lap, b, 0.5), kind="loop"))
    bad = Edge(n // 2, n - 1, noisy_rel(n // 2 - per_lap // 3, n - 1), kind="loop")  # a place 1/3 lap away
    init = [truth[0]]
    for b in range(1, n):
        e = next(e for e in edges if e.a == b - 1 and e.b == b)
        init.append(init[-1].compose(e.z))
    return truth, init, edges, bad


def errors(est: dict[int, Sim3], truth: list[Sim3]) -> tuple[float, float]:
    rot = [np.degrees(np.arccos(np.clip((np.trace(est[i].R.T @ truth[i].R) - 1) / 2, -1, 1)))
           for i in range(len(truth))]
    pos = [np.linalg.norm(est[i].t - truth[i].t) for i in range(len(truth))]
    return float(np.median(rot)), float(np.sqrt(np.mean(np.square(pos))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--loops", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-gtsam", action="store_true")
    a = ap.parse_args()
    truth, init, edges, bad = make_problem(a.nodes, a.loops)
    params = GraphParams(sigma_trans=0.01, sigma_scale=0.01, sigma_rot_deg=0.5)
    ids = list(range(a.nodes))
    print(f"{a.nodes} nodes, {len(edges)} edges ({a.loops} loops); chained odometry: "
          "rot median {:.2f} deg, position RMSE {:.3f}".format(*errors(dict(enumerate(init)), truth)))
    g = PoseGraph(params)
    for i in ids:
        g.add_node(i, init[i])
    steps = bad.b - bad.a
    good = next(e for e in edges if e.kind == "loop")
    print(f"loop gate (squared whitened discrepancy per odometry step): true loop "
          f"{g.loop_discrepancy(good, good.b - good.a):.2f}, wrong loop {g.loop_discrepancy(bad, steps):.2f}")
    solvers = {"scipy.sparse GN": lambda p: solve(ids, p, edges, params, 0).poses}
    if not a.no_gtsam:
        try:
            import gtsam  # noqa: F401
            solvers["gtsam 4.3 LM"] = lambda p: solve_gtsam(ids, p, edges, params, 0)
        except ImportError:
            print("gtsam not installed: pip install gtsam==4.3.0 to compare")
    for name, fn in solvers.items():
        times, out = [], None
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fn(init)
            times.append((time.perf_counter() - t0) * 1000)
        rot, pos = errors(out, truth)
        # Warm: the solved graph plus one new node chained from its odometry (what each window adds).
        g = PoseGraph(params)
        for i in ids:
            g.add_node(i, out[i])
        warm_init = [out[i] for i in ids]
        warm_init[-1] = out[a.nodes - 2].compose(next(e.z for e in edges if e.a == a.nodes - 2 and e.b == a.nodes - 1))
        wt = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            fn(warm_init)
            wt.append((time.perf_counter() - t0) * 1000)
        cold, warm = float(np.median(times)), float(np.median(wt))
        print(f"{name:18s} cold {cold:7.1f} ms  warm {warm:7.1f} ms  (target {TARGET_MS:.0f} ms: "
              f"{warm / TARGET_MS:.2f}x)  rot median {rot:.3f} deg  position RMSE {pos:.4f}")


if __name__ == "__main__":
    main()
