"""Compiled per-edge and per-node kernels of the pose-graph solve (serve_app/recon/posegraph.py), with numba.

Why compiled: a 1,000-window solve works on ~2,000 edges of 7x7 / 3x3 matrices. In batched numpy every step
(compose, log, Jacobian blocks, the three 7x7 products of the normal blocks, gradients, retractions, the polar
projections) was one call on (m, 7, 7) or (m, 3, 3) stacks whose per-call overhead and temporaries dominated.
Here one loop over the edges composes E = Z^-1 ∘ A^-1 ∘ B and writes the whitened residuals and the terms the
Jacobians reuse; another forms each edge's two 7x7 Jacobians in scratch and writes only the weighted normal
blocks [Ja^T W Ja; Ja^T W Jb; Jb^T W Ja; Jb^T W Jb] (the (4m, 49) layout `BlockPattern.blocks` takes) and the
gradient parts, skipping the Jacobians' structural zeros. Measured against the numpy version (bench/README.md,
round h16edge; both with posegraph_linalg.py's block Cholesky, 2-core box): the non-factorisation part of a cold
solve from a drifted chain 40.9 -> 19.6 ms (2.1x; 2.7x without the block pattern's own sums), bench/posegraph.py's
cold solve 34.8 -> 23.0 ms CPU, identical steps, poses within 4e-14.

All kernels are `njit(cache=True, nogil=True)`, no fastmath and no parallel: the numpy code's floating-point
operations in its order (a sum over a Jacobian's zero entries is left out, which changes no bit), so the solver
takes the same steps to the same poses. nogil: a solve in the ingress's thread pool leaves the event loop
running. The first call in a fresh checkout compiles them (~12 s on the 2-core box, once: cached in __pycache__,
then ~70 ms to load at the first solve of a process; importing numba ~0.3 s and ~100 MiB RSS, at the first
solve: posegraph.py imports this module lazily).

A state is (s (n,), R (n, 3, 3), t (n, 3)) float64 C-contiguous; an edge's terms row (width NT) holds phi (the
residual rotation vector), R_F, t_F (F = A^-1 ∘ B), s_E, R_E (E = Z^-1 ∘ F), M = s_Zi R_Zi and M t_F.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

T_PHI, T_RF, T_TF, T_SE, T_RE, T_M, T_MTF = 0, 3, 12, 15, 16, 25, 34  # column offsets in a terms row
NT = 37


@njit(cache=True, nogil=True)
def _exp_into(w0, w1, w2, out):
    """Rodrigues: rotation vector -> out (3, 3)."""
    th = math.sqrt(w0 * w0 + w1 * w1 + w2 * w2)
    if th < 1e-8:
        a, b = 1.0, 0.5
    else:
        a, b = math.sin(th) / th, (1.0 - math.cos(th)) / th ** 2
    K = ((0.0, -w2, w1), (w2, 0.0, -w0), (-w1, w0, 0.0))
    for i in range(3):
        for j in range(3):
            kk = K[i][0] * K[0][j] + K[i][1] * K[1][j] + K[i][2] * K[2][j]
            out[i, j] = (1.0 if i == j else 0.0) + a * K[i][j] + b * kk


@njit(cache=True, nogil=True)
def _log_into(R, out):
    """Rotation vector of R (3, 3) (angles below ~179.9 degrees) -> out (3,)."""
    c = min(max((R[0, 0] + R[1, 1] + R[2, 2] - 1.0) / 2.0, -1.0), 1.0)
    th = math.acos(c)
    f = 0.5 if th < 1e-6 else th / (2.0 * math.sin(th))
    out[0] = (R[2, 1] - R[1, 2]) * f
    out[1] = (R[0, 2] - R[2, 0]) * f
    out[2] = (R[1, 0] - R[0, 1]) * f


@njit(cache=True, nogil=True)
def so3_exp_rows(w):
    """(n, 3) rotation vectors -> (n, 3, 3)."""
    out = np.empty((w.shape[0], 3, 3))
    for i in range(w.shape[0]):
        _exp_into(w[i, 0], w[i, 1], w[i, 2], out[i])
    return out


@njit(cache=True, nogil=True)
def so3_log_rows(R):
    """(n, 3, 3) rotations -> (n, 3) rotation vectors."""
    out = np.empty((R.shape[0], 3))
    for i in range(R.shape[0]):
        _log_into(R[i], out[i])
    return out


@njit(cache=True, nogil=True)
def retract(s, R, t, d):
    """x ∘ Exp(d) per row, d (n, 7) = (rotation vector, translation, log scale)."""
    n = s.shape[0]
    s2, R2, t2 = np.empty(n), np.empty((n, 3, 3)), np.empty((n, 3))
    E = np.empty((3, 3))
    for i in range(n):
        s2[i] = s[i] * math.exp(d[i, 6])
        _exp_into(d[i, 0], d[i, 1], d[i, 2], E)
        for r in range(3):
            for c in range(3):
                R2[i, r, c] = R[i, r, 0] * E[0, c] + R[i, r, 1] * E[1, c] + R[i, r, 2] * E[2, c]
            t2[i, r] = s[i] * (R[i, r, 0] * d[i, 3] + R[i, r, 1] * d[i, 4] + R[i, r, 2] * d[i, 5]) + t[i, r]
    return s2, R2, t2


@njit(cache=True, nogil=True)
def edge_terms(s, R, t, ia, ib, zs, zR, zt, isig, r, T):
    """Whitened residuals r (m, 7) of E = Z^-1 ∘ A^-1 ∘ B for edges (ia, ib) with inverse measurements
    (zs, zR, zt) = Z^-1, and, when T has rows, the terms the Jacobians reuse (T (m, NT))."""
    terms = T.shape[0] > 0
    RF, RE = np.empty((3, 3)), np.empty((3, 3))
    tF, d, MtF, phi = np.empty(3), np.empty(3), np.empty(3), np.empty(3)
    for e in range(ia.shape[0]):
        a, b = ia[e], ib[e]
        sa = s[a]
        for i in range(3):
            d[i] = t[b, i] - t[a, i]
        for i in range(3):  # F = A^-1 ∘ B: R_a^T R_b, R_a^T (t_b - t_a) / s_a
            for j in range(3):
                RF[i, j] = R[a, 0, i] * R[b, 0, j] + R[a, 1, i] * R[b, 1, j] + R[a, 2, i] * R[b, 2, j]
            tF[i] = (R[a, 0, i] * d[0] + R[a, 1, i] * d[1] + R[a, 2, i] * d[2]) / sa
        sE = zs[e] * s[b] / sa
        for i in range(3):
            for j in range(3):
                RE[i, j] = zR[e, i, 0] * RF[0, j] + zR[e, i, 1] * RF[1, j] + zR[e, i, 2] * RF[2, j]
        for i in range(3):
            MtF[i] = (zs[e] * zR[e, i, 0]) * tF[0] + (zs[e] * zR[e, i, 1]) * tF[1] + (zs[e] * zR[e, i, 2]) * tF[2]
        _log_into(RE, phi)
        for i in range(3):
            r[e, i] = phi[i]
            r[e, 3 + i] = MtF[i] + zt[e, i]
        r[e, 6] = math.log(sE)
        for k in range(7):
            r[e, k] *= isig[k]
        if terms:
            for i in range(3):
                T[e, T_PHI + i] = phi[i]
                T[e, T_TF + i] = tF[i]
                T[e, T_MTF + i] = MtF[i]
                for j in range(3):
                    T[e, T_RF + 3 * i + j] = RF[i, j]
                    T[e, T_RE + 3 * i + j] = RE[i, j]
                    T[e, T_M + 3 * i + j] = zs[e] * zR[e, i, j]
            T[e, T_SE] = sE


@njit(cache=True, nogil=True)
def _jac_into(T, e, isig, Ja, Jb, jri):
    """The whitened Jacobians of edge e's residual with respect to the `retract` increments of A and B, from
    its terms, into Ja, Jb (7, 7) whose structural zeros the caller set (jri: 3x3 scratch). B: E ∘ Exp(d) (rotation
    Log(R_E Exp(w)) -> Jr^-1(phi), translation s_E R_E u, log scale + lambda); A: Z^-1 ∘ Exp(d)^-1 ∘ F (rotation
    R_E Exp(-R_F^T w), translation M (t_F x w - u - lambda t_F)); Jr^-1(phi) = I + K / 2 + c K^2, K = hat(phi)."""
    p0, p1, p2 = T[e, T_PHI], T[e, T_PHI + 1], T[e, T_PHI + 2]
    th = math.sqrt(p0 * p0 + p1 * p1 + p2 * p2)
    c = 1.0 / 12.0 if th < 1e-5 else 1.0 / th ** 2 - (1.0 + math.cos(th)) / (2.0 * th * math.sin(th))
    K = ((0.0, -p2, p1), (p2, 0.0, -p0), (-p1, p0, 0.0))
    t0, t1, t2 = T[e, T_TF], T[e, T_TF + 1], T[e, T_TF + 2]
    H = ((0.0, -t2, t1), (t2, 0.0, -t0), (-t1, t0, 0.0))  # hat(t_F)
    for i in range(3):  # jri (3, 3): scratch
        for j in range(3):
            kk = K[i][0] * K[0][j] + K[i][1] * K[1][j] + K[i][2] * K[2][j]
            jri[i, j] = (1.0 if i == j else 0.0) + 0.5 * K[i][j] + c * kk
    sE = T[e, T_SE]
    isc = isig[6]
    for i in range(3):
        ir, it = isig[i], isig[3 + i]
        for j in range(3):
            Jb[i, j] = jri[i, j] * ir
            Jb[3 + i, 3 + j] = sE * T[e, T_RE + 3 * i + j] * it
            Ja[i, j] = (jri[i, 0] * T[e, T_RF + 3 * j] + jri[i, 1] * T[e, T_RF + 3 * j + 1]
                        + jri[i, 2] * T[e, T_RF + 3 * j + 2]) * -ir
            Ja[3 + i, j] = (T[e, T_M + 3 * i] * H[0][j] + T[e, T_M + 3 * i + 1] * H[1][j]
                            + T[e, T_M + 3 * i + 2] * H[2][j]) * it
            Ja[3 + i, 3 + j] = T[e, T_M + 3 * i + j] * -it
        Ja[3 + i, 6] = T[e, T_MTF + i] * -it
    Jb[6, 6] = isc
    Ja[6, 6] = -isc


# Structural zeros. By row k: Ja is nonzero in columns [_AR_LO[k], _AR_HI[k]) (rotation rows: rotation columns;
# translation rows: all; the scale row: scale), Jb in [_BR_LO[k], _BR_HI[k]) (block diagonal). By column j: Ja in
# rows [_AC_LO[j], _AC_HI[j]), Jb in rows [_BR_LO[j], _BR_HI[j]) (block diagonal: the same ranges).
_AR_LO, _AR_HI = (0, 0, 0, 0, 0, 0, 6), (3, 3, 3, 7, 7, 7, 7)
_AC_LO, _AC_HI = (0, 0, 0, 3, 3, 3, 3), (6, 6, 6, 6, 6, 6, 7)
_BR_LO, _BR_HI = (0, 0, 0, 3, 3, 3, 6), (3, 3, 3, 6, 6, 6, 7)


@njit(cache=True, nogil=True)
def jacobians(T, isig):
    """The Jacobians (m, 7, 7) of every edge (tests and benches; the solver never materialises them)."""
    m = T.shape[0]
    Ja, Jb, jri = np.zeros((m, 7, 7)), np.zeros((m, 7, 7)), np.empty((3, 3))
    for e in range(m):
        _jac_into(T, e, isig, Ja[e], Jb[e], jri)
    return Ja, Jb


@njit(cache=True, nogil=True)
def normal_blocks(T, r, w, isig, c, ga, gb):
    """Per edge e: the weighted normal blocks c[k m + e] (k: aa, ab, ba, bb as 49 row-major entries) of
    w_e |r_e|^2 / 2 linearised, and the gradient parts ga[e] = Ja^T w r, gb[e] = Jb^T w r."""
    m = T.shape[0]
    Ja, Jb, jri = np.zeros((7, 7)), np.zeros((7, 7)), np.empty((3, 3))
    aa, ab, bb = np.empty((7, 7)), np.empty((7, 7)), np.empty((7, 7))
    for e in range(m):
        _jac_into(T, e, isig, Ja, Jb, jri)
        we = w[e]
        aa[:] = 0.0
        ab[:] = 0.0
        bb[:] = 0.0
        for i in range(7):
            ga[e, i] = 0.0
            gb[e, i] = 0.0
        for k in range(7):  # sum over residual rows k of J[k]^T (w J[k]), each row's nonzero columns only
            alo, ahi, blo, bhi = _AR_LO[k], _AR_HI[k], _BR_LO[k], _BR_HI[k]
            wr = r[e, k] * we
            for i in range(alo, ahi):
                x = Ja[k, i]
                ga[e, i] += x * wr
                for j in range(alo, ahi):
                    aa[i, j] += x * (Ja[k, j] * we)
                for j in range(blo, bhi):
                    ab[i, j] += x * (Jb[k, j] * we)
            for i in range(blo, bhi):
                x = Jb[k, i]
                gb[e, i] += x * wr
                for j in range(blo, bhi):
                    bb[i, j] += x * (Jb[k, j] * we)
        for i in range(7):
            for j in range(7):
                c[e, 7 * i + j] = aa[i, j]
                c[m + e, 7 * i + j] = ab[i, j]
                c[2 * m + e, 7 * i + j] = ab[j, i]
                c[3 * m + e, 7 * i + j] = bb[i, j]


@njit(cache=True, nogil=True)
def jt_times(T, v, isig, ga, gb):
    """(Ja^T v, Jb^T v) per edge for v (m, 7): a chord step's gradient parts."""
    Ja, Jb, jri = np.zeros((7, 7)), np.zeros((7, 7)), np.empty((3, 3))
    for e in range(T.shape[0]):
        _jac_into(T, e, isig, Ja, Jb, jri)
        for i in range(7):
            sa = sb = 0.0
            for k in range(_AC_LO[i], _AC_HI[i]):
                sa += Ja[k, i] * v[e, k]
            for k in range(_BR_LO[i], _BR_HI[i]):
                sb += Jb[k, i] * v[e, k]
            ga[e, i], gb[e, i] = sa, sb


