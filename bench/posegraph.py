"""Pose-graph solve time and accuracy: serve_app.recon.posegraph (scipy.sparse Gauss-Newton, SuperLU) vs the same
steps with other factorisations (LAPACK banded Cholesky in an RCM order; qdldl when installed), the solver it
replaced (`solve_reference`, kept here only) and gtsam 4.3 (LM) when installed; and one factorisation by each method.

    python bench/posegraph.py --nodes 1000 --loops 20 --repeat 3

A synthetic session: `nodes` windows on a multi-lap circle, odometry edges to the previous two windows (noisy
relative Sim(3), like the context frames' alignments), `loops` loop edges between laps and one wrong loop edge
(a bad verification). Initial estimate: the odometry chained (drifted). Prints per solver: median solve time
(cold: from the drifted chain, like a global solve after a loop closes; warm: one new node after a solved graph;
local: the per-window solve of the newest 8 nodes),
wall and CPU time, the rotation and position error against the truth, the largest difference from the current
solver's poses, and the speed-ups measured in this one run. Target: <= 50 ms at 1,000 nodes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scipy.sparse as sp
import scipy.sparse.linalg as spla

from serve_app.recon.geometry import Sim3
from serve_app.recon.posegraph import (
    Edge,
    GraphParams,
    PoseGraph,
    SolveResult,
    _inverse,
    _residuals,
    _retract,
    _stack,
    graph_setup,
    so3_exp,
    solve,
    solve_gtsam,
)

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


def solve_reference(ids, poses, edges, params, fixed) -> SolveResult:
    """The solver before issue 16's speed work, kept only here as the yardstick: finite-difference Jacobians (14
    residual evaluations per iteration), J assembled as a scipy CSR and H = J^T J, SuperLU re-ordering H every
    iteration."""
    g = graph_setup(ids, poses, edges, fixed)
    if g is None:
        return SolveResult(dict(zip(ids, poses)), 0, 0.0, 0.0)
    n, x, ia, ib, zinv, base_w, m, free = g.n, g.x, g.ia, g.ib, g.zinv, g.base_w, g.m, g.free
    sig = params.sig
    col_of = np.full(n, -1)
    col_of[free] = np.arange(int(free.sum()))
    nv = 7 * int(free.sum())

    def sel(xx, idx):
        return xx[0][idx], xx[1][idx], xx[2][idx]

    def res(xx):
        return _residuals(sel(xx, ia), sel(xx, ib), zinv, sig)

    r = res(x)
    cost0 = float((base_w * (r ** 2).sum(1)).sum())
    # Sparsity pattern of J (m*7 rows; columns 7*node), fixed across iterations.
    rows = np.repeat(np.arange(7 * m).reshape(m, 7), 7, axis=1)  # (m, 49) per side
    eps = 1e-6
    it = 0
    w = base_w.copy()
    robust = False
    for it in range(1, params.max_iterations + 1):
        xa, xb = sel(x, ia), sel(x, ib)
        r = _residuals(xa, xb, zinv, sig)
        if robust:
            nrm = np.sqrt((r ** 2).sum(1))
            w = base_w * np.where(nrm <= params.huber, 1.0, params.huber / np.maximum(nrm, 1e-300))
        Ja = np.empty((m, 7, 7))
        Jb = np.empty((m, 7, 7))
        for k in range(7):
            d = np.zeros((m, 7))
            d[:, k] = eps
            Ja[:, :, k] = (_residuals(_retract(xa, d), xb, zinv, sig) - r) / eps
            Jb[:, :, k] = (_residuals(xa, _retract(xb, d), zinv, sig) - r) / eps
        sw = np.sqrt(w)[:, None]
        blocks, cols, rr = [], [], []
        for J, node in ((Ja, ia), (Jb, ib)):
            ok = free[node]
            c = (7 * col_of[node])[:, None, None] + np.arange(7)[None, None, :]
            blocks.append((J * sw[:, :, None])[ok].reshape(-1))
            cols.append(np.broadcast_to(c, (m, 7, 7))[ok].reshape(-1))
            rr.append(rows.reshape(m, 7, 7)[ok].reshape(-1))
        J = sp.csr_matrix((np.concatenate(blocks), (np.concatenate(rr), np.concatenate(cols))), shape=(7 * m, nv))
        rw = (r * sw).reshape(-1)
        H = (J.T @ J).tocsc()
        g = J.T @ rw
        H = H + sp.identity(nv, format="csc") * 1e-9
        delta = -spla.splu(H, permc_spec="MMD_AT_PLUS_A", options={"SymmetricMode": True}).solve(g)
        if not np.isfinite(delta).all():
            break
        D = np.zeros((n, 7))
        D[free] = delta.reshape(-1, 7)
        x = _retract(x, D)
        step = float(np.abs(delta).max())
        if step < params.tol:
            if robust:
                break
            # Plain least squares converged: down-weight edges that still disagree, if any do.
            nrm = np.sqrt((res(x) ** 2).sum(1))
            if not (nrm > params.huber).any():
                break
            robust = True
    r = res(x)
    nrm = np.sqrt((r ** 2).sum(1))
    cost1 = float((base_w * (r ** 2).sum(1)).sum())
    down = [i for i in range(m) if nrm[i] > 2 * params.huber]
    out = {k: Sim3(x[0][i], x[1][i], x[2][i]) for i, k in enumerate(ids)}
    return SolveResult(out, it, cost0, cost1, down)


def errors(est: dict[int, Sim3], truth: list[Sim3]) -> tuple[float, float]:
    rot = [np.degrees(np.arccos(np.clip((np.trace(est[i].R.T @ truth[i].R) - 1) / 2, -1, 1)))
           for i in range(len(truth))]
    pos = [np.linalg.norm(est[i].t - truth[i].t) for i in range(len(truth))]
    return float(np.median(rot)), float(np.sqrt(np.mean(np.square(pos))))


def _median_ms(fn, arg, repeat: int) -> tuple[float, float, object]:
    """(median wall ms, median CPU ms of this process, last result): the machine is shared, so CPU time is the
    steadier figure and the ratio between solvers, measured in one run, the one to compare."""
    wall, cpu, out = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(arg)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return float(np.median(wall)), float(np.median(cpu)), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--loops", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-gtsam", action="store_true")
    ap.add_argument("--no-reference", action="store_true", help="skip the old solver (slow)")
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
    solvers = {"scipy GN (now)": lambda p: solve(ids, p, edges, params, 0).poses,
               "GN banded (RCM)": lambda p: solve(ids, p, edges, params, 0, linear="banded").poses}
    try:
        import qdldl  # noqa: F401 - optional: a sparse LDL^T with a numeric-only refactorisation

        solvers["GN qdldl"] = lambda p: solve(ids, p, edges, params, 0, linear="ldl").poses
    except ImportError:
        print("qdldl not installed: pip install qdldl to compare a sparse LDL^T factorisation")
    if not a.no_reference:
        solvers["scipy GN (before)"] = lambda p: solve_reference(ids, p, edges, params, 0).poses
    if not a.no_gtsam:
        try:
            import gtsam  # noqa: F401
            solvers["gtsam 4.3 LM"] = lambda p: solve_gtsam(ids, p, edges, params, 0)
        except ImportError:
            print("gtsam not installed: pip install gtsam==4.3.0 to compare")
    # Warm: the solved graph plus one new node chained from its odometry (what each window adds).
    last = next(e.z for e in edges if e.a == a.nodes - 2 and e.b == a.nodes - 1)
    rows, first = {}, None
    for name, fn in solvers.items():
        cold_w, cold_c, out = _median_ms(fn, init, a.repeat)
        warm_init = [out[i] for i in ids]
        warm_init[-1] = out[a.nodes - 2].compose(last)
        warm_w, warm_c, _ = _median_ms(fn, warm_init, a.repeat)
        rows[name] = (cold_w, cold_c, warm_w, warm_c)
        rot, pos = errors(out, truth)
        diff = ""
        if first is None:
            first = out
        else:
            d = max(float(np.abs(out[i].matrix() - first[i].matrix()).max()) for i in ids)
            diff = f"  max |pose - now's| {d:.1e}"
        print(f"{name:18s} cold {cold_w:7.1f} ms wall / {cold_c:7.1f} ms CPU   warm {warm_w:7.1f} / {warm_c:7.1f}   "
              f"rot median {rot:.3f} deg  position RMSE {pos:.4f}{diff}")
    # The linear algebra alone: one factorisation of the cold problem's first normal matrix by each method.
    from serve_app.recon import posegraph as pg

    free_nodes = np.ones(a.nodes, bool)
    free_nodes[0] = False
    pat = pg._NormalPattern(np.array([e.a for e in edges]), np.array([e.b for e in edges]), free_nodes)
    x0 = _stack(init)
    ia, ib = np.array([e.a for e in edges]), np.array([e.b for e in edges])
    r, Ja, Jb = pg._residuals_jac(tuple(v[ia] for v in x0), tuple(v[ib] for v in x0),
                                  _inverse(_stack([e.z for e in edges])), params.sig)
    H, _ = pat.assemble(r, Ja, Jb, np.ones(len(edges)))
    perm = pg._rcm_perm(pat)
    band = ""
    if perm is not None:
        rank = np.argsort(perm[::7])  # node (column of H / 7) -> its RCM position
        both = (pat.ga >= 0) & (pat.gb >= 0)
        band = f" (RCM band {int(np.abs(rank[pat.ga[both]] - rank[pat.gb[both]]).max())} nodes)"
    facts = {"SuperLU": lambda H: spla.splu(H, permc_spec="NATURAL", diag_pivot_thresh=0.0,
                                             options={"SymmetricMode": True})}
    if perm is not None:
        facts["banded Cholesky" + band] = lambda H: pg._Banded(H, perm)
    if "GN qdldl" in rows:
        ldl = pg._LDL()
        facts["qdldl (first: AMD + symbolic)"] = lambda H: pg._LDL().factor(H)
        ldl.factor(H)
        facts["qdldl (numeric refactor)"] = lambda H: ldl.factor(H)
    for name, fn in facts.items():
        fw, fc, _ = _median_ms(fn, H, a.repeat)
        print(f"factorisation of H ({H.shape[0]} x {H.shape[0]}, {H.nnz} nonzeros), {name}: {fw:.1f} ms wall / "
              f"{fc:.1f} ms CPU")
    # Local: what follows an ordinary window in serve_app/recon/consistency.py: the newest `graph_local_windows` (8)
    # nodes free, their edges' other ends held.
    free = set(ids[-8:])
    ledges = [e for e in edges if e.a in free or e.b in free]
    used = sorted({e.a for e in ledges} | {e.b for e in ledges})
    lfixed = [i for i in used if i not in free]
    linit = [warm_init[i] for i in used]
    for name, fn in (("scipy GN (now)", solve), ("scipy GN (before)", solve_reference)):
        if name in rows:
            lw, lc, _ = _median_ms(lambda p, fn=fn: fn(used, p, ledges, params, lfixed), linit, a.repeat)
            print(f"{name:18s} local solve ({len(free)} free of {len(used)} nodes, {len(ledges)} edges): "
                  f"{lw:.1f} ms wall / {lc:.1f} ms CPU")
    now = rows["scipy GN (now)"]
    print(f"target {TARGET_MS:.0f} ms: now/target cold {now[1] / TARGET_MS:.2f}x, warm {now[3] / TARGET_MS:.2f}x "
          "(CPU time)")
    for name, r in rows.items():
        if name != "scipy GN (now)":
            print(f"speed-up over {name}: cold {r[1] / now[1]:.1f}x, warm {r[3] / now[3]:.1f}x (CPU time; wall "
                  f"{r[0] / now[0]:.1f}x / {r[2] / now[2]:.1f}x)")


if __name__ == "__main__":
    main()
