"""The Sim(3) pose graph (serve_app/recon/posegraph.py): Lie helpers, the robust sparse solve, the loop gate."""

import numpy as np
import pytest

from serve_app.recon.geometry import Sim3
from serve_app.recon.posegraph import Edge, GraphParams, PoseGraph, so3_exp, so3_log, solve


def test_so3_exp_and_log_are_inverse_and_match_rodrigues():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(50, 3))
    w *= rng.uniform(0, 3.0, size=(50, 1)) / np.linalg.norm(w, axis=1, keepdims=True)  # angles below pi
    w[0] = 0.0
    w[1] = [1e-9, 0, 0]
    R = so3_exp(w)
    assert np.allclose(R @ np.swapaxes(R, 1, 2), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(R), 1.0)
    assert np.allclose(so3_log(R), w, atol=1e-7)
    # about z by 90 degrees
    assert np.allclose(so3_exp(np.array([0, 0, np.pi / 2])), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)


def _ring(n: int, seed: int, rot_deg: float = 0.5, trans: float = 0.01):
    """Truth on a circle, odometry to the previous node with noise, the chained odometry as the estimate."""
    rng = np.random.default_rng(seed)
    truth = [Sim3(1.0, so3_exp(np.array([0.0, a, 0.0])), [2 * np.cos(a), 0.0, 2 * np.sin(a)])
             for a in 2 * np.pi * np.arange(n) / n]

    def rel(a, b, k=1.0):
        z = truth[a].inverse().compose(truth[b])
        return Sim3(z.s * np.exp(rng.normal() * 0.01 * k), so3_exp(rng.normal(size=3) * np.deg2rad(rot_deg) * k) @ z.R,
                    z.t + rng.normal(size=3) * trans * k)

    edges = [Edge(i - 1, i, rel(i - 1, i)) for i in range(1, n)]
    est = [truth[0]]
    for e in edges:
        est.append(est[-1].compose(e.z))
    return truth, est, edges, rel


def _pos_rmse(poses, truth):
    return float(np.sqrt(np.mean([np.sum((poses[i].t - truth[i].t) ** 2) for i in range(len(truth))])))


def test_a_loop_edge_removes_most_of_the_chained_drift_and_the_fixed_node_stays():
    truth, est, edges, rel = _ring(60, seed=1)
    loop = Edge(0, 59, rel(0, 59, 0.5), kind="loop")
    g = PoseGraph(GraphParams(sigma_rot_deg=0.5, sigma_trans=0.01, sigma_scale=0.01))
    for i, x in enumerate(est):
        g.add_node(i, x)
    for e in edges + [loop]:
        g.add_edge(e)
    res = g.solve()
    before, after = _pos_rmse(est, truth), _pos_rmse(res.poses, truth)
    assert after < 0.4 * before, (before, after)
    assert res.cost_after < res.cost_before
    assert np.allclose(res.poses[0].matrix(), est[0].matrix())  # the gauge: node 0 held
    # A chain alone is already consistent: nothing moves.
    chain = solve(list(range(60)), est, edges, g.params, fixed=0)
    assert max(np.abs(chain.poses[i].matrix() - est[i].matrix()).max() for i in range(60)) < 1e-6


def test_a_wrong_edge_pulls_less_with_the_robust_kernel():
    truth, est, edges, rel = _ring(40, seed=2)
    good = Edge(0, 39, rel(0, 39, 0.5), kind="loop")
    bad = Edge(5, 30, rel(15, 30, 0.5), kind="loop")  # claims node 30 is where node 15 is
    params = GraphParams(sigma_rot_deg=0.5, sigma_trans=0.01, sigma_scale=0.01, max_iterations=30, huber=3.0)
    plain = solve(list(range(40)), est, edges + [good, bad],
                  GraphParams(**{**params.__dict__, "huber": 1e9}), fixed=0)
    robust = solve(list(range(40)), est, edges + [good, bad], params, fixed=0)
    assert _pos_rmse(robust.poses, truth) < _pos_rmse(plain.poses, truth)
    assert len(edges) + 1 in robust.downweighted  # the wrong edge is the one cut


