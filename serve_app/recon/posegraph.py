"""Sim(3) pose graph over a session's windows: nodes, relative-pose edges, a robust sparse solver. Pure numpy/scipy.

A node is one window: its Sim(3) from the window's own gauge (model output, arbitrary scale) to the world. An
edge (a, b, Z) says "gauge b -> gauge a is Z", i.e. S_b ≈ S_a ∘ Z. Odometry edges come from the frames two
windows share (context frames), loop edges from a verified loop window. Each gauge is normalised by the window's
median depth, so a translation residual is in units of the scene depth in every window (the model's per-window
scale does not weigh edges).

The solver is Gauss-Newton with per-edge residual r = [log R_E / sigma_rot, t_E / sigma_t, log s_E / sigma_s]
of E = Z^-1 ∘ S_a^-1 ∘ S_b (normalised gauges), analytic Jacobians for every edge at once, and Huber weights per
edge after a first plain least-squares pass (a wrong edge then pulls with bounded force; loops that disagree with
the odometry are also refused before they enter, see `loop_discrepancy`). What makes a 1,000-window solve 1.6-2.5x
faster than before (bench/posegraph.py): a start far from consistent (a drifted chain after a loop closes) is
first replaced by a chordal initialisation (three linear solves: rotations, log scales, translations), after
which Gauss-Newton needs two factorisations instead of four; the normal matrix is summed at node level into a
block pattern and factored by block cyclic reduction along the chain, the loops' super-blocks left to a small
SuperLU system (posegraph_linalg.py); chord steps (the last factorisation kept while steps are small) need only
the gradient, applied from the residuals' terms without forming the Jacobians (`_jt_times`); and iterations
stop once the contraction of the updates says the rest is below a tenth of `tol`. bench/posegraph.py compares it
with the previous solver (SuperLU on the whole matrix, four factorisations from a drifted start) and gtsam.

Over 400 lines because the Jacobians, the chordal start and the robust Gauss-Newton form one solver (the linear
algebra is in posegraph_linalg.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from serve_app.recon.geometry import Sim3
from serve_app.recon.posegraph_linalg import BlockPattern

# --- batched Sim(3) helpers: (s (n,), R (n, 3, 3), t (n, 3)) ------------------------------------------------


def _hat(w: np.ndarray) -> np.ndarray:
    K = np.zeros(w.shape[:-1] + (3, 3))
    K[..., 0, 1], K[..., 0, 2] = -w[..., 2], w[..., 1]
    K[..., 1, 0], K[..., 1, 2] = w[..., 2], -w[..., 0]
    K[..., 2, 0], K[..., 2, 1] = -w[..., 1], w[..., 0]
    return K


def so3_exp(w: np.ndarray) -> np.ndarray:
    """Rotation vectors (..., 3) -> rotation matrices (..., 3, 3) (Rodrigues)."""
    w = np.asarray(w, np.float64)
    th = np.linalg.norm(w, axis=-1)[..., None, None]
    K = _hat(w)
    small = th < 1e-8
    ths = np.where(small, 1.0, th)
    a = np.where(small, 1.0, np.sin(ths) / ths)
    b = np.where(small, 0.5, (1.0 - np.cos(ths)) / ths ** 2)
    return np.eye(3) + a * K + b * (K @ K)


def so3_log(R: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> rotation vectors (..., 3) (angles below ~179.9 degrees)."""
    R = np.asarray(R, np.float64)
    c = np.clip((np.trace(R, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    th = np.arccos(c)
    v = np.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    s = np.sin(th)
    f = np.where(th < 1e-6, 0.5, th / (2.0 * np.where(th < 1e-6, 1.0, s)))
    return v * f[..., None]


def _compose(a, b):
    sa, Ra, ta = a
    sb, Rb, tb = b
    return sa * sb, Ra @ Rb, sa[:, None] * np.einsum("nij,nj->ni", Ra, tb) + ta


def _inverse(a):
    s, R, t = a
    Rt = np.swapaxes(R, 1, 2)
    return 1.0 / s, Rt, -np.einsum("nij,nj->ni", Rt, t) / s[:, None]


def _stack(sims: list[Sim3]):
    n = len(sims)  # concatenate: a third cheaper than np.array on a list of small arrays
    if not n:
        return np.zeros(0), np.zeros((0, 3, 3)), np.zeros((0, 3))
    return (np.fromiter((x.s for x in sims), np.float64, n),
            np.concatenate([x.R for x in sims]).astype(np.float64, copy=False).reshape(n, 3, 3),
            np.concatenate([x.t for x in sims]).astype(np.float64, copy=False).reshape(n, 3))


def _sim3_of(s: float, R: np.ndarray, t: np.ndarray) -> Sim3:
    """Sim3 from a solver row without __post_init__'s conversions (float, float64 (3, 3) and (3,) already): a
    1,000-node solve builds 1,000 of them."""
    x = object.__new__(Sim3)
    x.s, x.R, x.t = s, R, t
    return x


def _retract(x, d):
    """x ∘ Exp(d) for d (n, 7) = (rotation vector, translation, log scale)."""
    s, R, t = x
    return s * np.exp(d[:, 6]), R @ so3_exp(d[:, :3]), s[:, None] * np.einsum("nij,nj->ni", R, d[:, 3:6]) + t


def _residuals(xa, xb, zinv, sig) -> np.ndarray:
    """(m, 7) whitened residuals of E = Z^-1 ∘ A^-1 ∘ B."""
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


def _jr_coef(phi: np.ndarray) -> np.ndarray:
    """c(|phi|) of Jr^-1(phi) = I + K / 2 + c K^2, K = hat(phi)."""
    th = np.linalg.norm(phi, axis=-1)
    small = th < 1e-5
    ths = np.where(small, 1.0, th)
    return np.where(small, 1.0 / 12.0, 1.0 / ths ** 2 - (1.0 + np.cos(ths)) / (2.0 * ths * np.sin(ths)))


def _jr_inv(phi: np.ndarray) -> np.ndarray:
    """Inverse right Jacobian of SO(3) at rotation vectors (m, 3): Log(R Exp(w)) ≈ phi + Jr^-1(phi) w."""
    K = _hat(phi)
    return np.eye(3) + 0.5 * K + _jr_coef(phi)[:, None, None] * (K @ K)


def _residuals_jac(xa, xb, zinv, sig):
    """Whitened residuals (m, 7) of E = Z^-1 ∘ A^-1 ∘ B and their analytic Jacobians (m, 7, 7) with respect to
    the `_retract` increments of A and B (columns: rotation vector, translation, log scale). Written out (F and
    E composed in place, rows whitened as they are filled): a solve evaluates it 2-3 times for all edges."""
    r, terms = _edge_terms(xa, xb, zinv, sig)
    return (r, *_jacobians(terms, sig))


def _edge_terms(xa, xb, zinv, sig):
    """The residuals of `_residuals_jac` and what its Jacobians reuse: a solve's cost checks take only these,
    and the first iteration adds the Jacobians without composing the edges again."""
    sa, Ra, ta = xa
    sb, Rb, tb = xb
    sZ, RZ, tZ = zinv
    RaT = np.swapaxes(Ra, 1, 2)
    RF = RaT @ Rb  # F = A^-1 ∘ B
    tF = np.einsum("nij,nj->ni", RaT, tb - ta) / sa[:, None]
    sE, RE = sZ * sb / sa, RZ @ RF  # E = Z^-1 ∘ F
    M = sZ[:, None, None] * RZ
    MtF = np.einsum("nij,nj->ni", M, tF)
    phi = so3_log(RE)
    r = np.empty((len(sE), 7))
    r[:, :3] = phi
    r[:, 3:6] = MtF + tZ
    r[:, 6] = np.log(sE)
    r *= 1.0 / sig
    return r, (phi, RF, tF, sE, RE, M, MtF)


def _jacobians(terms, sig):
    phi, RF, tF, sE, RE, M, MtF = terms
    m = len(sE)
    isig = 1.0 / sig
    jri = _jr_inv(phi)
    ir, it, isc = isig[:3, None], isig[3:6, None], isig[6]
    Jb = np.zeros((m, 7, 7))
    Jb[:, :3, :3] = jri * ir  # E ∘ Exp(d): rotation Log(R_E Exp(w)), translation s_E R_E u, log scale + lambda
    Jb[:, 3:6, 3:6] = sE[:, None, None] * RE * it
    Jb[:, 6, 6] = isc
    # Z^-1 ∘ Exp(d)^-1 ∘ F: rotation R_E Exp(-R_F^T w); translation s_Zi R_Zi (t_F x w - u - lambda t_F)
    Ja = np.zeros((m, 7, 7))
    Ja[:, :3, :3] = (jri @ np.swapaxes(RF, 1, 2)) * -ir
    Ja[:, 3:6, :3] = (M @ _hat(tF)) * it
    Ja[:, 3:6, 3:6] = M * -it
    Ja[:, 3:6, 6] = MtF * -isig[3:6]
    Ja[:, 6, 6] = -isc
    return Ja, Jb


def _jt_times(terms, v, sig):
    """(Ja^T v, Jb^T v) per edge for v (m, 7), from `_edge_terms`'s terms without forming the Jacobians (a
    chord step needs only the gradient): the blocks of `_jacobians` applied as matrix-vector products and cross
    products (hat(a)^T u = -a x u; Jr^-1(phi)^T u = u - phi x u / 2 + c phi x (phi x u))."""
    phi, RF, tF, sE, RE, M, MtF = terms
    sr, st, ss = sig[0], sig[3], sig[6]
    vr, vt, vs = v[:, :3], v[:, 3:6], v[:, 6]
    jv = vr - 0.5 * _cross(phi, vr) + _jr_coef(phi)[:, None] * _cross(phi, _cross(phi, vr))  # Jr^-1^T v_r
    Mv = np.einsum("nji,nj->ni", M, vt)  # M^T v_t
    ga, gb = np.empty_like(v), np.empty_like(v)
    gb[:, :3] = jv / sr
    gb[:, 3:6] = np.einsum("nji,nj->ni", RE, vt) * (sE / st)[:, None]
    gb[:, 6] = vs / ss
    ga[:, :3] = -np.einsum("nij,nj->ni", RF, jv) / sr - _cross(tF, Mv) / st
    ga[:, 3:6] = -Mv / st
    ga[:, 6] = -np.einsum("ni,ni->n", MtF, vt) / st - vs / ss
    return ga, gb


REFACTOR_STEP = 0.03  # largest update (radians / depth units / log scale) after which H is factored afresh


def _normal(pat: BlockPattern, r, Ja, Jb, w):
    """(factorisation of H, gradient) of sum_e w_e |r_e|^2 / 2 linearised."""
    wJa, wJb = Ja * w[:, None, None], Jb * w[:, None, None]
    m = len(w)
    c = np.empty((4, m, 7, 7))
    np.matmul(np.swapaxes(Ja, 1, 2), wJa, out=c[0])
    np.matmul(np.swapaxes(Ja, 1, 2), wJb, out=c[1])
    c[2] = np.swapaxes(c[1], 1, 2)
    np.matmul(np.swapaxes(Jb, 1, 2), wJb, out=c[3])
    # a tiny ridge: H stays factorable along a gauge-free direction
    return pat.factor(pat.blocks(c.reshape(4 * m, 49), ridge=1e-9), 7), _grad(pat, r, Ja, Jb, w)


def _grad(pat: BlockPattern, r, Ja, Jb, w) -> np.ndarray:
    wr = r * w[:, None]
    return pat.gradient(np.einsum("nji,nj->ni", Ja, wr), np.einsum("nji,nj->ni", Jb, wr)).reshape(-1)


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
    edges = [e for e in edges if e.a in pos and e.b in pos]
    if not edges or n < 2:
        return None
    x = _stack(poses)
    ia = np.array([pos[e.a] for e in edges])
    ib = np.array([pos[e.b] for e in edges])
    zinv = _inverse(_stack([e.z for e in edges]))
    base_w = np.array([e.weight for e in edges], np.float64)
    m = len(edges)
    free = np.ones(n, bool)
    for k in ([fixed] if isinstance(fixed, int) else fixed):
        if k in pos:
            free[pos[k]] = False
    if free.all() or not free.any():
        raise ValueError("solve needs at least one fixed and one free node")
    # A part of the graph not connected to a fixed node (e.g. windows whose edges a session takeover lost) has
    # no gauge: hold its oldest node too, so it moves rigidly with nothing instead of drifting off.
    ncomp, comp = connected_components(sp.coo_matrix((np.ones(m), (ia, ib)), shape=(n, n)), directed=False)
    for c in range(ncomp):
        members = np.flatnonzero(comp == c)
        if free[members].all():
            free[members[0]] = False
    if not free.any():
        return None
    return GraphSetup(n, x, ia, ib, zinv, base_w, m, free)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cross products of (n, 3) arrays (np.cross's axis handling costs more than the arithmetic)."""
    out = np.empty_like(a)
    out[:, 0] = a[:, 1] * b[:, 2] - a[:, 2] * b[:, 1]
    out[:, 1] = a[:, 2] * b[:, 0] - a[:, 0] * b[:, 2]
    out[:, 2] = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    return out


def _polar(X: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Nearest rotations to near-orthogonal 3x3 matrices (n, 3, 3): scaled Newton iterations of the polar
    decomposition, X <- (g X + X^-T / g) / 2 with X^-T from cross products (batched SVDs cost more). A matrix
    that is no near-rotation (det <= 0) gives its fallback."""
    X = X.copy()
    bad = np.zeros(len(X), bool)
    for _ in range(4):  # quadratic convergence from near-orthogonal: 1e-2 -> 1e-4 -> 1e-8 -> 1e-16
        r0, r1, r2 = X[:, 0], X[:, 1], X[:, 2]
        cof = np.stack([_cross(r1, r2), _cross(r2, r0), _cross(r0, r1)], 1)  # det(X) X^-T
        det = np.einsum("ni,ni->n", r0, cof[:, 0])
        bad |= det <= 1e-12
        det[bad] = 1.0
        g = np.cbrt(1.0 / det)[:, None, None]
        X = 0.5 * (g * X + cof / (det[:, None, None] * g))
    X[bad] = fallback[bad]
    return X


def _chordal(x, ia, ib, zinv, w, pat: BlockPattern, free: np.ndarray):
    """A starting point from three linear least-squares problems on the node graph (a chordal relaxation, as in
    rotation averaging): rotations first (R_b = R_a R_Z for all edges at once over the 3x3 matrices, then each
    projected onto SO(3)), then log scales (log s_b = log s_a + log s_Z), then translations given both
    (t_b = t_a + s_a R_a t_Z). Each is a sparse solve in the pattern's block layout (3x3 blocks, then 1x1), far
    cheaper than a Gauss-Newton step on the 7x7 blocks, and from a drifted chain it lands next to the optimum:
    Gauss-Newton then needs one factorisation instead of four."""
    s, R, t = x
    zs, zR, zt = _inverse(zinv)  # the measurements Z themselves
    m, nf = len(w), pat.nf
    cf = pat.col_of[free]
    ww = w[:, None, None]
    # Rotations: unknowns Q = R^T, residual Q_b - Z^T Q_a (three independent columns sharing one matrix).
    c = np.empty((4, m, 3, 3))
    c[0] = c[3] = ww * np.eye(3)
    c[1] = -ww * zR
    c[2] = np.swapaxes(c[1], 1, 2)
    Q = np.swapaxes(R, 1, 2)
    wr = ww * (Q[ib] - np.swapaxes(zR, 1, 2) @ Q[ia])
    g = pat.gradient(-(zR @ wr).reshape(m, 9), wr.reshape(m, 9))  # (F, 9): per node a 3 x 3 (rows x columns)
    dQ = pat.factor(pat.blocks(c.reshape(4 * m, 9), ridge=1e-9), 3).solve(-g.reshape(3 * nf, 3))
    R = R.copy()
    R[free] = np.swapaxes(_polar(Q[free] + dQ.reshape(nf, 3, 3)[cf], R[free].swapaxes(1, 2)), 1, 2)
    # Log scales, then translations: the graph Laplacian (1x1 blocks) with one and three right-hand sides.
    lu = pat.factor(pat.blocks(np.r_[w, -w, -w, w][:, None], ridge=1e-9), 1)
    ls = np.log(s)
    wr = w * (ls[ib] - ls[ia] - np.log(zs))
    ls = ls.copy()
    ls[free] += lu.solve(-pat.gradient(-wr[:, None], wr[:, None]).reshape(-1))[cf]
    s = np.exp(ls)
    wr = w[:, None] * (t[ib] - t[ia] - s[ia, None] * np.einsum("nij,nj->ni", R[ia], zt))
    t = t.copy()
    t[free] += lu.solve(-pat.gradient(-wr, wr))[cf]
    return s, R, t


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
    pat = BlockPattern(ia, ib, free)
    col_of = pat.col_of

    def sel(xx, idx):
        return xx[0][idx], xx[1][idx], xx[2][idx]

    def res(xx):
        return _edge_terms(sel(xx, ia), sel(xx, ib), zinv, sig)[0]

    r, terms = _edge_terms(sel(x, ia), sel(x, ib), zinv, sig)
    cost0 = float((base_w * (r ** 2).sum(1)).sum())
    first = (r, terms)  # residuals at the start of the first iteration (the cost check's)
    if cost0 > params.chordal_above * r.size:
        try:
            xc = _chordal(x, ia, ib, zinv, base_w, pat, free)
            rc = _edge_terms(sel(xc, ia), sel(xc, ib), zinv, sig)
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
        r, terms = first if first is not None else _edge_terms(sel(x, ia), sel(x, ib), zinv, sig)
        first = None
        if robust:
            nrm = np.sqrt((r ** 2).sum(1))
            w = base_w * np.where(nrm <= params.huber, 1.0, params.huber / np.maximum(nrm, 1e-300))
        # Close to the minimum H hardly changes: keep the last factorisation (a chord step, still converging to
        # the same point because the gradient is exact; it needs no H) and refactor only after a large step.
        # Robust steps always refactor: their weights change every iteration (a wrong edge can keep them moving)
        if lu is None or step > REFACTOR_STEP or robust:
            try:
                lu, grad = _normal(pat, r, *_jacobians(terms, sig), w)
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
