"""Sim(3) pose graph over a session's windows: nodes, relative-pose edges, a robust sparse solver. Pure numpy/scipy.

A node is one window: its Sim(3) from the window's own gauge (model output, arbitrary scale) to the world. An
edge (a, b, Z) says "gauge b -> gauge a is Z", i.e. S_b ≈ S_a ∘ Z. Odometry edges come from the frames two
windows share (context frames), loop edges from a verified loop window. Each gauge is normalised by the window's
median depth, so a translation residual is in units of the scene depth in every window (the model's per-window
scale does not weigh edges).

The solver is Gauss-Newton on a sparse normal matrix (scipy.sparse + SuperLU) with per-edge residual
r = [log R_E / sigma_rot, t_E / sigma_t, log s_E / sigma_s] of E = Z^-1 ∘ S_a^-1 ∘ S_b (normalised gauges),
analytic Jacobians for every edge at once, the normal matrix summed straight into a CSC pattern computed once per
solve (free nodes in a fill-reducing order of the node graph), the factorisation reused while steps are small,
and Huber weights per edge after a first plain least-squares pass (a wrong edge then pulls with bounded force;
loops that disagree with the odometry are also refused before they enter, see `loop_discrepancy`).
bench/posegraph.py compares it with the solver it replaced, with gtsam and with other factorisations of the same
steps (`solve(linear=...)`): an RCM-ordered banded Cholesky is no faster (a chain with loops has a band of ~17
nodes); qdldl's numeric refactorisations saved ~1/3 of a cold solve, too little to make it a dependency.

Over 400 lines because the Jacobians, the robust Gauss-Newton and its factorisation variants form one solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse.csgraph import connected_components, reverse_cuthill_mckee

from serve_app.recon.geometry import Sim3

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
    return (np.fromiter((x.s for x in sims), np.float64, len(sims)), np.array([x.R for x in sims], np.float64),
            np.array([x.t for x in sims], np.float64))


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


def _jr_inv(phi: np.ndarray) -> np.ndarray:
    """Inverse right Jacobian of SO(3) at rotation vectors (m, 3): Log(R Exp(w)) ≈ phi + Jr^-1(phi) w."""
    th = np.linalg.norm(phi, axis=-1)
    small = th < 1e-5
    ths = np.where(small, 1.0, th)
    c = np.where(small, 1.0 / 12.0, 1.0 / ths ** 2 - (1.0 + np.cos(ths)) / (2.0 * ths * np.sin(ths)))
    K = _hat(phi)
    return np.eye(3) + 0.5 * K + c[:, None, None] * (K @ K)


def _residuals_jac(xa, xb, zinv, sig):
    """Whitened residuals (m, 7) of E = Z^-1 ∘ A^-1 ∘ B and their analytic Jacobians (m, 7, 7) with respect to
    the `_retract` increments of A and B (columns: rotation vector, translation, log scale)."""
    f = _compose(_inverse(xa), xb)  # F = A^-1 ∘ B
    sE, RE, tE = _compose(zinv, f)
    phi = so3_log(RE)
    r = np.concatenate([phi, tE, np.log(sE)[:, None]], 1) / sig
    m = len(sE)
    jri = _jr_inv(phi)
    Jb = np.zeros((m, 7, 7))
    Jb[:, :3, :3] = jri  # E ∘ Exp(d): rotation Log(R_E Exp(w)), translation s_E R_E u, log scale + lambda
    Jb[:, 3:6, 3:6] = sE[:, None, None] * RE
    Jb[:, 6, 6] = 1.0
    # Z^-1 ∘ Exp(d)^-1 ∘ F: rotation R_E Exp(-R_F^T w); translation s_Zi R_Zi (t_F x w - u - lambda t_F)
    sZ, RZ, _ = zinv
    M = sZ[:, None, None] * RZ
    Ja = np.zeros((m, 7, 7))
    Ja[:, :3, :3] = -jri @ np.swapaxes(f[1], 1, 2)
    Ja[:, 3:6, :3] = M @ _hat(f[2])
    Ja[:, 3:6, 3:6] = -M
    Ja[:, 3:6, 6] = -np.einsum("nij,nj->ni", M, f[2])
    Ja[:, 6, 6] = -1.0
    return r, Ja / sig[None, :, None], Jb / sig[None, :, None]


REFACTOR_STEP = 0.03  # largest update (radians / depth units / log scale) after which H is factored afresh
BANDED_MAX_BLOCKS = 40  # "banded": block bandwidth (nodes) beyond which SuperLU is used instead


class _Banded:
    """H in a reverse Cuthill-McKee order of the free nodes, factored by LAPACK's banded Cholesky
    (scipy.linalg.cholesky_banded): for a chain of windows the band is a few nodes wide."""

    def __init__(self, H, perm: np.ndarray):
        Hp = H[perm][:, perm].tocoo()
        low = Hp.row >= Hp.col
        off = (Hp.row - Hp.col)[low]
        ab = np.zeros((int(off.max()) + 1, H.shape[0]))
        ab[off, Hp.col[low]] = Hp.data[low]
        self.c, self.perm = sla.cholesky_banded(ab, lower=True, check_finite=False), perm

    def solve(self, b: np.ndarray) -> np.ndarray:
        x = np.empty_like(b)
        x[self.perm] = sla.cho_solve_banded((self.c, True), b[self.perm], check_finite=False)
        return x


class _LDL:
    """qdldl (an optional package, for bench/posegraph.py): AMD ordering and symbolic analysis once, a numeric
    LDL^T per factorisation."""

    def __init__(self):
        self.s = None

    def factor(self, H) -> _LDL:
        import qdldl

        if self.s is None:
            self.s = qdldl.Solver(H)
        else:
            self.s.update(H)
        return self

    def solve(self, b: np.ndarray) -> np.ndarray:
        return self.s.solve(b)


def _rcm_perm(pattern) -> np.ndarray | None:
    """Scalar permutation of H putting the free nodes in reverse Cuthill-McKee order; None if the band it gives
    is wider than BANDED_MAX_BLOCKS nodes (a graph with long-range loops: SuperLU is cheaper)."""
    nf = pattern.nv // 7
    ok = (pattern.ga >= 0) & (pattern.gb >= 0)
    ga, gb = pattern.ga[ok], pattern.gb[ok]
    A = sp.coo_matrix((np.ones(len(ga)), (ga, gb)), shape=(nf, nf)).tocsr()
    order = reverse_cuthill_mckee(A + A.T, symmetric_mode=True)
    rank = np.empty(nf, np.int64)
    rank[order] = np.arange(nf)
    if len(ga) and int(np.abs(rank[ga] - rank[gb]).max()) > BANDED_MAX_BLOCKS:
        return None
    return (7 * order[:, None] + np.arange(7)).reshape(-1)


class _NormalPattern:
    """The sparsity of the (7F x 7F) normal matrix H of F free nodes, computed once per solve: where each edge's
    four 7x7 blocks and two 7-gradients land in H's CSC data, so an iteration sums them with one bincount. Free
    nodes are numbered in a fill-reducing order of the node graph (minimum degree on the 7x smaller node
    pattern), so SuperLU factors H in its natural order without re-ordering the big matrix every iteration."""

    def __init__(self, ia: np.ndarray, ib: np.ndarray, free: np.ndarray):
        n = len(free)
        nf = int(free.sum())
        fa, fb = free[ia], free[ib]
        # Node-level ordering among the free nodes.
        fidx = np.full(n, -1)
        fidx[free] = np.arange(nf)
        both = fa & fb
        pa, pb = fidx[ia[both]], fidx[ib[both]]
        A = sp.coo_matrix((np.ones(2 * len(pa) + nf), (np.r_[pa, pb, np.arange(nf)], np.r_[pb, pa, np.arange(nf)])),
                          shape=(nf, nf)).tocsc()
        if nf > 2:
            perm_c = spla.splu(A + sp.identity(nf, format="csc") * nf, permc_spec="MMD_AT_PLUS_A",
                               options={"SymmetricMode": True}).perm_c
            order = np.argsort(perm_c)  # order[k]: free node (fidx) in position k
        else:
            order = np.arange(nf)
        rank = np.empty(nf, np.int64)
        rank[order] = np.arange(nf)
        self.col_of = np.full(n, -1)
        self.col_of[free] = rank  # free node -> its block column in H
        self.nv = 7 * nf
        ca, cb = self.col_of[ia], self.col_of[ib]
        # Block contributions (edge, aa/ab/ba/bb) -> unique 7x7 blocks in block-CSC order (by column, then row).
        rowb = np.stack([ca, ca, cb, cb], 1)
        colb = np.stack([ca, cb, ca, cb], 1)
        self.keep = (rowb >= 0) & (colb >= 0)  # (m, 4)
        bkey = np.r_[colb[self.keep], np.arange(nf)].astype(np.int64) * nf + np.r_[rowb[self.keep], np.arange(nf)]
        ukey, slot = np.unique(bkey, return_inverse=True)
        brow, bcol = ukey % nf, ukey // nf
        per_col = np.bincount(bcol, minlength=nf)
        bptr = np.r_[0, np.cumsum(per_col)]
        k_in_col = np.arange(len(ukey)) - bptr[bcol]
        # Scalar CSC: column 7c + j holds, block by block, rows 7r + 0..6; block u's (i, j) entry sits at
        # 49 * bptr[c] + j * 7 * per_col[c] + 7 * k + i.
        e7 = np.arange(7)
        base = 49 * bptr[bcol] + 7 * k_in_col  # (u,)
        pos = base[:, None, None] + e7[None, :, None] + (e7[None, None, :] * 7 * per_col[bcol][:, None, None])
        # Where each entry of an edge's (14 x 14) [a b]^T [a b] product goes; blocks of held nodes to a dump slot.
        tgt = np.full((len(ia), 4, 7, 7), 49 * len(ukey), np.int64)
        tgt[self.keep] = pos[slot[: int(self.keep.sum())]]
        self.target = tgt.reshape(-1, 2, 2, 7, 7).transpose(0, 1, 3, 2, 4).reshape(-1)  # (edge, p, i, q, j) order
        self.nnz = 49 * len(ukey)
        self.diag_pos = pos[np.flatnonzero(brow == bcol)][:, e7, e7].reshape(-1)
        rows = np.broadcast_to(7 * brow[:, None, None] + e7[None, :, None], pos.shape)
        ind = np.empty(self.nnz, np.int32)
        ind[pos.reshape(-1)] = rows.reshape(-1)
        self.indices = ind
        self.indptr = np.r_[0, np.cumsum(np.repeat(7 * per_col, 7))].astype(np.int32)
        self.ga, self.gb = ca, cb

    def assemble(self, r, Ja, Jb, w):
        """(H in CSC, gradient) of sum_e w_e |r_e|^2 / 2 linearised."""
        J = np.concatenate([Ja, Jb], 2)  # (m, 7, 14): one batched product gives all four blocks
        wJ = J * w[:, None, None]
        JtJ = np.swapaxes(wJ, 1, 2) @ J
        data = np.bincount(self.target, JtJ.reshape(-1), minlength=self.nnz + 1)[:-1]
        data[self.diag_pos] += 1e-9  # a tiny ridge: H stays factorable along a gauge-free direction
        H = sp.csc_matrix((data, self.indices, self.indptr), shape=(self.nv, self.nv))
        gab = np.einsum("nji,nj->ni", wJ, r)  # (m, 14): gradient parts of a and b
        g = np.zeros((self.nv // 7 + 1, 7))  # row -1 collects fixed nodes' parts (dropped)
        np.add.at(g, self.ga, gab[:, :7])
        np.add.at(g, self.gb, gab[:, 7:])
        return H, g[:-1].reshape(-1)


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


def solve(ids: list[int], poses: list[Sim3], edges: list[Edge], params: GraphParams,
          fixed: int | set[int] | list[int], linear: str = "lu") -> SolveResult:
    """Robust Gauss-Newton over the graph, the `fixed` node(s) held (at least one: the gauge). Returns the poses
    by id. `linear`: the factorisation of the normal matrix H: "lu" SuperLU; "banded" LAPACK's banded Cholesky in
    a reverse Cuthill-McKee order (SuperLU when the band is wide); "ldl" qdldl (optional package). Same steps,
    so the same solution to rounding; bench/posegraph.py measures them."""
    g = graph_setup(ids, poses, edges, fixed)
    if g is None:  # nothing to move
        return SolveResult(dict(zip(ids, poses)), 0, 0.0, 0.0)
    n, x, ia, ib, zinv, base_w, free = g.n, g.x, g.ia, g.ib, g.zinv, g.base_w, g.free
    sig = params.sig
    pattern = _NormalPattern(ia, ib, free)
    col_of = pattern.col_of

    def sel(xx, idx):
        return xx[0][idx], xx[1][idx], xx[2][idx]

    def res(xx):
        return _residuals(sel(xx, ia), sel(xx, ib), zinv, sig)

    r = res(x)
    cost0 = float((base_w * (r ** 2).sum(1)).sum())
    it = 0
    w = base_w.copy()
    robust = False
    lu, step = None, np.inf
    factorisations = 0
    perm = _rcm_perm(pattern) if linear == "banded" else None
    ldl = _LDL() if linear == "ldl" else None
    for it in range(1, params.max_iterations + 1):
        r, Ja, Jb = _residuals_jac(sel(x, ia), sel(x, ib), zinv, sig)
        if robust:
            nrm = np.sqrt((r ** 2).sum(1))
            w = base_w * np.where(nrm <= params.huber, 1.0, params.huber / np.maximum(nrm, 1e-300))
        H, g = pattern.assemble(r, Ja, Jb, w)
        # Close to the minimum H hardly changes: keep the last factorisation (a chord step, still converging to
        # the same point because g is exact) and refactor only after a large step. Robust steps always refactor:
        # their weights change every iteration (and a wrong edge can keep them from settling).
        if lu is None or step > REFACTOR_STEP or robust:
            if perm is not None:
                lu = _Banded(H, perm)
            elif ldl is not None:
                lu = ldl.factor(H)
            else:
                lu = spla.splu(H, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
            factorisations += 1
        delta = -lu.solve(g)
        if not np.isfinite(delta).all():
            break
        D = np.zeros((n, 7))
        D[free] = delta.reshape(-1, 7)[col_of[free]]
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
