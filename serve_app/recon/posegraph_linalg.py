"""The pose graph's linear algebra: the block pattern of its normal matrices and their factorisation.

A session's windows form a chain (odometry edges to the previous one or two windows) with a few long edges
(loops). `BlockPattern` computes once per solve, at node level, where each edge's four blocks land and an
elimination order of the free nodes: in chain order, the super-blocks (g consecutive nodes, g the odometry
reach) that long edges touch moved to the end (`chain_order`: each such super-block separates the chain, so a
run between two of them fills only towards them, and what is left is a small system over the kept nodes, which
a dense exact minimum degree orders: 17 % fewer block updates than keeping them in chain order); a
graph whose long edges touch more than a quarter of the super-blocks gets a node minimum-degree order
(SuperLU's MMD on the node graph). `BlockCholesky` factors the 7x7-, 3x3- and 1x1-block systems of every graph
by one code path: a block-level symbolic factorisation (elimination tree, L's block structure; once per pattern)
and a left-looking block Cholesky with its forward/back substitution for 1 or k right-hand sides.

Why numba: the matrices are block-sparse with tiny blocks (14,000 of 7x7 for 1,000 nodes), so batched numpy (the
previous round's block cyclic reduction, bench/posegraph_cyclic.py) and SuperLU (small supernodes) both run at
~1 GFLOP/s, bound by per-call overhead. Compiled loops over the blocks, with the block size a compile-time
constant (one kernel per size), do the same elimination with ~4x fewer flops than the cyclic reduction's 14x14
super-blocks: one factorisation of the bench's 7x7 matrix (1,000 nodes, 20 loops) 3.5-4.6x faster than the
cyclic reduction and ~7-8x faster than SuperLU, same solution to ~1e-11 (bench/posegraph.py, bench/README.md);
the 3x3 and 1x1 ones ~7-10x. The kernels are compiled on first use and cached on disk (numba's cache=True, in
__pycache__): ~10-18 s once per machine and source version, ~0.3 s to load in a new process, ~0.3 s to import
numba. tests/recon/test_posegraph_linalg.py checks everything against dense numpy.

Measured and not taken (bench/README.md): LAPACK's banded Cholesky (a band of ~17 nodes in RCM order: slower),
qdldl (a third less than SuperLU), CHOLMOD through cvxopt (a faster numeric factorisation, but building its
matrix and the symbolic analysis per solve cost as much; a 65 MB wheel), cholespy (analysis and factorisation
in one call) and scikit-sparse (no wheel on PyPI); in numba: the block updates as rank-1 row updates instead of
dot products, flat offsets, a column-at-once triangular solve (none faster).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

MAX_REACH = 4  # odometry edges span at most this many nodes (chain positions) to be grouped into super-blocks
MAX_LOOP_SHARE = 0.25  # super-blocks touched by long edges above which a minimum-degree order is used instead
MAX_DENSE_ORDER = 3000  # kept nodes up to which their order is found on a dense adjacency matrix (9 MB)


@numba.njit(cache=True, nogil=True)
def _scatter_add(out, index, vals):
    """out[index[i]] += vals[i] for every i with index[i] >= 0 (one pass; a sparse product took 4x longer)."""
    w = vals.shape[1]
    for i in range(len(index)):
        r = index[i]
        if r >= 0:
            for c in range(w):
                out[r, c] += vals[i, c]


@numba.njit(cache=True, nogil=True)
def _min_degree_dense(k, ea, eb):
    """Exact minimum degree on a small graph (k nodes, edges ea-eb) kept as a dense adjacency matrix, ties to the
    lowest index: the elimination sequence. O(k^2); SuperLU's MMD costs ~0.6 ms of call overhead for 80 nodes."""
    adj = np.zeros((k, k), np.bool_)
    for e in range(len(ea)):
        if ea[e] != eb[e]:
            adj[ea[e], eb[e]] = True
            adj[eb[e], ea[e]] = True
    deg = np.zeros(k, np.int64)
    for i in range(k):
        for j in range(k):
            deg[i] += adj[i, j]
    done = np.zeros(k, np.bool_)
    order = np.empty(k, np.int64)
    nb = np.empty(k, np.int64)
    for step in range(k):
        best = -1
        for i in range(k):
            if not done[i] and (best < 0 or deg[i] < deg[best]):
                best = i
        order[step] = best
        done[best] = True
        cnt = 0
        for j in range(k):
            if adj[best, j] and not done[j]:
                nb[cnt] = j
                cnt += 1
                adj[j, best] = False
                deg[j] -= 1
        for x in range(cnt):  # the neighbours become a clique (the fill of eliminating best)
            for y in range(x + 1, cnt):
                u, v = nb[x], nb[y]
                if not adj[u, v]:
                    adj[u, v] = True
                    adj[v, u] = True
                    deg[u] += 1
                    deg[v] += 1
    return order


