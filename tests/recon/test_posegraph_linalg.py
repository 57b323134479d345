"""The pose graph's linear algebra (serve_app/recon/posegraph_linalg.py) against dense numpy: the block pattern
sums the edges' blocks into the matrix J^T W J, and the block Cholesky factorisation (compiled with numba) solves it
in the chain order or a minimum-degree order, or any order given."""

import numpy as np
import pytest

import serve_app.recon.posegraph_linalg as pl
from serve_app.recon.posegraph_linalg import BlockPattern


def _graph(rng, n: int, reach: int, loops: int):
    """Odometry edges to the previous `reach` nodes and `loops` long edges (random far pairs, either direction)."""
    ia, ib = [], []
    for b in range(1, n):
        for d in range(1, reach + 1):
            if b - d >= 0:
                ia.append(b - d)
                ib.append(b)
    for _ in range(loops):
        a = int(rng.integers(0, n - 12))
        b = int(rng.integers(a + 8, n))
        ia, ib = ia + [b], ib + [a]  # stored b -> a: the pattern must not depend on the direction
    return np.array(ia), np.array(ib)


def _dense(rng, n, ia, ib, free, bs):
    """Random per-edge Jacobian blocks and weights, the blocks [aa; ab; ba; bb] the solver sums, and the dense
    J^T W J over the free nodes (node order) with the same ridge."""
    m = len(ia)
    Ja, Jb = rng.normal(size=(m, bs, bs)), rng.normal(size=(m, bs, bs))
    w = rng.uniform(0.2, 1.0, m)
    W = w[:, None, None]
    c = np.stack([np.swapaxes(Ja, 1, 2) @ (W * Ja), np.swapaxes(Ja, 1, 2) @ (W * Jb),
                  np.swapaxes(Jb, 1, 2) @ (W * Ja), np.swapaxes(Jb, 1, 2) @ (W * Jb)]).reshape(4 * m, bs * bs)
    J = np.zeros((m * bs, n * bs))
    for e in range(m):
        J[e * bs:(e + 1) * bs, ia[e] * bs:(ia[e] + 1) * bs] += Ja[e]
        J[e * bs:(e + 1) * bs, ib[e] * bs:(ib[e] + 1) * bs] += Jb[e]
    cols = np.concatenate([bs * i + np.arange(bs) for i in range(n) if free[i]])
    J = J[:, cols]
    return c, J.T @ (np.repeat(w, bs)[:, None] * J) + 1e-3 * np.eye(len(cols))