@njit(cache=True, nogil=True)
def _cross_row(X, i, j):
    """X[i] x X[j] (rows of a 3x3)."""
    return (X[i, 1] * X[j, 2] - X[i, 2] * X[j, 1], X[i, 2] * X[j, 0] - X[i, 0] * X[j, 2],
            X[i, 0] * X[j, 1] - X[i, 1] * X[j, 0])


@njit(cache=True, nogil=True)
def _polar_into(X, fallback, out):
    """Nearest rotation to a near-orthogonal X (3, 3), by scaled Newton iterations of the polar decomposition,
    X <- (g X + X^-T / g) / 2 with X^-T from cross products; a matrix that is no near-rotation (det <= 0) gives
    the fallback. Quadratic convergence from near-orthogonal: 1e-2 -> 1e-4 -> 1e-8 -> 1e-16 in four steps."""
    out[:, :] = X
    bad = False
    for _ in range(4):
        cof = (_cross_row(out, 1, 2), _cross_row(out, 2, 0), _cross_row(out, 0, 1))  # det(X) X^-T by rows
        det = out[0, 0] * cof[0][0] + out[0, 1] * cof[0][1] + out[0, 2] * cof[0][2]
        bad = bad or det <= 1e-12
        if bad:
            det = 1.0
        g = np.cbrt(1.0 / det)
        for i in range(3):
            for j in range(3):
                out[i, j] = 0.5 * (g * out[i, j] + cof[i][j] / (det * g))
    if bad:
        out[:, :] = fallback