def test_the_loop_gate_separates_drift_from_another_place():
    _, est, _, rel = _ring(60, seed=3)
    g = PoseGraph(GraphParams(sigma_rot_deg=0.5, sigma_trans=0.01, sigma_scale=0.01))
    for i, x in enumerate(est):
        g.add_node(i, x)
    true_loop = Edge(0, 59, rel(0, 59, 0.5), kind="loop")
    wrong = Edge(0, 59, rel(20, 59, 0.5), kind="loop")  # a look-alike place a third of the way round
    # (a rotation drift moves the far end by its lever arm: the true loop's figure grows a little with the path)
    assert g.loop_discrepancy(true_loop, 59) < 50
    assert g.loop_discrepancy(wrong, 59) > 10 * g.loop_discrepancy(true_loop, 59)


def test_solve_holds_every_fixed_node_and_refuses_no_fixed_node():
    _, est, edges, rel = _ring(20, seed=4)
    edges = edges + [Edge(0, 19, rel(0, 19, 0.5), kind="loop")]
    params = GraphParams()
    res = solve(list(range(20)), est, edges, params, fixed=list(range(10)))
    for i in range(10):
        assert np.allclose(res.poses[i].matrix(), est[i].matrix())
    assert any(not np.allclose(res.poses[i].matrix(), est[i].matrix()) for i in range(10, 20))
    with pytest.raises(ValueError):
        solve(list(range(20)), est, edges, params, fixed=[])
    with pytest.raises(KeyError):
        PoseGraph().add_edge(Edge(0, 1, Sim3.identity()))


def _random_sims(rng, m: int, scale: float = 1.0):
    from serve_app.recon.posegraph import _stack

    return _stack([Sim3(np.exp(rng.normal() * 0.3), so3_exp(rng.normal(size=3) * scale), rng.normal(size=3))
                   for _ in range(m)])


def test_analytic_jacobians_match_finite_differences():
    from serve_app.recon.posegraph import _inverse, _residuals, _residuals_jac, _retract

    rng = np.random.default_rng(5)
    m = 30
    xa, xb, z = _random_sims(rng, m), _random_sims(rng, m), _random_sims(rng, m)
    # far-off edges (a wrong loop, a drifted start), edges that nearly hold (the solver's regime) and residual
    # rotations near zero (the Jr^-1 series branch)
    zb = (z[0], z[1], z[2])
    for rot in (None, 0.05, 1e-7):
        if rot is not None:
            from serve_app.recon.posegraph import _compose
            rel = _compose(_inverse(xa), xb)
            zb = _compose(rel, _random_sims(rng, m, rot))
        zinv = _inverse(zb)
        sig = GraphParams().sig
        r, Ja, Jb = _residuals_jac(xa, xb, zinv, sig)
        assert np.allclose(r, _residuals(xa, xb, zinv, sig))
        eps = 1e-7
        for k in range(7):
            d = np.zeros((m, 7))
            d[:, k] = eps
            fa = (_residuals(_retract(xa, d), xb, zinv, sig) - _residuals(_retract(xa, -d), xb, zinv, sig)) / (2 * eps)
            fb = (_residuals(xa, _retract(xb, d), zinv, sig) - _residuals(xa, _retract(xb, -d), zinv, sig)) / (2 * eps)
            assert np.allclose(Ja[:, :, k], fa, rtol=1e-4, atol=1e-3 * np.abs(fa).max()), k
            assert np.allclose(Jb[:, :, k], fb, rtol=1e-4, atol=1e-3 * np.abs(fb).max()), k