def _two_chains(rng, n: int, reach: int, loops: int):
    """Two separate chains of n // 2 nodes (a part the held nodes do not reach must still factor on its own)."""
    ia, ib = _graph(rng, n // 2, reach, loops)
    return np.r_[ia, ia + n // 2], np.r_[ib, ib + n // 2]


CASES = {  # name: (nodes, odometry reach, long edges, held nodes, order expected, graph)
    "chain": (60, 2, 0, [0], "chain", _graph),
    "chain with loops": (61, 2, 3, [0], "chain", _graph),
    "held node mid-chain": (61, 2, 3, [0, 30], "chain", _graph),
    "reach 1": (59, 1, 2, [0, 1], "chain", _graph),
    "reach 3": (80, 3, 2, [0], "chain", _graph),
    "many loops: minimum degree": (40, 2, 30, [0], "minimum degree", _graph),
    "two parts": (80, 2, 1, [0, 40], "chain", _two_chains),
    "one free node": (2, 1, 0, [0], "minimum degree", _graph),
}


def _check(rng, pat, n, ia, ib, free, bs):
    """The pattern's summed blocks form the dense matrix (in its block column order), and its factorisation
    solves it for a vector and for several right-hand sides."""
    c, Hd = _dense(rng, n, ia, ib, free, bs)
    blocks = pat.blocks(c, ridge=1e-3)
    node_of = np.argsort(np.argsort(pat.col_of[free]))  # free node (node order) -> its block column
    pos = np.concatenate([bs * node_of[i] + np.arange(bs) for i in range(int(free.sum()))])
    H = pat.csc(blocks, bs).toarray()
    Hn = np.empty_like(Hd)
    Hn[np.ix_(pos, pos)] = Hd
    assert np.allclose(H, Hn)
    f = pat.factor(blocks, bs)
    b = rng.normal(size=(H.shape[0], 3))
    b0 = b.copy()
    x = f.solve(b)
    assert np.array_equal(b, b0)  # solve leaves its argument alone
    ref = np.linalg.solve(Hn, b)
    assert np.abs(x - ref).max() <= 1e-9 * np.abs(ref).max()
    assert np.allclose(f.solve(b[:, 0]), x[:, 0], rtol=1e-12, atol=0)  # a vector right-hand side keeps its shape
    assert f.solve(b[:, 0]).shape == (H.shape[0],)


@pytest.mark.parametrize("bs", [7, 3, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_block_pattern_and_factorisation_match_dense_numpy(case, bs):
    n, reach, loops, held, order, graph = CASES[case]
    rng = np.random.default_rng(10 * list(CASES).index(case) + bs)
    ia, ib = graph(rng, n, reach, loops)
    free = np.ones(n, bool)
    free[held] = False
    pat = BlockPattern(ia, ib, free)
    assert pat.order == order
    _check(rng, pat, n, ia, ib, free, bs)


@pytest.mark.parametrize("seed", range(4))
def test_any_elimination_order_gives_the_same_solution(seed):
    """The symbolic factorisation (fill from the elimination tree) holds for any order, not only the chain's."""
    rng = np.random.default_rng(seed)
    ia, ib = _graph(rng, 50, 2, 6)
    free = np.ones(50, bool)
    free[[0, 17]] = False
    pat = BlockPattern(ia, ib, free, rank=rng.permutation(48))
    assert pat.order == "given"
    _check(rng, pat, 50, ia, ib, free, 7)


def test_chain_order_keeps_the_loops_super_blocks_to_the_end():
    rng = np.random.default_rng(5)
    ia, ib = _graph(rng, 100, 2, 2)
    free = np.ones(100, bool)
    free[0] = False
    pat = BlockPattern(ia, ib, free)
    ends = np.unique(np.r_[ia[-2:], ib[-2:]])  # the two long edges
    assert 0 < pat.kept <= 4 * 2
    assert (pat.col_of[ends] >= 99 - pat.kept).all()
    runs = np.setdiff1d(np.arange(1, 100), np.flatnonzero(pat.col_of >= 99 - pat.kept))
    assert (np.diff(pat.col_of[runs]) == 1).all()  # the rest in chain order
    # Eliminating a run fills only between it and the kept nodes at its ends: L has a few blocks per column.
    colptr = pat.symbolic()[0]
    assert np.diff(colptr)[: 99 - pat.kept].max() <= 4


def test_kept_nodes_ordered_by_superlu_when_too_many_for_the_dense_minimum_degree(monkeypatch):
    rng = np.random.default_rng(8)
    ia, ib = _graph(rng, 90, 2, 5)
    free = np.ones(90, bool)
    free[0] = False
    dense = BlockPattern(ia, ib, free)
    monkeypatch.setattr(pl, "MAX_DENSE_ORDER", 0)
    pat = BlockPattern(ia, ib, free)
    assert pat.order == dense.order == "chain" and pat.kept == dense.kept > 0
    kept = np.flatnonzero(pat.col_of >= 89 - pat.kept)
    assert np.array_equal(kept, np.flatnonzero(dense.col_of >= 89 - dense.kept))  # the same nodes, last
    _check(rng, pat, 90, ia, ib, free, 3)


@pytest.mark.parametrize("bs", [7, 1])
def test_a_matrix_that_is_not_positive_definite_raises_linalg_error(bs):
    rng = np.random.default_rng(6)
    ia, ib = _graph(rng, 40, 2, 2)
    free = np.ones(40, bool)
    free[0] = False
    pat = BlockPattern(ia, ib, free)
    blocks = pat.blocks(_dense(rng, 40, ia, ib, free, bs)[0], ridge=1e-3)
    bad = blocks.copy()
    bad[pat.diag[20]] -= 1e6 * np.eye(bs).reshape(-1)
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
        pat.factor(bad, bs)
    bad = blocks.copy()
    bad[pat.diag[3], 0] = np.nan
    with pytest.raises(np.linalg.LinAlgError):
        pat.factor(bad, bs)
    pat.factor(blocks, bs)  # the pattern is still usable


def test_gradient_sums_edge_parts_per_free_node():
    rng = np.random.default_rng(3)
    ia, ib = _graph(rng, 30, 2, 2)
    free = np.ones(30, bool)
    free[[0, 7]] = False
    pat = BlockPattern(ia, ib, free)
    ga, gb = rng.normal(size=(len(ia), 7)), rng.normal(size=(len(ia), 7))
    ref = np.zeros((30, 7))
    np.add.at(ref, ia, ga)
    np.add.at(ref, ib, gb)
    g = pat.gradient(ga, gb)
    for i in np.flatnonzero(free):
        assert np.allclose(g[pat.col_of[i]], ref[i])


def test_too_many_loops_fall_back_to_superlu_in_a_fill_reducing_order(monkeypatch):
    rng = np.random.default_rng(4)
    ia, ib = _graph(rng, 60, 2, 3)
    free = np.ones(60, bool)
    free[0] = False
    assert BlockPattern(ia, ib, free).order == "chain"
    monkeypatch.setattr(pl, "MAX_LOOP_SHARE", 0.0)
    pat = BlockPattern(ia, ib, free)
    assert pat.order == "minimum degree"
    assert sorted(pat.col_of[free]) == list(range(59))
    _check(rng, pat, 60, ia, ib, free, 7)


def test_a_long_chain_with_loops_matches_superlu():
    """The bench's shape at a third of its size (7x7 blocks, 400 nodes, odometry to the previous two, 8 loops):
    the chain order keeps the loops' super-blocks to the end, and the solution is SuperLU's to 1e-10."""
    import scipy.sparse.linalg as spla

    rng = np.random.default_rng(7)
    n = 400
    ia, ib = _graph(rng, n, 2, 8)
    free = np.ones(n, bool)
    free[0] = False
    pat = BlockPattern(ia, ib, free)
    assert pat.order == "chain" and 0 < pat.kept <= 2 * 2 * 8
    m = len(ia)
    Ja, Jb = rng.normal(size=(m, 7, 7)), rng.normal(size=(m, 7, 7))
    c = np.stack([np.swapaxes(Ja, 1, 2) @ Ja, np.swapaxes(Ja, 1, 2) @ Jb, np.swapaxes(Jb, 1, 2) @ Ja,
                  np.swapaxes(Jb, 1, 2) @ Jb]).reshape(4 * m, 49)
    blocks = pat.blocks(c, ridge=1e-6)
    b = rng.normal(size=(399 * 7, 2))
    ref = spla.splu(pat.csc(blocks, 7)).solve(b)
    x = pat.factor(blocks, 7).solve(b)
    assert np.abs(x - ref).max() <= 1e-10 * np.abs(ref).max()
