"""The pose graph's linear algebra: the block pattern of its normal matrices and their factorisation.

A session's windows form a chain (odometry edges to the previous one or two windows) with a few long edges
(loops). `BlockPattern` computes once per solve, at node level, where each edge's four blocks land, and sums
them with one sparse product. `ChainCholesky` factors such a matrix by block cyclic reduction: the nodes in
chain order are grouped into super-blocks of g nodes (g: the odometry reach), so odometry couples only
neighbouring super-blocks; the super-blocks no long edge touches are eliminated level by level, every other one
of each run at once (batched numpy on (k, B, B) arrays, ~log2(run) levels), which leaves a small sparse system
over the super-blocks the loops touch (SuperLU). For 1,000 nodes and 20 loops that is ~2x cheaper than SuperLU
on the whole 7,000 x 7,000 matrix (bench/posegraph.py), whose small supernodes keep it at a fraction of the
machine's speed. A graph whose long edges touch more than a quarter of the super-blocks (many loops), or a small
one, is factored by SuperLU in a fill-reducing node order instead. tests/recon/test_posegraph_linalg.py checks
both against dense numpy.

Measured and not taken (bench/README.md): LAPACK's banded Cholesky (a band of ~17 nodes in RCM order: slower),
qdldl (a third less than SuperLU), CHOLMOD through cvxopt (a faster numeric factorisation, but building its
matrix and the symbolic analysis per solve cost as much; a 65 MB wheel), cholespy (analysis and factorisation
in one call) and scikit-sparse (no wheel on PyPI).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

MAX_REACH = 4  # odometry edges span at most this many nodes (chain positions) to be grouped into super-blocks
MAX_LOOP_SHARE = 0.25  # super-blocks touched by long edges above which SuperLU factors the whole matrix
MIN_CHAIN_NODES = 64  # below this many free nodes SuperLU is as cheap as the levels' numpy overhead


def _superlu(A):
    return spla.splu(A, permc_spec="NATURAL", diag_pivot_thresh=0.0, options={"SymmetricMode": True})


def _columns(rows: np.ndarray, cols: np.ndarray, n: int, m: int):
    """The n x m 0/1 matrix with a one at (rows[i], cols[i]), each column at most once (cols increasing)."""
    return sp.csc_matrix((np.ones(len(rows)), rows, np.r_[0, np.cumsum(np.bincount(cols, minlength=m))]),
                         shape=(n, m))


class BlockPattern:
    """The block sparsity of a symmetric matrix over F free nodes summed from per-edge blocks (an edge (a, b)
    gives blocks aa, ab, ba, bb; held nodes have no rows). Block columns are the free nodes in chain order
    (their order in `free`) when the chain factorisation applies, else in a minimum-degree order of the node
    graph. `blocks(contrib)` sums the edges' blocks (one sparse product with `scatter`); `factor(blocks, bs)`
    factors the matrix they form; `gradient` sums per-edge vectors per node."""

    def __init__(self, ia: np.ndarray, ib: np.ndarray, free: np.ndarray):
        n, m = len(free), len(ia)
        nf = int(free.sum())
        chain_pos = np.full(n, -1)
        chain_pos[free] = np.arange(nf)
        pa, pb = chain_pos[ia], chain_pos[ib]
        both = (pa >= 0) & (pb >= 0)
        self.nf = nf
        self.chain = _ChainPlan.make(pa[both], pb[both], nf)
        if self.chain is not None:
            rank = np.arange(nf)
        elif nf > 2:  # node-level minimum degree (SuperLU's MMD on A + A^T of the node graph)
            A = sp.csc_matrix((np.ones(2 * int(both.sum()) + nf), (np.r_[pa[both], pb[both], np.arange(nf)],
                                                                   np.r_[pb[both], pa[both], np.arange(nf)])),
                              shape=(nf, nf))
            rank = spla.splu(A + sp.identity(nf, format="csc") * nf, permc_spec="MMD_AT_PLUS_A",
                             options={"SymmetricMode": True}).perm_c  # perm_c[i]: the position of free node i
        else:
            rank = np.arange(nf)
        self.col_of = np.full(n, -1)
        self.col_of[free] = rank  # node -> its block column (-1: held)
        ca, cb = self.col_of[ia], self.col_of[ib]
        # Contribution k * m + e (k: aa, ab, ba, bb of edge e) -> its block, blocks in row-major (BSR) order.
        rowb, colb = np.r_[ca, ca, cb, cb], np.r_[ca, cb, ca, cb]
        ok = np.flatnonzero((rowb >= 0) & (colb >= 0))
        key = np.r_[rowb[ok] * nf + colb[ok], np.arange(nf) * (nf + 1)]  # every diagonal block, edge or not
        ukey, slot = np.unique(key, return_inverse=True)
        self.nb = len(ukey)
        self.brow, self.bcol = ukey // nf, ukey % nf
        # One entry per contribution column (none for a held node's): built as CSC directly, no sort.
        self.scatter = _columns(slot[: len(ok)], ok, self.nb + 1, 4 * m)
        self.diag = slot[len(ok):]  # block of each free node's diagonal, in column order
        self.bindptr = np.r_[0, np.cumsum(np.bincount(self.brow, minlength=nf))].astype(np.int32)
        g = np.r_[ca, cb]  # gradient parts (a of every edge, then b) -> their node's block row
        okg = np.flatnonzero(g >= 0)
        self.gscatter = _columns(g[okg], okg, nf, 2 * m)
        self._csc: dict[int, tuple] = {}

    def blocks(self, contrib: np.ndarray, ridge: float = 0.0) -> np.ndarray:
        """Per-edge blocks contrib (4 m, bs * bs), [aa; ab; ba; bb], summed: (nb + 1, bs * bs) (the last row
        zero), plus ridge * I on the diagonal blocks."""
        out = self.scatter @ contrib  # a last, zero row: what the chain factorisation reads for a missing block
        if ridge:
            bs = math.isqrt(contrib.shape[1])
            out[self.diag] += ridge * np.eye(bs).reshape(-1)
        return out

    def csc(self, blocks: np.ndarray, bs: int):
        """The matrix the blocks form, in CSC (the CSR of a symmetric matrix is its CSC): a gather from an index
        layout made once per block size by a BSR -> CSR conversion of the blocks' own positions."""
        if bs not in self._csc:
            idx = np.arange(self.nb * bs * bs, dtype=np.float64).reshape(self.nb, bs, bs)
            A = sp.bsr_matrix((idx, self.bcol.astype(np.int32), self.bindptr),
                              shape=(self.nf * bs, self.nf * bs)).tocsr()
            self._csc[bs] = (A.data.astype(np.int64), A.indices, A.indptr)
        gather, indices, indptr = self._csc[bs]
        n = self.nf * bs
        return sp.csc_matrix((blocks[: self.nb].reshape(-1)[gather], indices, indptr), shape=(n, n))

    def factor(self, blocks: np.ndarray, bs: int):
        """A factorisation (`.solve(b)`, b (F * bs,) or (F * bs, k)) of the SPD matrix the blocks form."""
        if self.chain is not None and bs > 1:
            return ChainCholesky(self.chain, self, blocks, bs)
        if self.chain is not None:  # 1x1 blocks: SuperLU's own ordering is cheaper than the levels
            return spla.splu(self.csc(blocks, bs), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                             options={"SymmetricMode": True})
        return _superlu(self.csc(blocks, bs))

    def gradient(self, ga: np.ndarray, gb: np.ndarray) -> np.ndarray:
        """Per-edge parts of a and b (m, k) summed per free node: (F, k) in block-column order."""
        return self.gscatter @ np.concatenate([ga, gb])