def _edge_problem(rng, n: int, ia, ib, near: bool):
    """Random node states and edge measurements: far off (a wrong loop, a drifted start) or satisfied up to a
    small perturbation (residual rotations near zero: the Jr^-1 series branch)."""
    from serve_app.recon.posegraph import _compose, _inverse

    x = _random_sims(rng, n)
    if near:
        z = _compose(_compose(_inverse(tuple(v[ia] for v in x)), tuple(v[ib] for v in x)),
                     _random_sims(rng, len(ia), 1e-7))
    else:
        z = _random_sims(rng, len(ia))
    return x, tuple(np.ascontiguousarray(v) for v in _inverse(z))


def test_chord_gradient_parts_equal_the_jacobians_transposed_times_a_vector():
    """A chord step's gradient comes from `_jt_times` (each edge's Jacobians formed in scratch, never stored):
    it must be J^T v of the Jacobians the finite-difference test checks, also far from consistent edges and at
    rotations near zero (the Jr^-1 series branch)."""
    from serve_app.recon import posegraph_kernels as K
    from serve_app.recon.posegraph import _edge_terms, _jt_times

    rng = np.random.default_rng(11)
    m = 40
    ia, ib = np.arange(m), m + np.arange(m)
    sig = GraphParams().sig
    for near in (False, True):
        x, zinv = _edge_problem(rng, 2 * m, ia, ib, near)
        _, terms = _edge_terms(x, ia, ib, zinv, sig)
        Ja, Jb = K.jacobians(terms, 1.0 / sig)
        v = rng.normal(size=(m, 7))
        ga, gb = _jt_times(terms, v, sig)
        assert np.allclose(ga, np.einsum("nji,nj->ni", Ja, v), rtol=1e-12, atol=1e-12 * np.abs(ga).max())
        assert np.allclose(gb, np.einsum("nji,nj->ni", Jb, v), rtol=1e-12, atol=1e-12 * np.abs(gb).max())


