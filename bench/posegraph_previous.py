"""The pose-graph solver that serve_app/recon/posegraph.py had before issue 16's 50 ms work, kept only here as the
yardstick of bench/posegraph.py (same residuals, Jacobians and robust steps; no chordal start; SuperLU on the
whole 7F x 7F normal matrix, re-factored after every step above REFACTOR_STEP, four times from a drifted chain)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from serve_app.recon.geometry import Sim3
from serve_app.recon.posegraph import (
    Edge,
    GraphParams,
    SolveResult,
    _residuals,
    _residuals_jac,
    _retract,
    _sim3_of,
    graph_setup,
)

REFACTOR_STEP = 0.03


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



def solve_previous(ids: list[int], poses: list[Sim3], edges: list[Edge], params: GraphParams,
                   fixed: int | set[int] | list[int]) -> SolveResult:
    """The solver before the chordal start and the chain factorisation: Gauss-Newton from the given start,
    SuperLU on the whole normal matrix (node-level minimum-degree order), chord steps below REFACTOR_STEP."""
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