class _ChainPlan:
    """The elimination schedule of `ChainCholesky` for one node graph: super-blocks of g chain positions, the
    ones long edges touch (kept to the end), and per level the eliminated super-blocks with their neighbours."""

    def __init__(self, g: int, P: int, keep: np.ndarray, long_pairs: np.ndarray):
        self.g, self.P = g, P
        self.long_pairs = long_pairs  # (k, 2) super-block pairs (p < q, not neighbours) coupled by long edges
        # Two dummy super-blocks (P, P + 1) close the chain at both ends: every eliminated block has neighbours.
        seq = np.r_[P, np.arange(P), P + 1]
        kept = np.r_[keep, True, True]
        self.levels = []
        while True:
            elim = ~kept[seq]
            if not elim.any():
                break
            i = np.arange(len(seq))
            start = elim & ~np.r_[False, elim[:-1]]
            run_start = np.maximum.accumulate(np.where(start, i, 0))
            pick = elim & ((i - run_start) % 2 == 0)  # every other block of each run: never two neighbours
            ip = np.flatnonzero(pick)
            rest = np.flatnonzero(~pick)
            gap = np.diff(rest) == 2  # new neighbours across an eliminated block (their new coupling)
            self.levels.append((seq[ip], seq[ip - 1], seq[ip + 1], ip, rest[:-1][~gap], gap))
            seq = seq[rest]
        self.reduced = seq[1:-1]  # the super-blocks left: those long edges touch, in chain order
        self._layout: tuple | None = None  # for the one pattern this plan belongs to
        self._reduced: dict[int, tuple] = {}
        self._slots: list | None = None

    def layout(self, pat: BlockPattern):
        """Where the pattern's node blocks go (the upper ones off the diagonal): block indices into D, C and L
        stored block-major ((super-block, row node, column node) -> one bs x bs block), with the blocks' own
        indices: (D index, source, C index, source, L index, source)."""
        if self._layout is None:
            g, P = self.g, self.P
            u, v = pat.brow, pat.bcol
            pu, pv, ou, ov = u // g, v // g, u % g, v % g
            inner = ou * g + ov
            on, nb, far = np.flatnonzero(pu == pv), np.flatnonzero(pv == pu + 1), np.flatnonzero(pv > pu + 1)
            lp = self.long_pairs
            li = np.searchsorted(lp[:, 0] * (P + 2) + lp[:, 1], pu[far] * (P + 2) + pv[far])
            self._layout = (pu[on] * g * g + inner[on], on, (pu[nb] + 1) * g * g + inner[nb], nb,
                            li * g * g + inner[far], far)
        return self._layout

    def place(self, pat: BlockPattern, blocks: np.ndarray, bs: int):
        """D (P + 2, B, B), C (P + 1, B, B) and L (long pairs, B, B) from the summed blocks (nb + 1, bs * bs, the
        last row zero): one gather of whole node blocks each (block-level indices, made once per plan; far
        cheaper to build than per-scalar ones), then a transpose to B x B."""
        g = self.g
        if self._slots is None:
            di, dsrc, ci, csrc, li, lsrc = self.layout(pat)
            self._slots = []
            for count, idx, src in ((self.P + 2, di, dsrc), (self.P + 1, ci, csrc),
                                    (len(self.long_pairs), li, lsrc)):
                slot = np.full(count * g * g, pat.nb)  # no block there: the zero row
                slot[idx] = src
                self._slots.append((count, slot))
        return [blocks[slot].reshape(count, g, g, bs, bs).transpose(0, 1, 3, 2, 4).reshape(count, g * bs, g * bs)
                for count, slot in self._slots]

    def reduced_layout(self, B: int):
        """The CSC structure of the system left over the kept super-blocks, from its blocks [their diagonals,
        the couplings of neighbours in the kept order, the long couplings, then the transposes of the last two]:
        `sumup` adds blocks that land on the same place (a long coupling between kept neighbours), `gather` lays
        the summed blocks out as CSC data (a BSR -> CSR conversion of their positions, made once)."""
        if B not in self._reduced:
            k = len(self.reduced)
            at = np.full(self.P + 2, -1)
            at[self.reduced] = np.arange(k)
            rows = np.r_[np.arange(k), np.arange(k - 1), at[self.long_pairs[:, 0]]]
            cols = np.r_[np.arange(k), np.arange(1, k), at[self.long_pairs[:, 1]]]
            rows, cols = np.r_[rows, cols[k:]], np.r_[cols, rows[k:]]
            ukey, inv = np.unique(rows * k + cols, return_inverse=True)  # row-major: BSR order
            sumup = sp.csr_matrix((np.ones(len(inv)), (inv, np.arange(len(inv)))), shape=(len(ukey), len(inv)))
            idx = np.arange(len(ukey) * B * B, dtype=np.float64).reshape(-1, B, B)
            bptr = np.r_[0, np.cumsum(np.bincount(ukey // k, minlength=k))]
            A = sp.bsr_matrix((idx, ukey % k, bptr), shape=(k * B, k * B)).tocsr()
            self._reduced[B] = (sumup, A.data.astype(np.int64), A.indices, A.indptr)
        return self._reduced[B]

    @classmethod
    def make(cls, pa: np.ndarray, pb: np.ndarray, nf: int) -> _ChainPlan | None:
        """The plan for edges between chain positions pa, pb, or None if the graph is not a chain with a few
        long edges."""
        if nf < MIN_CHAIN_NODES or not len(pa):
            return None
        d = np.abs(pa - pb)
        short = d[d <= MAX_REACH]
        g = int(short.max()) if len(short) else 1
        P = -(-nf // g)
        sa, sb = pa // g, pb // g
        lo, hi = np.minimum(sa, sb), np.maximum(sa, sb)
        far = hi - lo > 1
        keep = np.zeros(P, bool)
        keep[lo[far]] = keep[hi[far]] = True
        if keep.sum() > MAX_LOOP_SHARE * P:
            return None
        return cls(g, P, keep, np.unique(np.stack([lo[far], hi[far]], 1), axis=0))


class ChainCholesky:
    """Block cyclic reduction of an SPD matrix given as node blocks in chain order (see the module docstring).
    Super-block size B = g * bs; the last super-block is padded with identity rows."""

    def __init__(self, plan: _ChainPlan, pat: BlockPattern, blocks: np.ndarray, bs: int):
        g, P = plan.g, plan.P
        B = g * bs
        self.plan, self.B, self.n = plan, B, pat.nf * bs
        # Node blocks -> super-block diagonals D (P + 2 with the dummies), neighbour couplings C (p, p + 1) and
        # long couplings L (p, q): one gather of node blocks each (a missing block reads the zero row).
        D, C, L = plan.place(pat, blocks, bs)
        pad = np.arange(pat.nf * bs, P * B)  # padding rows of the last super-block, and the dummies: identity
        D[pad // B, pad % B, pad % B] = 1.0
        D[P:] = np.eye(B)  # C[k]: coupling of seq[k], seq[k + 1]; seq = dummy, 0..P-1, dummy
        self.steps = []
        for j, p, q, ip, old, gap in plan.levels:
            Cpj, Cjq = C[ip - 1], C[ip]
            inv = np.linalg.inv(D[j])
            W1 = inv @ np.swapaxes(Cpj, 1, 2)  # A_jj^-1 A_jp
            W2 = inv @ Cjq  # A_jj^-1 A_jq
            D[p] -= Cpj @ W1
            D[q] -= np.swapaxes(Cjq, 1, 2) @ W2
            Cn = np.empty((len(gap), B, B))
            Cn[~gap] = C[old]
            Cn[gap] = -(Cpj @ W2)
            C = Cn
            self.steps.append((j, p, q, inv, Cpj, Cjq, W1, W2))
        self.lu = None
        S = plan.reduced
        if len(S):  # the super-blocks long edges touch: diagonals, chain couplings, long couplings
            vals = np.concatenate([D[S], C[1:-1], L])
            sumup, gather, indices, indptr = plan.reduced_layout(B)
            blk = sumup @ np.concatenate([vals, np.swapaxes(vals[len(S):], 1, 2)]).reshape(sumup.shape[1], -1)
            A = sp.csc_matrix((blk.reshape(-1)[gather], indices, indptr), shape=(len(S) * B, len(S) * B))
            self.lu = spla.splu(A, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                options={"SymmetricMode": True})

    def solve(self, b: np.ndarray) -> np.ndarray:
        plan, B = self.plan, self.B
        rhs = b.reshape(self.n, -1)
        k = rhs.shape[1]
        x = np.zeros(((plan.P + 2) * B, k))
        x[: self.n] = rhs
        x = x.reshape(plan.P + 2, B, k)
        ys = []
        for j, p, q, inv, Cpj, Cjq, _, _ in self.steps:
            y = inv @ x[j]
            x[p] -= Cpj @ y
            x[q] -= np.swapaxes(Cjq, 1, 2) @ y
            ys.append(y)
        S = plan.reduced
        out = np.zeros_like(x)
        if self.lu is not None:
            out[S] = self.lu.solve(x[S].reshape(len(S) * B, k)).reshape(len(S), B, k)
        for (j, p, q, _, _, _, W1, W2), y in zip(reversed(self.steps), reversed(ys)):
            out[j] = y - W1 @ out[p] - W2 @ out[q]
        out = out.reshape(-1, k)[: self.n]
        return out.reshape(b.shape)
