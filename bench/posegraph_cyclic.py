"""The previous round's chain factorisation (h16solve2, until the block Cholesky in
serve_app/recon/posegraph_linalg.py replaced it): block cyclic reduction in batched numpy, the super-blocks long
edges touch left to a small SuperLU system. Kept only so that bench/posegraph.py can compare one factorisation
of the same matrix by both in one run.

The nodes in chain order are grouped into super-blocks of g nodes (g: the odometry reach), so odometry couples
only neighbouring super-blocks; the super-blocks no long edge touches are eliminated level by level, every other
one of each run at once (batched numpy on (k, B, B) arrays, ~log2(run) levels), which leaves a small sparse
system over the super-blocks the loops touch (SuperLU). It reads a `BlockPattern` made in chain order
(`rank=np.arange(F)`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from serve_app.recon.posegraph_linalg import BlockPattern, super_blocks


class ChainPlan:
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
    def make(cls, pa: np.ndarray, pb: np.ndarray, nf: int) -> ChainPlan | None:
        """The plan for edges between chain positions pa, pb, or None if the graph is not a chain with a few
        long edges."""
        if not len(pa):
            return None
        g, P, lo, hi, far, keep = super_blocks(pa, pb, nf)
        return cls(g, P, keep, np.unique(np.stack([lo[far], hi[far]], 1), axis=0))


class ChainCholesky:
    """Block cyclic reduction of an SPD matrix given as node blocks in chain order (see the module docstring).
    Super-block size B = g * bs; the last super-block is padded with identity rows."""

    def __init__(self, plan: ChainPlan, pat: BlockPattern, blocks: np.ndarray, bs: int):
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