@njit(cache=True, nogil=True)
def polar(X, fallback):
    """`_polar_into` over (n, 3, 3) stacks."""
    out = np.empty_like(X)
    for i in range(X.shape[0]):
        _polar_into(X[i], fallback[i], out[i])
    return out


@njit(cache=True, nogil=True)
def chordal_rotation_terms(R, ia, ib, zRi, w, c, ga, gb):
    """The chordal start's rotation problem (unknowns Q = R^T, residual Q_b - Z^T Q_a, Z^T = R_Zi): per edge the
    blocks c (4m, 9) [w I; -w Z; -w Z^T; w I] and the gradient parts ga = -Z (w r), gb = w r (m, 9)."""
    m = ia.shape[0]
    wr = np.empty((3, 3))
    for e in range(m):
        a, b, we = ia[e], ib[e], w[e]
        for i in range(3):
            for j in range(3):
                c[e, 3 * i + j] = c[3 * m + e, 3 * i + j] = we * (1.0 if i == j else 0.0)
                c[m + e, 3 * i + j] = -we * zRi[e, j, i]
                c[2 * m + e, 3 * i + j] = -we * zRi[e, i, j]
                wr[i, j] = we * (R[b, j, i] - (zRi[e, i, 0] * R[a, j, 0] + zRi[e, i, 1] * R[a, j, 1]
                                                + zRi[e, i, 2] * R[a, j, 2]))
        for i in range(3):
            for j in range(3):
                gb[e, 3 * i + j] = wr[i, j]
                ga[e, 3 * i + j] = -(zRi[e, 0, i] * wr[0, j] + zRi[e, 1, i] * wr[1, j] + zRi[e, 2, i] * wr[2, j])


