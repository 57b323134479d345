"""The pose graph's linear algebra (serve_app/recon/posegraph_linalg.py) against dense numpy: the block pattern
sums the edges' blocks into the matrix J^T W J, and both factorisations (block cyclic reduction along the chain,
SuperLU in a minimum-degree order) solve it."""

import numpy as np
import pytest

import serve_app.recon.posegraph_linalg as pl
from serve_app.recon.posegraph_linalg import BlockPattern, ChainCholesky


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


@pytest.fixture(autouse=True)
def _small_chains(monkeypatch):
    """The chain factorisation on graphs of tens of nodes (the solver keeps it for larger ones)."""
    monkeypatch.setattr(pl, "MIN_CHAIN_NODES", 8)


CASES = {  # name: (nodes, odometry reach, long edges, held nodes, factorisation expected)
    "chain": (60, 2, 0, [0], ChainCholesky),
    "chain with loops": (61, 2, 3, [0], ChainCholesky),
    "held node mid-chain": (61, 2, 3, [0, 30], ChainCholesky),
    "reach 1": (59, 1, 2, [0, 1], ChainCholesky),
    "reach 3": (80, 3, 2, [0], ChainCholesky),
    "many loops: SuperLU": (40, 2, 30, [0], None),
}


@pytest.mark.parametrize("bs", [7, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_block_pattern_and_factorisation_match_dense_numpy(case, bs):
    n, reach, loops, held, kind = CASES[case]
    rng = np.random.default_rng(10 * list(CASES).index(case) + bs)
    ia, ib = _graph(rng, n, reach, loops)
    free = np.ones(n, bool)
    free[held] = False
    pat = BlockPattern(ia, ib, free)
    c, Hd = _dense(rng, n, ia, ib, free, bs)
    blocks = pat.blocks(c, ridge=1e-3)
    # Block column order: the pattern's (chain order, or minimum degree when it falls back).
    node_of = np.argsort(np.argsort(pat.col_of[free]))  # free node (node order) -> its block column
    pos = np.concatenate([bs * node_of[i] + np.arange(bs) for i in range(int(free.sum()))])
    H = pat.csc(blocks, bs).toarray()
    Hn = np.empty_like(Hd)
    Hn[np.ix_(pos, pos)] = Hd
    assert np.allclose(H, Hn)
    f = pat.factor(blocks, bs)
    assert isinstance(f, ChainCholesky) if kind is ChainCholesky else not isinstance(f, ChainCholesky)
    b = rng.normal(size=(H.shape[0], 3))
    x = f.solve(b)
    assert np.allclose(x, np.linalg.solve(Hn, b), rtol=1e-8, atol=1e-9)
    assert np.allclose(f.solve(b[:, 0]), x[:, 0])  # a vector right-hand side keeps its shape


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
    assert BlockPattern(ia, ib, free).chain is not None
    monkeypatch.setattr(pl, "MAX_LOOP_SHARE", 0.0)
    pat = BlockPattern(ia, ib, free)
    assert pat.chain is None
    assert sorted(pat.col_of[free]) == list(range(59))