def super_blocks(pa: np.ndarray, pb: np.ndarray, nf: int):
    """Chain positions grouped into super-blocks of g (the odometry reach: the longest edge of at most MAX_REACH
    positions), so short edges couple only neighbouring super-blocks: (g, P super-blocks, each edge's lower and
    higher super-block, which edges are long, the super-blocks long edges touch)."""
    d = np.abs(pa - pb)
    short = d[d <= MAX_REACH]
    g = int(short.max()) if len(short) else 1
    P = -(-nf // g)
    sa, sb = pa // g, pb // g
    lo, hi = np.minimum(sa, sb), np.maximum(sa, sb)
    far = hi - lo > 1
    keep = np.zeros(P, bool)
    keep[lo[far]] = keep[hi[far]] = True
    return g, P, lo, hi, far, keep


def chain_order(pa: np.ndarray, pb: np.ndarray, nf: int) -> tuple[np.ndarray, int] | None:
    """An elimination order for edges between chain positions pa, pb (free nodes in chain order) if the graph is
    a chain with a few long edges, else None: positions grouped into super-blocks of g (the odometry reach), the
    super-blocks long edges touch kept to the end (each one separates the chain, so eliminating a run between two
    of them fills only between the run and them), in a minimum-degree order of their own. Returns (rank of each
    position, number of kept nodes)."""
    if not len(pa):
        return None
    g, P, _, _, _, keep = super_blocks(pa, pb, nf)
    if keep.sum() > MAX_LOOP_SHARE * P:
        return None
    kept = keep[np.arange(nf) // g]
    kn = np.flatnonzero(kept)  # the kept nodes, in a minimum-degree order of what is left of the graph once the
    at = np.full(nf, -1)  # runs are eliminated: their own edges, and every node of two consecutive kept
    at[kn] = np.arange(len(kn))  # super-blocks coupled (the fill of the run between them)
    ks = np.flatnonzero(keep)
    both = kept[pa] & kept[pb]
    ea, eb = [at[pa[both]]], [at[pb[both]]]
    for i in range(g):
        for j in range(g):
            ea.append(at[np.minimum(ks[:-1] * g + i, nf - 1)])
            eb.append(at[np.minimum(ks[1:] * g + j, nf - 1)])
    ea, eb = np.concatenate(ea), np.concatenate(eb)
    if len(kn) <= MAX_DENSE_ORDER:
        order = kn[_min_degree_dense(len(kn), ea, eb)]
    else:
        order = kn[np.argsort(min_degree_order(ea, eb, len(kn)), kind="stable")]
    rank = np.empty(nf, np.int64)
    rank[np.r_[np.flatnonzero(~kept), order]] = np.arange(nf)
    return rank, int(kept.sum())


def min_degree_order(pa: np.ndarray, pb: np.ndarray, nf: int) -> np.ndarray:
    """Node-level minimum degree (SuperLU's MMD on A + A^T of the node graph): the rank of each position."""
    if nf <= 2:
        return np.arange(nf)
    A = sp.csc_matrix((np.ones(2 * len(pa) + nf), (np.r_[pa, pb, np.arange(nf)], np.r_[pb, pa, np.arange(nf)])),
                      shape=(nf, nf))
    return spla.splu(A + sp.identity(nf, format="csc") * nf, permc_spec="MMD_AT_PLUS_A",
                     options={"SymmetricMode": True}).perm_c  # perm_c[i]: the position of free node i


class BlockPattern:
    """The block sparsity of a symmetric matrix over F free nodes summed from per-edge blocks (an edge (a, b)
    gives blocks aa, ab, ba, bb; held nodes have no rows). Block columns are the free nodes in an elimination
    order (`rank`, default `chain_order`, else `min_degree_order`). `blocks(contrib)` sums the edges' blocks into
    their `slot`; `factor(blocks, bs)` factors the matrix they form (`BlockCholesky`, its
    structure computed once per pattern for every block size); `gradient` sums per-edge vectors per node."""

    def __init__(self, ia: np.ndarray, ib: np.ndarray, free: np.ndarray, rank: np.ndarray | None = None):
        n, m = len(free), len(ia)
        nf = int(free.sum())
        chain_pos = np.full(n, -1)
        chain_pos[free] = np.arange(nf)
        pa, pb = chain_pos[ia], chain_pos[ib]
        both = (pa >= 0) & (pb >= 0)
        self.nf = nf
        self.order, self.kept = "given", 0
        if rank is None:
            chain = chain_order(pa[both], pb[both], nf)
            if chain is not None:
                (rank, self.kept), self.order = chain, "chain"
            else:
                rank, self.order = min_degree_order(pa[both], pb[both], nf), "minimum degree"
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
        self.slot = np.full(4 * m, -1, np.int64)  # contribution -> its block (-1: a held node's)
        self.slot[ok] = slot[: len(ok)]
        self.diag = slot[len(ok):]  # block of each free node's diagonal, in column order
        self.bindptr = np.r_[0, np.cumsum(np.bincount(self.brow, minlength=nf))].astype(np.int32)
        self.ca, self.cb = ca.astype(np.int64), cb.astype(np.int64)  # gradient parts -> their block row (-1: held)
        self._csc: dict[int, tuple] = {}
        self._symbolic: tuple | None = None

    def blocks(self, contrib: np.ndarray, ridge: float = 0.0) -> np.ndarray:
        """Per-edge blocks contrib (4 m, bs * bs), [aa; ab; ba; bb], summed: (nb + 1, bs * bs) (the last row
        zero), plus ridge * I on the diagonal blocks."""
        out = np.zeros((self.nb + 1, contrib.shape[1]))
        _scatter_add(out, self.slot, np.ascontiguousarray(contrib, np.float64))
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

    def symbolic(self) -> tuple:
        """(colptr, rows) of the Cholesky factor's blocks below the diagonal, and the matrix's strict upper blocks
        (row j: uptr[j]:uptr[j + 1]) with their source block (usrc) and their transpose's place in L (uslot)."""
        if self._symbolic is None:
            up = np.flatnonzero(self.brow < self.bcol)  # row-major: grouped by row, columns increasing
            uptr = np.r_[0, np.cumsum(np.bincount(self.brow[up], minlength=self.nf))]
            colptr, rows, uslot = _symbolic(self.nf, uptr, self.bcol[up])
            self._symbolic = (colptr, rows, uptr, up, uslot)
        return self._symbolic

    def factor(self, blocks: np.ndarray, bs: int) -> BlockCholesky:
        """A factorisation (`.solve(b)`, b (F * bs,) or (F * bs, k)) of the SPD matrix the blocks form."""
        return BlockCholesky(self, blocks, bs)

    def gradient(self, ga: np.ndarray, gb: np.ndarray) -> np.ndarray:
        """Per-edge parts of a and b (m, ...) summed per free node: (F, ...) in block-column order."""
        out = np.zeros((self.nf, int(np.prod(ga.shape[1:]))))
        _scatter_add(out, self.ca, np.ascontiguousarray(ga, np.float64).reshape(len(ga), -1))
        _scatter_add(out, self.cb, np.ascontiguousarray(gb, np.float64).reshape(len(gb), -1))
        return out.reshape((self.nf,) + ga.shape[1:])


@numba.njit(cache=True, nogil=True)
def _shell_sort(a):
    """Sorts a (int64) in place: np.sort would add 1.7 s to the first compile, for lists of a few rows."""
    h = 1
    while h < len(a) // 3:
        h = 3 * h + 1
    while h >= 1:
        for i in range(h, len(a)):
            v = a[i]
            j = i
            while j >= h and a[j - h] > v:
                a[j] = a[j - h]
                j -= h
            a[j] = v
        h //= 3


@numba.njit(cache=True, nogil=True)
def _grown(a, n, need):
    """a larger copy of a[:n] (a helper: growing in place made `_symbolic` take seconds longer to compile)."""
    out = np.empty(max(2 * len(a), need), a.dtype)
    out[:n] = a[:n]
    return out


@numba.njit(cache=True, nogil=True)
def _symbolic(nf, uptr, ucol):
    """The block structure of the Cholesky factor L of a symmetric matrix over nf block columns (already in
    elimination order) whose strict upper blocks are row j -> columns ucol[uptr[j]:uptr[j + 1]] (increasing),
    i.e. the strict lower part's column j. Column j of L is its own rows plus its elimination-tree children's
    rows below j. Returns (colptr, rows, slot): L's rows per column (increasing) and, per upper block, the
    position of its transpose in L."""
    rows = np.empty(4 * len(ucol) + 16, np.int64)
    colptr = np.zeros(nf + 1, np.int64)
    slot = np.empty(len(ucol), np.int64)
    mark = np.full(nf, -1, np.int64)
    pos = np.empty(nf, np.int64)
    head = np.full(nf, -1, np.int64)  # elimination-tree children of a column, as linked lists
    nxt = np.full(nf, -1, np.int64)
    buf = np.empty(nf, np.int64)
    n = 0
    for j in range(nf):
        cnt = 0
        mark[j] = j
        for q in range(uptr[j], uptr[j + 1]):
            r = ucol[q]
            if mark[r] != j:
                mark[r] = j
                buf[cnt] = r
                cnt += 1
        c = head[j]
        while c != -1:
            for q in range(colptr[c], colptr[c + 1]):
                r = rows[q]
                if mark[r] != j:
                    mark[r] = j
                    buf[cnt] = r
                    cnt += 1
            c = nxt[c]
        col = buf[:cnt]
        _shell_sort(col)
        if n + cnt > len(rows):
            rows = _grown(rows, n, n + cnt)
        for q in range(cnt):
            rows[n + q] = col[q]
            pos[col[q]] = n + q
        for q in range(uptr[j], uptr[j + 1]):
            slot[q] = pos[ucol[q]]
        n += cnt
        colptr[j + 1] = n
        if cnt:  # the parent: the first row below the diagonal
            p = col[0]
            nxt[j] = head[p]
            head[p] = j
    return colptr, rows[:n].copy(), slot


def _make_kernels(bs: int):
    """`_numeric` and `_substitute` compiled for bs x bs blocks: bs a constant, so LLVM unrolls and vectorises
    the block loops (2x faster than a run-time bs for 7 x 7). Cached on disk per bs (the closure's value is
    part of numba's cache key)."""

    @numba.njit(cache=True, nogil=True)
    def _numeric(blocks, diag, uptr, usrc, uslot, colptr, rows):
        """Left-looking block Cholesky: D (nf, bs, bs) the lower Cholesky factors of the diagonal blocks, L (nnz, bs,
        bs) the blocks below them (structure from `_symbolic`). Column k gets the updates of every earlier column j
        with a block in row k when k comes up (columns wait in linked lists keyed by their next row). Returns
        (D, L, -1) or the first column whose pivot is not positive."""
        nf = len(diag)
        D = np.empty((nf, bs, bs))
        L = np.empty((len(rows), bs, bs))  # zeroed column by column, when it comes up (warm in cache)
        where = np.empty(nf, np.int64)  # row -> its position in the current column
        first = np.empty(nf, np.int64)  # column j: the position of its next row to update
        head = np.full(nf, -1, np.int64)
        nxt = np.full(nf, -1, np.int64)
        for k in range(nf):
            Dk = D[k]
            src = blocks[diag[k]]
            for a in range(bs):
                for b in range(bs):
                    Dk[a, b] = src[a * bs + b]
            L[colptr[k]:colptr[k + 1]] = 0.0
            for q in range(uptr[k], uptr[k + 1]):  # A's upper block (k, i) is L's (i, k) transposed
                src = blocks[usrc[q]]
                T = L[uslot[q]]
                for a in range(bs):
                    for b in range(bs):
                        T[a, b] = src[b * bs + a]
            for q in range(colptr[k], colptr[k + 1]):
                where[rows[q]] = q
            j = head[k]
            while j != -1:
                jn = nxt[j]
                p = first[j]
                Lkj = L[p]
                for a in range(bs):  # D_k -= L_kj L_kj^T (lower half)
                    for b in range(a + 1):
                        s = 0.0
                        for c in range(bs):
                            s += Lkj[a, c] * Lkj[b, c]
                        Dk[a, b] -= s
                for q in range(p + 1, colptr[j + 1]):  # L_ik -= L_ij L_kj^T
                    Lij = L[q]
                    T = L[where[rows[q]]]
                    for a in range(bs):
                        for b in range(bs):
                            s = 0.0
                            for c in range(bs):
                                s += Lij[a, c] * Lkj[b, c]
                            T[a, b] -= s
                p += 1
                if p < colptr[j + 1]:
                    first[j] = p
                    r = rows[p]
                    nxt[j] = head[r]
                    head[r] = j
                j = jn
            for c in range(bs):  # D_k = chol(D_k), lower
                s = Dk[c, c]
                for t in range(c):
                    s -= Dk[c, t] * Dk[c, t]
                if not s > 0.0:
                    return D, L, k
                d = np.sqrt(s)
                Dk[c, c] = d
                for a in range(c + 1, bs):
                    s = Dk[a, c]
                    for t in range(c):
                        s -= Dk[a, t] * Dk[c, t]
                    Dk[a, c] = s / d
            for q in range(colptr[k], colptr[k + 1]):  # L_ik = L_ik D_k^-T
                T = L[q]
                for a in range(bs):
                    for c in range(bs):
                        s = T[a, c]
                        for t in range(c):
                            s -= T[a, t] * Dk[c, t]
                        T[a, c] = s / Dk[c, c]
            if colptr[k] < colptr[k + 1]:
                first[k] = colptr[k]
                r = rows[colptr[k]]
                nxt[k] = head[r]
                head[r] = k
        return D, L, -1


    @numba.njit(cache=True, nogil=True)
    def _substitute(D, L, colptr, rows, x):
        """x (nf, bs, k) <- (L L^T)^-1 x in place: forward then back substitution, block column by block column."""
        nf, _, m = x.shape
        for k in range(nf):
            Dk, xk = D[k], x[k]
            for c in range(bs):
                for v in range(m):
                    s = xk[c, v]
                    for t in range(c):
                        s -= Dk[c, t] * xk[t, v]
                    xk[c, v] = s / Dk[c, c]
            for q in range(colptr[k], colptr[k + 1]):
                T, xi = L[q], x[rows[q]]
                for a in range(bs):
                    for v in range(m):
                        s = 0.0
                        for c in range(bs):
                            s += T[a, c] * xk[c, v]
                        xi[a, v] -= s
        for k in range(nf - 1, -1, -1):
            Dk, xk = D[k], x[k]
            for q in range(colptr[k], colptr[k + 1]):
                T, xi = L[q], x[rows[q]]
                for c in range(bs):
                    for v in range(m):
                        s = 0.0
                        for a in range(bs):
                            s += T[a, c] * xi[a, v]
                        xk[c, v] -= s
            for c in range(bs - 1, -1, -1):
                for v in range(m):
                    s = xk[c, v]
                    for t in range(c + 1, bs):
                        s -= Dk[t, c] * xk[t, v]
                    xk[c, v] = s / Dk[c, c]

    return _numeric, _substitute


_KERNELS: dict[int, tuple] = {}


def _kernels(bs: int) -> tuple:
    if bs not in _KERNELS:
        _KERNELS[bs] = _make_kernels(bs)
    return _KERNELS[bs]


class BlockCholesky:
    """L L^T of the SPD matrix the pattern's summed blocks form (bs x bs blocks, in the pattern's block column
    order): `solve(b)` for b (F * bs,) or (F * bs, k). Raises np.linalg.LinAlgError if a pivot is not positive."""

    def __init__(self, pat: BlockPattern, blocks: np.ndarray, bs: int):
        colptr, rows, uptr, usrc, uslot = pat.symbolic()
        numeric, self._substitute = _kernels(bs)
        self.D, self.L, bad = numeric(np.ascontiguousarray(blocks), pat.diag, uptr, usrc, uslot, colptr, rows)
        if bad >= 0:
            raise np.linalg.LinAlgError(f"the normal matrix is not positive definite (block column {bad})")
        self.colptr, self.rows, self.bs, self.nf = colptr, rows, bs, pat.nf

    def solve(self, b: np.ndarray) -> np.ndarray:
        x = np.array(b, np.float64).reshape(self.nf, self.bs, -1)
        self._substitute(self.D, self.L, self.colptr, self.rows, x)
        return x.reshape(b.shape)