def test_normal_equations_equal_dense_jtwj():
    """The solver's normal equations (each edge's weighted blocks formed by the compiled pass, summed in the block
    pattern; gradient per node) are J^T W J and J^T W r of the dense Jacobian built from the per-edge Jacobians,
    and the factorisation solves them."""
    from serve_app.recon import posegraph_kernels as K
    from serve_app.recon.posegraph import _edge_terms, _normal
    from serve_app.recon.posegraph_linalg import BlockPattern

    rng = np.random.default_rng(6)
    n = 30
    ia = np.r_[np.arange(n - 1), np.arange(n - 2), [2, 25]]
    ib = np.r_[np.arange(1, n), np.arange(2, n), [20, 4]]
    m = len(ia)
    free = np.ones(n, bool)
    free[[0, 5]] = False  # held nodes have no columns
    pat = BlockPattern(ia, ib, free)
    sig = GraphParams().sig
    x, zinv = _edge_problem(rng, n, ia, ib, near=False)
    r, terms = _edge_terms(x, ia, ib, zinv, sig)
    Ja, Jb = K.jacobians(terms, 1.0 / sig)
    w = rng.uniform(size=m)
    lu, g = _normal(pat, r, terms, w, sig)
    J = np.zeros((7 * m, 7 * n))  # dense Jacobian in node order
    for e in range(m):
        J[7 * e:7 * e + 7, 7 * ia[e]:7 * ia[e] + 7] += Ja[e]
        J[7 * e:7 * e + 7, 7 * ib[e]:7 * ib[e] + 7] += Jb[e]
    cols = np.concatenate([7 * i + np.arange(7) for i in range(n) if free[i]])
    J = J[:, cols]
    W = np.repeat(w, 7)
    order = np.concatenate([7 * pat.col_of[i] + np.arange(7) for i in range(n) if free[i]])  # node -> H position
    Hd = np.zeros((len(order), len(order)))
    Hd[np.ix_(order, order)] = J.T @ (W[:, None] * J) + 1e-9 * np.eye(len(order))
    gd = np.zeros(len(order))
    gd[order] = J.T @ (W * r.reshape(-1))
    assert np.allclose(g, gd, rtol=1e-12, atol=1e-12 * np.abs(gd).max())
    assert np.allclose(lu.solve(g), np.linalg.solve(Hd, gd), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_solution_matches_a_plain_dense_gauss_newton():
    """The sparse machinery (pattern, ordering, chord steps) changes speed, not the answer."""
    from serve_app.recon.posegraph import _inverse, _residuals, _retract, _stack

    _, est, edges, rel = _ring(30, seed=7)
    edges = edges + [Edge(0, 29, rel(0, 29, 0.5), kind="loop"), Edge(3, 17, rel(3, 17), kind="loop")]
    params = GraphParams(sigma_rot_deg=0.5, sigma_trans=0.01, sigma_scale=0.01, huber=1e9, max_iterations=30,
                         tol=1e-10)
    res = solve(list(range(30)), est, edges, params, fixed=0)
    x = _stack(est)
    ia, ib = np.array([e.a for e in edges]), np.array([e.b for e in edges])
    zinv = _inverse(_stack([e.z for e in edges]))

    def rr(xx):
        return _residuals(tuple(v[ia] for v in xx), tuple(v[ib] for v in xx), zinv, params.sig).reshape(-1)

    for _ in range(15):  # dense GN with central-difference Jacobians, node 0 held
        r0 = rr(x)
        J = np.zeros((len(r0), 7 * 29))
        for c in range(7 * 29):
            d = np.zeros((30, 7))
            d[1 + c // 7, c % 7] = 1e-6
            J[:, c] = (rr(_retract(x, d)) - rr(_retract(x, -d))) / 2e-6
        D = np.zeros((30, 7))
        D[1:] = np.linalg.solve(J.T @ J, -J.T @ r0).reshape(29, 7)
        x = _retract(x, D)
    for i in range(30):
        assert np.allclose(res.poses[i].matrix(), Sim3(x[0][i], x[1][i], x[2][i]).matrix(), atol=1e-6)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_chain_factorisation_and_superlu_take_the_same_steps_with_loops_and_a_wrong_edge(seed, monkeypatch):
    """The linear algebra changes speed, not the answer: on random rings with loop edges and one wrong edge the
    block Cholesky in the chain order and SuperLU on the whole matrix in a minimum-degree order take the same steps
    to the same poses, cutting the same edge."""
    import scipy.sparse.linalg as spla

    import serve_app.recon.posegraph_linalg as pl

    rng = np.random.default_rng(seed)
    n = 50
    _, est, edges, rel = _ring(n, seed)
    pairs = {(int(a), int(a) + int(rng.integers(12, n - a))) for a in rng.integers(0, n - 13, size=4)}
    loops = [Edge(a, b, rel(a, b, 0.5), kind="loop") for a, b in sorted(pairs)]
    bad = Edge(5, 30, rel(15, 30, 0.5), kind="loop")  # claims node 30 is where node 15 is
    all_edges = edges + loops + [bad]
    params = GraphParams(sigma_rot_deg=0.5, sigma_trans=0.01, sigma_scale=0.01, max_iterations=30, huber=3.0)
    ids = list(range(n))
    free = np.ones(n, bool)
    free[0] = False
    ia, ib = np.array([e.a for e in all_edges]), np.array([e.b for e in all_edges])
    monkeypatch.setattr(pl, "MAX_LOOP_SHARE", 1.0)
    assert pl.BlockPattern(ia, ib, free).order == "chain"  # the chain order is the one taken
    chain = solve(ids, est, all_edges, params, fixed=0)
    monkeypatch.setattr(pl, "MAX_LOOP_SHARE", 0.0)
    monkeypatch.setattr(pl.BlockPattern, "factor", lambda pat, blocks, bs: spla.splu(
        pat.csc(blocks, bs), permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True}))
    assert pl.BlockPattern(ia, ib, free).order == "minimum degree"
    lu = solve(ids, est, all_edges, params, fixed=0)
    assert (chain.iterations, chain.factorisations) == (lu.iterations, lu.factorisations)
    assert max(np.abs(chain.poses[i].matrix() - lu.poses[i].matrix()).max() for i in ids) < 1e-8
    assert chain.downweighted == lu.downweighted and len(all_edges) - 1 in chain.downweighted  # the wrong edge


def test_a_drifted_start_takes_the_chordal_initialisation_and_reaches_the_same_minimum():
    """From a chain drifted by tens of degrees the chordal start is taken (fewer factorisations) and Gauss-Newton
    ends at the minimum it reaches without it (chordal_above = inf), as a solve to 1e-12 finds it."""
    _, est, edges, rel = _ring(120, seed=8, rot_deg=2.0)
    edges = edges + [Edge(0, 119, rel(0, 119, 0.5), kind="loop"), Edge(10, 70, rel(10, 70, 0.5), kind="loop")]
    params = GraphParams(sigma_rot_deg=0.5, sigma_trans=0.01, sigma_scale=0.01)
    ids = list(range(120))
    fast = solve(ids, est, edges, params, fixed=0)
    plain = solve(ids, est, edges, GraphParams(**{**params.__dict__, "chordal_above": float("inf"),
                                                   "max_iterations": 30}), fixed=0)
    exact = solve(ids, est, edges, GraphParams(**{**params.__dict__, "tol": 1e-12, "max_iterations": 40}), fixed=0)
    assert fast.factorisations < plain.factorisations
    assert fast.cost_before == plain.cost_before
    for res in (fast, plain):
        assert max(np.abs(res.poses[i].matrix() - exact.poses[i].matrix()).max() for i in ids) < 5e-5
        assert abs(res.cost_after - exact.cost_after) < 1e-6 * exact.cost_after


def test_polar_gives_the_nearest_rotation():
    from serve_app.recon.posegraph_kernels import polar as _polar

    rng = np.random.default_rng(9)
    R = so3_exp(rng.normal(size=(50, 3)))
    X = R * rng.uniform(0.5, 1.5, (50, 1, 1)) + rng.normal(size=(50, 3, 3)) * 0.05
    X[0] = -np.eye(3)  # a reflection: no rotation near it, the fallback is kept
    U, _, Vt = np.linalg.svd(X)
    P = _polar(X, R)
    assert np.allclose(P[1:], (U @ Vt)[1:], atol=1e-10)
    assert np.allclose(P[0], R[0])


def test_setup_holds_the_oldest_node_of_every_part_no_fixed_node_reaches():
    """A part of the graph without a fixed node (and a node without edges) has no gauge: its lowest-index node
    is held, so it moves rigidly with nothing; the part with the fixed node stays free; edges to nodes outside
    the solve are dropped."""
    from serve_app.recon.posegraph import graph_setup

    _, est, edges, rel = _ring(12, seed=10)
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11]  # node 10 not in this solve: its edges go
    parts = [e for e in edges if e.b not in (5, 9, 10)]  # 0-4, 5-8, {9}, {11} and the edge 10-11
    parts.append(Edge(8, 6, rel(8, 6)))  # a second edge inside a part, against the chain's direction
    g = graph_setup(ids, [est[i] for i in ids], parts, fixed=2)
    assert g is not None and g.m == len(parts) - 1  # the edge 10-11 dropped
    held = [ids[i] for i in np.flatnonzero(~g.free)]
    assert held == [2, 5, 9, 11]
    res = solve(ids, [est[i] for i in ids], parts, GraphParams(), fixed=2)
    for i in (2, 5, 9, 11):
        assert np.allclose(res.poses[i].matrix(), est[i].matrix())