@njit(cache=True, nogil=True)
def chordal_rotations(R, dQ, col_of):
    """R_i = polar(R_i^T + dQ[col_of[i]])^T for free nodes (col_of >= 0; fallback: R_i), the rest kept."""
    out = R.copy()
    X, fb, P = np.empty((3, 3)), np.empty((3, 3)), np.empty((3, 3))
    for i in range(R.shape[0]):
        k = col_of[i]
        if k < 0:
            continue
        for a in range(3):
            for b in range(3):
                fb[a, b] = R[i, b, a]
                X[a, b] = R[i, b, a] + dQ[k, a, b]
        _polar_into(X, fb, P)
        for a in range(3):
            for b in range(3):
                out[i, a, b] = P[b, a]
    return out


@njit(cache=True, nogil=True)
def chordal_translation_terms(s, R, t, ia, ib, zs, zR, zt, w):
    """w (t_b - t_a - s_a R_a t_Z) per edge (m, 3), Z the inverse of (zs, zR, zt)."""
    m = ia.shape[0]
    out = np.empty((m, 3))
    tz = np.empty(3)
    for e in range(m):
        a, b = ia[e], ib[e]
        for i in range(3):  # t_Z = -R_Zi^T t_Zi / s_Zi
            tz[i] = -(zR[e, 0, i] * zt[e, 0] + zR[e, 1, i] * zt[e, 1] + zR[e, 2, i] * zt[e, 2]) / zs[e]
        for i in range(3):
            out[e, i] = w[e] * (t[b, i] - t[a, i]
                                - s[a] * (R[a, i, 0] * tz[0] + R[a, i, 1] * tz[1] + R[a, i, 2] * tz[2]))
    return out


@njit(cache=True, nogil=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving
        i = parent[i]
    return i


@njit(cache=True, nogil=True)
def hold_unanchored(ia, ib, free):
    """Hold (free[i] = False) the lowest-index node of every connected component of the graph (edges ia, ib)
    that has no held node: union-find whose root is always its component's lowest index."""
    n = free.shape[0]
    parent = np.arange(n)
    for e in range(ia.shape[0]):
        a, b = _find(parent, ia[e]), _find(parent, ib[e])
        if a < b:
            parent[b] = a
        elif b < a:
            parent[a] = b
    anchored = np.zeros(n, np.bool_)
    for i in range(n):
        if not free[i]:
            anchored[_find(parent, i)] = True
    for i in range(n):
        if parent[i] == i and not anchored[i]:
            free[i] = False
