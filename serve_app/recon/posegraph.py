"""Sim(3) pose graph over a session's windows: nodes, relative-pose edges, a robust sparse solver (numpy/scipy,
the per-edge and per-node work compiled with numba in posegraph_kernels.py).

A node is one window: its Sim(3) from the window's own gauge (model output, arbitrary scale) to the world. An
edge (a, b, Z) says "gauge b -> gauge a is Z", i.e. S_b ≈ S_a ∘ Z. Odometry edges come from the frames two
windows share (context frames), loop edges from a verified loop window. Each gauge is normalised by the window's
median depth, so a translation residual is in units of the scene depth in every window (the model's per-window
scale does not weigh edges).

The solver is Gauss-Newton with per-edge residual r = [log R_E / sigma_rot, t_E / sigma_t, log s_E / sigma_s]
of E = Z^-1 ∘ S_a^-1 ∘ S_b (normalised gauges), analytic Jacobians, and Huber weights per edge after a first
plain least-squares pass (a wrong edge then pulls with bounded force; loops that disagree with the odometry are
also refused before they enter, see `loop_discrepancy`). What makes a 1,000-window solve fast (bench/posegraph.py):
a start far from consistent (a drifted chain after a loop closes) is first replaced by a chordal initialisation
(three linear solves: rotations, log scales, translations), after which Gauss-Newton needs two factorisations
instead of four; the normal matrix is summed at node level into a block pattern and factored by a compiled
block Cholesky in chain order, the nodes the loops touch last (posegraph_linalg.py); chord
steps (the last factorisation kept while steps are small) need only the gradient (`_jt_times`); iterations stop
once the contraction of the updates says the rest is below a tenth of `tol`; and everything per edge or per node
(composing the edges, the Jacobians and their weighted 7x7 normal blocks, retractions, the chordal start's terms
and polar projections, the gauge of unconnected parts) runs in compiled loops (posegraph_kernels.py): in batched
numpy it was one call per step on (m, 7, 7) stacks, and the calls' overhead and temporaries were half of a cold
solve (the non-factorisation part 2.1x cheaper with them, bench/README.md). bench/posegraph.py compares the
solver with the previous one (SuperLU on the whole matrix, four factorisations from a drifted start) and gtsam.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from serve_app.recon.geometry import Sim3

if TYPE_CHECKING:
    from serve_app.recon.posegraph_linalg import BlockPattern


class _Lazy:
    """A module imported at first use, then bound to its name here: the compiled kernels need numba (~0.3 s and
    ~100 MiB RSS per process to import), which the processes that only read Edge / GraphParams (the journal
    codec, the session store, the reconstruction's config) need not pay."""

    def __init__(self, module: str, name: str):
        self._module, self._name = module, name

    def __getattr__(self, attr: str):
        mod = importlib.import_module(self._module)
        globals()[self._name] = mod
        return getattr(mod, attr)


K = _Lazy("serve_app.recon.posegraph_kernels", "K")
LA = _Lazy("serve_app.recon.posegraph_linalg", "LA")

# --- batched Sim(3) helpers: (s (n,), R (n, 3, 3), t (n, 3)) ------------------------------------------------


def so3_exp(w: np.ndarray) -> np.ndarray:
    """Rotation vectors (..., 3) -> rotation matrices (..., 3, 3) (Rodrigues)."""
    w = np.asarray(w, np.float64)
    return K.so3_exp_rows(np.ascontiguousarray(w.reshape(-1, 3))).reshape(w.shape[:-1] + (3, 3))


def so3_log(R: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> rotation vectors (..., 3) (angles below ~179.9 degrees)."""
    R = np.asarray(R, np.float64)
    return K.so3_log_rows(np.ascontiguousarray(R.reshape(-1, 3, 3))).reshape(R.shape[:-2] + (3,))


def _compose(a, b):
    sa, Ra, ta = a
    sb, Rb, tb = b
    return sa * sb, Ra @ Rb, sa[:, None] * np.einsum("nij,nj->ni", Ra, tb) + ta


def _inverse(a):
    s, R, t = a
    Rt = np.swapaxes(R, 1, 2)
    return 1.0 / s, Rt, -np.einsum("nij,nj->ni", Rt, t) / s[:, None]


_F64 = np.dtype(np.float64)
_GET_S, _GET_R, _GET_T, _GET_DTYPE = attrgetter("s"), attrgetter("R"), attrgetter("t"), attrgetter("dtype")
_GET_A, _GET_B, _GET_Z, _GET_W = attrgetter("a"), attrgetter("b"), attrgetter("z"), attrgetter("weight")


def _rows(arrays: list[np.ndarray], k: int) -> np.ndarray:
    """(n, k) float64 from n arrays of k numbers each: their bytes joined (half of np.concatenate's per-array
    cost) when all are C-contiguous float64 (what Sim3 holds), else concatenated."""
    try:
        buf = b"".join(arrays)
    except TypeError:  # a non-contiguous array
        buf = None
    if buf is not None and len(buf) == 8 * k * len(arrays) and set(map(_GET_DTYPE, arrays)) == {_F64}:
        return np.frombuffer(buf, np.float64).reshape(-1, k).copy()  # an owner: its row views are cheaper
    return np.concatenate(arrays).astype(np.float64, copy=False).reshape(-1, k)


def _stack(sims: list[Sim3]):
    n = len(sims)
    if not n:
        return np.zeros(0), np.zeros((0, 3, 3)), np.zeros((0, 3))
    return (np.fromiter(map(_GET_S, sims), np.float64, n), _rows(list(map(_GET_R, sims)), 9).reshape(n, 3, 3),
            _rows(list(map(_GET_T, sims)), 3))


def _sim3_of(s: float, R: np.ndarray, t: np.ndarray) -> Sim3:
    """Sim3 from a solver row without __post_init__'s conversions (float, float64 (3, 3) and (3,) already): a
    1,000-node solve builds 1,000 of them."""
    x = object.__new__(Sim3)
    x.s, x.R, x.t = s, R, t
    return x


def _retract(x, d):
    """x ∘ Exp(d) for d (n, 7) = (rotation vector, translation, log scale)."""
    return K.retract(*x, np.ascontiguousarray(d, np.float64))


def _residuals(xa, xb, zinv, sig) -> np.ndarray:
    """(m, 7) whitened residuals of E = Z^-1 ∘ A^-1 ∘ B, composed as Sim(3)s (the loop gate's one edge, and the
    tests' reference for `_edge_terms`)."""
    s, R, t = _compose(zinv, _compose(_inverse(xa), xb))
    return np.concatenate([so3_log(R), t, np.log(s)[:, None]], 1) / sig


@dataclass
class Edge:
    a: int  # node (window) ids
    b: int
    z: Sim3  # normalised gauge b -> normalised gauge a
    kind: str = "odom"  # "odom" | "loop"
    weight: float = 1.0  # multiplies the information (alignment quality)


@dataclass
class SolveResult:
    poses: dict[int, Sim3]  # node -> normalised gauge -> world
    iterations: int
    cost_before: float
    cost_after: float
    downweighted: list[int] = field(default_factory=list)  # edges the robust kernel cut below half weight
    factorisations: int = 0  # of the normal matrix


@dataclass
class GraphParams:
    sigma_rot_deg: float = 1.0
    sigma_trans: float = 0.02  # x depth
    sigma_scale: float = 0.02  # log scale
    huber: float = 5.0  # whitened residual norm (7 components: ~2.6 typical) beyond which an edge pulls less
    max_iterations: int = 10
    tol: float = 1e-4  # largest update (radians / depth units / log scale) at which an iteration has converged
    chordal_above: float = 2.0  # mean whitened squared residual above which a solve tries the chordal start

    @property
    def sig(self) -> np.ndarray:
        return np.array([np.deg2rad(self.sigma_rot_deg)] * 3 + [self.sigma_trans] * 3 + [self.sigma_scale])


class PoseGraph:
    """Nodes keyed by window index (normalised gauge -> world), edges between them. Plain data; snapshot-able."""

    def __init__(self, params: GraphParams | None = None):
        self.params = params or GraphParams()
        self.nodes: dict[int, Sim3] = {}
        self.edges: list[Edge] = []

    def add_node(self, k: int, pose: Sim3) -> None:
        self.nodes[int(k)] = pose

    def add_edge(self, edge: Edge) -> None:
        if edge.a not in self.nodes or edge.b not in self.nodes:
            raise KeyError(f"edge {edge.a}-{edge.b}: unknown node")
        self.edges.append(edge)

    @property
    def num_loops(self) -> int:
        return sum(e.kind == "loop" for e in self.edges)

    def loop_discrepancy(self, edge: Edge, odometry_steps: int) -> float:
        """Squared whitened disagreement of a candidate edge with the current estimate, per odometry step between
        its ends: a true loop differs by the drift accumulated over those steps (a random walk, so the squared
        discrepancy grows with their number); a false one by the distance between two different places."""
        xa, xb = _stack([self.nodes[edge.a]]), _stack([self.nodes[edge.b]])
        r = _residuals(xa, xb, _inverse(_stack([edge.z])), self.params.sig)
        return float((r ** 2).sum() / max(odometry_steps, 1))

    def state(self) -> dict:
        return {"nodes": dict(self.nodes), "edges": list(self.edges), "params": self.params}

    @classmethod
    def from_state(cls, st: dict) -> PoseGraph:
        g = cls(st["params"])
        g.nodes = dict(st["nodes"])
        g.edges = list(st["edges"])
        return g

    def solve(self, fixed: int | None = None) -> SolveResult:
        """Optimise every node but `fixed` (default: the oldest) from the current estimate."""
        ids = sorted(self.nodes)
        return solve(ids, [self.nodes[i] for i in ids], self.edges, self.params,
                     fixed=ids[0] if fixed is None else fixed)


def _residuals_jac(xa, xb, zinv, sig):
    """Whitened residuals (m, 7) of E = Z^-1 ∘ A^-1 ∘ B for per-edge states xa, xb and their analytic Jacobians
    (m, 7, 7) with respect to the `_retract` increments of A and B (columns: rotation vector, translation, log
    scale). For tests and benches: the solver forms each edge's Jacobians only inside `posegraph_kernels`."""
    m = len(xa[0])
    x = tuple(np.ascontiguousarray(np.concatenate([u, v]), np.float64) for u, v in zip(xa, xb))
    idx = np.arange(2 * m)
    r, terms = _edge_terms(x, idx[:m], idx[m:], zinv, sig)
    return (r, *K.jacobians(terms, 1.0 / sig))


def _edge_terms(x, ia, ib, zinv, sig, terms: bool = True):
    """The whitened residuals (m, 7) of the edges (ia, ib) at state x, and (if `terms`) what their Jacobians
    reuse: a solve's cost checks take only the residuals, and the first iteration adds the Jacobians without
    composing the edges again."""
    m = len(ia)
    r, T = np.empty((m, 7)), np.empty((m if terms else 0, K.NT))
    K.edge_terms(*x, ia, ib, *zinv, 1.0 / sig, r, T)
    return r, T


def _jt_times(terms, v, sig):
    """(Ja^T v, Jb^T v) per edge for v (m, 7), from `_edge_terms`'s terms (a chord step needs only the
    gradient)."""
    ga, gb = np.empty((len(terms), 7)), np.empty((len(terms), 7))
    K.jt_times(terms, np.ascontiguousarray(v), 1.0 / sig, ga, gb)
    return ga, gb


REFACTOR_STEP = 0.03  # largest update (radians / depth units / log scale) after which H is factored afresh


def _normal(pat: BlockPattern, r, terms, w, sig):
    """(factorisation of H, gradient) of sum_e w_e |r_e|^2 / 2 linearised: each edge's four weighted 7x7 blocks
    and two gradient parts from its terms in one compiled pass, summed per node by the block pattern."""
    m = len(w)
    c, ga, gb = np.empty((4 * m, 49)), np.empty((m, 7)), np.empty((m, 7))
    K.normal_blocks(terms, r, w, 1.0 / sig, c, ga, gb)
    # a tiny ridge: H stays factorable along a gauge-free direction
    return pat.factor(pat.blocks(c, ridge=1e-9), 7), pat.gradient(ga, gb).reshape(-1)


@dataclass
class GraphSetup:
    """A solve's inputs as arrays: node states, edge endpoints, inverse measurements, weights, free nodes."""

    n: int
    x: tuple
    ia: np.ndarray
    ib: np.ndarray
    zinv: tuple
    base_w: np.ndarray
    m: int
    free: np.ndarray


def graph_setup(ids, poses, edges, fixed: int | set[int] | list[int]) -> GraphSetup | None:
    """The arrays a solve works on, with the gauge: the `fixed` node(s), and the oldest node of any part of the
    graph no fixed node reaches. None when nothing can move (no edge, or every node held)."""
    n = len(ids)
    pos = {k: i for i, k in enumerate(ids)}
    if n < 2 or not edges:
        return None
    ia = np.fromiter(map(pos.get, map(_GET_A, edges), repeat(-1)), np.int64, len(edges))
    ib = np.fromiter(map(pos.get, map(_GET_B, edges), repeat(-1)), np.int64, len(edges))
    known = (ia >= 0) & (ib >= 0)
    if not known.all():  # edges to nodes not in this solve
        edges = [e for e, k in zip(edges, known.tolist()) if k]
        ia, ib = ia[known], ib[known]
        if not edges:
            return None
    x = _stack(poses)
    zinv = tuple(np.ascontiguousarray(v) for v in _inverse(_stack(list(map(_GET_Z, edges)))))
    base_w = np.fromiter(map(_GET_W, edges), np.float64, len(edges))
    m = len(edges)
    free = np.ones(n, bool)
    for k in ([fixed] if isinstance(fixed, int) else fixed):
        if k in pos:
            free[pos[k]] = False
    if free.all() or not free.any():
        raise ValueError("solve needs at least one fixed and one free node")
    # A part of the graph not connected to a fixed node (e.g. windows whose edges a session takeover lost) has
    # no gauge: hold its oldest node too, so it moves rigidly with nothing instead of drifting off.
    K.hold_unanchored(ia, ib, free)
    if not free.any():
        return None
    return GraphSetup(n, x, ia, ib, zinv, base_w, m, free)


def _chordal(x, ia, ib, zinv, w, pat: BlockPattern, free: np.ndarray):
    """A starting point from three linear least-squares problems on the node graph (a chordal relaxation, as in
    rotation averaging): rotations first (R_b = R_a R_Z for all edges at once over the 3x3 matrices, then each
    projected onto SO(3)), then log scales (log s_b = log s_a + log s_Z), then translations given both
    (t_b = t_a + s_a R_a t_Z). Each is a sparse solve in the pattern's block layout (3x3 blocks, then 1x1), far
    cheaper than a Gauss-Newton step on the 7x7 blocks, and from a drifted chain it lands next to the optimum:
    Gauss-Newton then needs one factorisation instead of four."""
    s, R, t = x
    zsi, zRi, zti = zinv
    m, nf = len(w), pat.nf
    cf = pat.col_of[free]
    # Rotations: unknowns Q = R^T, residual Q_b - Z^T Q_a (three independent columns sharing one matrix).
    c, ga, gb = np.empty((4 * m, 9)), np.empty((m, 9)), np.empty((m, 9))
    K.chordal_rotation_terms(R, ia, ib, zRi, w, c, ga, gb)
    g = pat.gradient(ga, gb)  # (F, 9): per node a 3 x 3 (rows x columns)
    dQ = pat.factor(pat.blocks(c, ridge=1e-9), 3).solve(-g.reshape(3 * nf, 3))
    R = K.chordal_rotations(R, dQ.reshape(nf, 3, 3), pat.col_of)  # each projected onto SO(3)
    # Log scales, then translations: the graph Laplacian (1x1 blocks) with one and three right-hand sides.
    lu = pat.factor(pat.blocks(np.r_[w, -w, -w, w][:, None], ridge=1e-9), 1)
    ls = np.log(s)
    wr = w * (ls[ib] - ls[ia] - np.log(1.0 / zsi))
    ls[free] += lu.solve(-pat.gradient(-wr[:, None], wr[:, None]).reshape(-1))[cf]
    s = np.exp(ls)
    wr = K.chordal_translation_terms(s, R, t, ia, ib, zsi, zRi, zti, w)
    t = t.copy()
    t[free] += lu.solve(-pat.gradient(-wr, wr))[cf]
    return s, R, t


def warm_up() -> float:
    """Load the compiled kernels, compiling them first where numba's disk cache has no copy for this source
    (~25 s CPU on the 2-core box, once per machine and source version; ~0.5 s to load): two small solves that
    take every compiled path (a drifted ring with loops and a wrong edge: chordal start, chain order, plain and
    robust passes, chord steps, 7x7 / 3x3 / 1x1 blocks; then a graph with many loops: the minimum-degree order).
    The ingress runs it in its thread pool when a replica starts, and `make install` once, so no session's first
    global solve waits for the compiler. Returns the seconds it took."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    n = 80
    truth = [Sim3(1.0, so3_exp(np.array([0.0, a, 0.0])), np.array([2 * np.cos(a), 0.0, 2 * np.sin(a)]))
             for a in 2 * np.pi * np.arange(n) / n]

    def rel(a: int, b: int) -> Sim3:
        z = truth[a].inverse().compose(truth[b])
        return Sim3(z.s, so3_exp(rng.normal(size=3) * 0.05) @ z.R, z.t + rng.normal(size=3) * 0.02)

    odom = [Edge(b - d, b, rel(b - d, b)) for b in range(1, n) for d in (1, 2) if b - d >= 0]
    est = [truth[0]]
    for b in range(1, n):
        est.append(est[-1].compose(next(e.z for e in odom if e.a == b - 1 and e.b == b)))
    ids = list(range(n))
    params = GraphParams(sigma_rot_deg=0.5, sigma_trans=0.01, sigma_scale=0.01, huber=3.0)
    wrong = Edge(5, 40, rel(20, 40), kind="loop")
    solve(ids, est, odom + [Edge(0, n - 1, rel(0, n - 1), kind="loop"), wrong], params, fixed=0)
    many = [Edge(a, a + 30, rel(a, a + 30), kind="loop") for a in range(0, n - 30, 3)]
    solve(ids, est, odom + many, params, fixed=0)
    g = PoseGraph(params)  # the loop gate (loops.py) too
    for i in ids:
        g.add_node(i, est[i])
    g.loop_discrepancy(wrong, 35)
    return time.perf_counter() - t0


def solve(ids: list[int], poses: list[Sim3], edges: list[Edge], params: GraphParams,
          fixed: int | set[int] | list[int]) -> SolveResult:
    """Robust Gauss-Newton over the graph, the `fixed` node(s) held (at least one: the gauge). Returns the poses
    by id. From a start far from consistent (mean whitened squared residual above `params.chordal_above`, e.g. a
    drifted chain after a loop closes) it first tries the chordal initialisation and keeps it if it costs less.
    Stops when the update is below `params.tol` or, estimating the contraction from the last two updates, the
    remaining ones add up to less than a tenth of it (so the check costs no extra iteration)."""
    g = graph_setup(ids, poses, edges, fixed)
    if g is None:  # nothing to move
        return SolveResult(dict(zip(ids, poses)), 0, 0.0, 0.0)
    n, x, ia, ib, zinv, base_w, free = g.n, g.x, g.ia, g.ib, g.zinv, g.base_w, g.free
    sig = params.sig
    pat = LA.BlockPattern(ia, ib, free)
    col_of = pat.col_of

    def res(xx):
        return _edge_terms(xx, ia, ib, zinv, sig, terms=False)[0]

    r, terms = _edge_terms(x, ia, ib, zinv, sig)
    cost0 = float((base_w * (r ** 2).sum(1)).sum())
    first = (r, terms)  # residuals at the start of the first iteration (the cost check's)
    if cost0 > params.chordal_above * r.size:
        try:
            xc = _chordal(x, ia, ib, zinv, base_w, pat, free)
            rc = _edge_terms(xc, ia, ib, zinv, sig)
            if float((base_w * (rc[0] ** 2).sum(1)).sum()) < cost0:
                x, first = xc, rc
        except (np.linalg.LinAlgError, RuntimeError):  # a singular system: start from the estimate as given
            pass
    it = 0
    w = base_w.copy()
    robust = False
    lu, step, prev, r_end = None, np.inf, np.inf, None
    factorisations = 0
    for it in range(1, params.max_iterations + 1):
        r, terms = first if first is not None else _edge_terms(x, ia, ib, zinv, sig)
        first = None
        if robust:
            nrm = np.sqrt((r ** 2).sum(1))
            w = base_w * np.where(nrm <= params.huber, 1.0, params.huber / np.maximum(nrm, 1e-300))
        # Close to the minimum H hardly changes: keep the last factorisation (a chord step, still converging to
        # the same point because the gradient is exact; it needs no H) and refactor only after a large step.
        # Robust steps always refactor: their weights change every iteration (a wrong edge can keep them moving)
        if lu is None or step > REFACTOR_STEP or robust:
            try:
                lu, grad = _normal(pat, r, terms, w, sig)
            except (np.linalg.LinAlgError, RuntimeError):  # singular (non-finite input): keep what we have
                break
            factorisations += 1
        else:
            grad = pat.gradient(*_jt_times(terms, r * w[:, None], sig)).reshape(-1)
        delta = -lu.solve(grad)
        if not np.isfinite(delta).all():
            break
        D = np.zeros((n, 7))
        D[free] = delta.reshape(-1, 7)[col_of[free]]
        x = _retract(x, D)
        prev, step = step, float(np.abs(delta).max())
        theta = step / prev  # contraction of the updates: what is left is ~ step * theta / (1 - theta)
        rest = step * theta / (1.0 - theta) if prev < np.inf and theta < 0.5 else np.inf
        if step < params.tol or rest < 0.1 * params.tol:
            if robust:
                break
            # Plain least squares converged: down-weight edges that still disagree, if any do.
            r_end = res(x)
            nrm = np.sqrt((r_end ** 2).sum(1))
            if not (nrm > params.huber).any():
                break
            robust, step, r_end = True, np.inf, None
    r = r_end if r_end is not None else res(x)
    nrm = np.sqrt((r ** 2).sum(1))
    cost1 = float((base_w * (r ** 2).sum(1)).sum())
    down = np.flatnonzero(nrm > 2 * params.huber).tolist()
    out = dict(zip(ids, map(_sim3_of, x[0].tolist(), x[1], x[2])))
    return SolveResult(out, it, cost0, cost1, down, factorisations)


def solve_gtsam(ids: list[int], poses: list[Sim3], edges: list[Edge], params: GraphParams, fixed: int
                ) -> dict[int, Sim3]:
    """The same problem with gtsam (Levenberg-Marquardt, Huber-robust between factors), for bench/posegraph.py.
    gtsam's Similarity3(R, t, s) maps x -> s (R x + t), ours x -> s R x + t; its tangent is (w, u, lambda)."""
    import gtsam

    def to_g(x: Sim3):
        return gtsam.Similarity3(gtsam.Rot3(x.R), x.t / x.s, x.s)

    g = gtsam.NonlinearFactorGraph()
    init = gtsam.Values()
    for k, x in zip(ids, poses):
        init.insert(k, to_g(x))
    sig = params.sig
    g.add(gtsam.PriorFactorSimilarity3(fixed, to_g(poses[ids.index(fixed)]),
                                       gtsam.noiseModel.Isotropic.Sigma(7, 1e-6)))
    for e in edges:
        nm = gtsam.noiseModel.Diagonal.Sigmas(sig / np.sqrt(e.weight))
        nm = gtsam.noiseModel.Robust.Create(gtsam.noiseModel.mEstimator.Huber.Create(params.huber), nm)
        g.add(gtsam.BetweenFactorSimilarity3(e.a, e.b, to_g(e.z), nm))
    lm = gtsam.LevenbergMarquardtParams()
    lm.setMaxIterations(params.max_iterations)
    res = gtsam.LevenbergMarquardtOptimizer(g, init, lm).optimize()
    out = {}
    for k in ids:
        y = res.atSimilarity3(k)
        s = float(y.scale())
        out[k] = Sim3(s, y.rotation().matrix(), s * np.asarray(y.translation()))
    return out