def test_stacking_takes_any_sim3_layout():
    """Poses stack by joining their float64 bytes; transposed (non-contiguous) rotations, such as
    Sim3.inverse() makes, and other dtypes assigned after construction take the concatenating path."""
    from serve_app.recon.posegraph import _stack

    rng = np.random.default_rng(12)
    sims = [Sim3(np.exp(rng.normal()), so3_exp(rng.normal(size=3)), rng.normal(size=3)) for _ in range(6)]
    sims[1] = sims[1].inverse()
    assert not sims[1].R.flags.c_contiguous
    odd = Sim3(2.0, np.eye(3), np.zeros(3))
    odd.t = np.array([1, 2, 3], np.int64)  # 24 bytes like 3 float64s, but integers
    sims.append(odd)
    for group in (sims[:1], sims[2:6], sims):
        s, R, t = _stack(group)
        assert np.array_equal(s, [x.s for x in group])
        assert np.array_equal(R, np.stack([x.R for x in group])) and R.flags.c_contiguous and R.flags.writeable
        assert np.array_equal(t, np.stack([x.t for x in group]).astype(np.float64)) and t.dtype == np.float64


_WARM_UP_CHECK = """
import json, sys
import numpy as np
import serve_app.recon.consistency, serve_app.sessions.journal_codec
from serve_app.recon import posegraph as pg
lazy = "numba" not in sys.modules  # importing the solver and its users does not load numba
pg.warm_up()
import numba
from serve_app.recon import posegraph_kernels, posegraph_linalg
disp = {f"{m.__name__}.{k}": v for m in (posegraph_kernels, posegraph_linalg) for k, v in vars(m).items()
        if isinstance(v, numba.core.registry.CPUDispatcher)}
disp.update({f"block size {bs}: {i}": f for bs, fs in posegraph_linalg._KERNELS.items() for i, f in enumerate(fs)})
before = {k: len(v.signatures) for k, v in disp.items()}
sys.path.insert(0, "tests/recon")
from test_posegraph import _ring
rng = np.random.default_rng(7)
n = 300
truth, est, edges, rel = _ring(n, seed=7, rot_deg=1.0)
edges += [pg.Edge(b - 2, b, rel(b - 2, b)) for b in range(2, n)]
edges += [pg.Edge(int(a), int(a) + 150, rel(int(a), int(a) + 150, 0.5), kind="loop")
          for a in rng.integers(0, n - 150, 6)]
ids = list(range(n))
params = pg.GraphParams(sigma_rot_deg=0.5, sigma_trans=0.01, sigma_scale=0.01)
cold = pg.solve(ids, est, edges, params, fixed=0)  # from the drifted chain
warm = pg.solve(ids, [cold.poses[i] for i in ids], edges, params, fixed=0)
free = set(ids[-8:])  # the per-window local solve: the newest nodes free, their neighbours held
local = [e for e in edges if e.a in free or e.b in free]
used = sorted({e.a for e in local} | {e.b for e in local})
pg.solve(used, [est[i] for i in used], local, params, [i for i in used if i not in free])
g = pg.PoseGraph(params)
for i in ids:
    g.add_node(i, est[i])
g.loop_discrepancy(edges[-1], 150)
new = {k: len(v.signatures) - before[k] for k, v in disp.items() if len(v.signatures) != before[k]}
print(json.dumps({"lazy": lazy, "new": new, "kernels": len(disp), "cold_factorisations": cold.factorisations}))
"""


def test_warm_up_compiles_every_kernel_a_solve_uses_and_importing_the_solver_loads_no_numba():
    """In a fresh process: importing the solver and its users (consistency, the journal codec) does not import
    numba; after warm_up() a cold, a warm and a local solve of another graph and the loop gate compile nothing
    more (the ingress warms up when a replica starts, so no session's first global solve waits for numba)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _WARM_UP_CHECK], cwd=root, capture_output=True, text=True,
                         timeout=600, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["lazy"]
    assert res["kernels"] >= 10 and res["cold_factorisations"] >= 1
    assert res["new"] == {}
