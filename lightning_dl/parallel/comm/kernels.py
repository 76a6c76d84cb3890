"""Fused CPU loops for the compressed hooks, compiled by numba: each rule in one or two passes over the gradient where
torch's CPU operations take one pass per operation (about ten per element for the sign rule). Same rules and, for
``int8`` and ``sign``, the same float32 arithmetic as the torch path of ``codecs.py``, which devices other than the CPU
run; ``tests/parallel/comm/test_kernels.py`` checks each loop against its rule, ``test_workspace.py`` both paths.

Every function takes NumPy views of CPU tensors (``tensor.numpy()`` shares memory) and writes in place. Compiled once
per machine (about 4 s) and cached on disk beside this file (about 0.5 s to load); ``hooks.compile_fused`` does it when
a strategy configures DDP, so that no training step pays for it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from numba import njit

# reassociation lets LLVM vectorise sums (an L1 norm, a dot product): used only where the order of summation is free
_SUMS = {"reassoc", "nsz", "contract"}


def _jit(fastmath: bool | set[str] = False, inline: Literal["never", "always"] = "never") -> Any:
    return njit(cache=True, nogil=True, error_model="numpy", boundscheck=False, fastmath=fastmath, inline=inline)


SIGNS = (((np.arange(256).reshape(-1, 1) >> np.arange(8)) & 1) * 2 - 1).astype(np.float32)
"""Row ``b``: the eight unit signs (+1 for a set bit, −1 otherwise) that the byte ``b`` stands for."""


@_jit(fastmath=_SUMS)
def sign_encode(c, g, packed):
    """``c += g``; bit ``k`` of ``packed[j]`` set where ``c[8j + k] >= 0`` (padding bits zero); returns ``‖c‖₁``
    (float64; partial sums of eight in float32)."""
    n = c.size
    full = n // 8
    total = 0.0
    for j in range(full):
        byte = np.uint8(0)
        part = np.float32(0)
        b = 8 * j
        for k in range(8):
            v = c[b + k] + g[b + k]
            c[b + k] = v
            byte |= np.uint8(v >= 0) << k
            part += abs(v)
        total += float(part)
        packed[j] = byte
    if n > 8 * full:
        byte = np.uint8(0)
        for k in range(n - 8 * full):
            v = c[8 * full + k] + g[8 * full + k]
            c[8 * full + k] = v
            byte |= np.uint8(v >= 0) << k
            total += abs(v)
        packed[full] = byte
    return total


@_jit()
def sign_finish_pair(c, mine, other, s_me, s_other, out):
    """``sign_finish`` for two ranks on whole words: ``mine`` and ``other`` hold 64 signs per ``uint64`` (element
    ``64j + k`` is bit ``k`` of word ``j``), ``c`` and ``out`` 64 elements per word; a fixed trip count of 64 that
    LLVM vectorises, about three times faster than going byte by byte."""
    half_me, half_other = s_me / np.float32(2), s_other / np.float32(2)
    one, two = np.uint64(1), np.float32(2)
    for j in range(mine.size):
        wm, wo, b = mine[j], other[j], 64 * j
        for k in range(64):
            sm = np.float32((wm >> np.uint64(k)) & one) * two - np.float32(1)
            so = np.float32((wo >> np.uint64(k)) & one) * two - np.float32(1)
            c[b + k] -= sm * s_me
            out[b + k] = so * half_other + sm * half_me


@_jit(inline="always")
def _sign_finish_two(c, out, b, count, own, half_me, half_other, bm, bo):
    for k in range(count):
        c[b + k] -= own[bm, k]
        out[b + k] = half_other[bo, k] + half_me[bm, k]


@_jit()
def sign_finish(c, codes, scales, me, out, table):
    """``c ← c − s_me·σ_me`` and ``out ←`` the mean of the ranks' ``s_r·σ_r``; ``codes``: one row of packed signs per
    rank, ``scales``: float32, one per rank. With two ranks ``(s_o/2)·σ_o + (s_me/2)·σ_me`` (halving is exact, and
    ``a + b == b + a``: both ranks get the same bits); otherwise the sum in rank order, then divided."""
    n = c.size
    full = n // 8
    world = codes.shape[0]
    own = table * scales[me]
    if world == 2:
        half_me = table * (scales[me] / np.float32(2))
        half_other = table * (scales[1 - me] / np.float32(2))
        for j in range(full):  # eight at a time: a fixed trip count that LLVM vectorises
            _sign_finish_two(c, out, 8 * j, 8, own, half_me, half_other, codes[me, j], codes[1 - me, j])
        if n > 8 * full:
            bm, bo = codes[me, full], codes[1 - me, full]
            _sign_finish_two(c, out, 8 * full, n - 8 * full, own, half_me, half_other, bm, bo)
        return
    divisor = np.float32(world)
    for j in range(full + (n > 8 * full)):
        b = 8 * j
        for k in range(min(8, n - b)):
            c[b + k] -= own[codes[me, j], k]
            acc = table[codes[0, j], k] * scales[0]
            for r in range(1, world):
                acc += table[codes[r, j], k] * scales[r]
            out[b + k] = acc / divisor


@_jit()
def int8_quantize(c, scale, codes):
    """``q = round(c / scale)`` (half to even) into the int8 ``codes`` and ``c ← c − q·scale`` (exact: Sterbenz);
    a zero ``scale`` sends zeros and keeps ``c``."""
    if scale == 0:
        codes[:] = 0
        return
    for j in range(c.size):
        q = np.rint(c[j] / scale)
        codes[j] = np.int8(q)
        c[j] -= q * scale


@_jit()
def int8_finish_pair(q0, q1, s0, s1, out):
    """``out ← (q0·s0 + q1·s1) / 2``: the mean of two ranks' int8 messages (the bits of the general form)."""
    for j in range(out.size):
        out[j] = (np.float32(q0[j]) * s0 + np.float32(q1[j]) * s1) * np.float32(0.5)


@_jit()
def int8_finish(codes, scales, out):
    """``out ←`` the mean of the ranks' ``q_r·s_r`` (``codes``: one int8 row per rank), summed in rank order."""
    world = codes.shape[0]
    divisor = np.float32(world)
    for j in range(out.size):
        acc = np.float32(codes[0, j]) * scales[0]
        for r in range(1, world):
            acc += np.float32(codes[r, j]) * scales[r]
        out[j] = acc / divisor


@_jit(inline="always")
def _columns(a, rank):
    """The ``Qᵀ`` rows of rank columns ``a .. a + 3``; past ``rank`` (the last group of a rank that is no multiple of
    four) row ``a`` again, which ``_weights`` gives a zero weight."""
    n = min(4, rank - a)
    return a, (a + 1 if n > 1 else a), (a + 2 if n > 2 else a), (a + 3 if n > 3 else a)


@_jit(inline="always")
def _weights(p, i, a, rank):
    """``p[i, a .. a + 3]``, zero past ``rank``: a zero weight adds exact zeros."""
    n = min(4, rank - a)
    zero = np.float32(0)
    return p[i, a], (p[i, a + 1] if n > 1 else zero), (p[i, a + 2] if n > 2 else zero), (p[i, a + 3] if n > 3 else zero)


@_jit(fastmath=_SUMS)
def add_project(m, g, q_t, p):
    """PowerSGD's first pass, row by row: ``M += g`` and ``P = M·Q`` (``q_t`` is ``Qᵀ``, ``rank × cols``); four
    rank columns per pass over the row (four sums at once), the addition in the first."""
    rows, cols = m.shape
    rank = q_t.shape[0]
    for i in range(rows):
        for a in range(0, rank, 4):
            b0, b1, b2, b3 = _columns(a, rank)
            s0, s1, s2, s3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
            if a == 0:
                for j in range(cols):
                    v = m[i, j] + g[i, j]
                    m[i, j] = v
                    s0 += v * q_t[b0, j]
                    s1 += v * q_t[b1, j]
                    s2 += v * q_t[b2, j]
                    s3 += v * q_t[b3, j]
            else:
                for j in range(cols):
                    v = m[i, j]
                    s0 += v * q_t[b0, j]
                    s1 += v * q_t[b1, j]
                    s2 += v * q_t[b2, j]
                    s3 += v * q_t[b3, j]
            for k, s in enumerate((s0, s1, s2, s3)):
                if a + k < rank:
                    p[i, a + k] = s


@_jit(fastmath=_SUMS)
def project_back(p, m, q_t):
    """``Qᵀ = P̂ᵀ·M`` into ``q_t`` (``rank × cols``), reading ``M`` once, four rows at a time (a quarter of the loads
    and stores of ``q_t`` that one row at a time takes)."""
    rows, cols = m.shape
    rank = p.shape[1]
    q_t[:] = 0
    whole = rows // 4 * 4
    for i in range(0, whole, 4):
        for a in range(rank):
            p0, p1, p2, p3 = p[i, a], p[i + 1, a], p[i + 2, a], p[i + 3, a]
            for j in range(cols):
                q_t[a, j] += p0 * m[i, j] + p1 * m[i + 1, j] + p2 * m[i + 2, j] + p3 * m[i + 3, j]
    for i in range(whole, rows):
        for a in range(rank):
            pa = p[i, a]
            for j in range(cols):
                q_t[a, j] += pa * m[i, j]


@_jit(inline="always")
def _mix(q_t, j, rows, weights):
    """``Σₖ weights[k]·q_t[rows[k], j]`` over a group of four."""
    return (
        weights[0] * q_t[rows[0], j]
        + weights[1] * q_t[rows[1], j]
        + weights[2] * q_t[rows[2], j]
        + weights[3] * q_t[rows[3], j]
    )


@_jit(fastmath=_SUMS)
def residual_and_result(m, p, q_local_t, q_mean_t, out):
    """PowerSGD's last pass, row by row: ``M ← M − P̂·Q_localᵀ`` (the residual) and ``out = P̂·Q̄ᵀ`` (the averaged
    gradient), four rank columns per pass over the row: one pass for a rank up to four (each group's product is
    subtracted whole, so for a larger rank ``M − s₁ − s₂`` rather than ``M − (s₁ + s₂)``)."""
    rows, cols = m.shape
    rank = p.shape[1]
    for i in range(rows):
        for a in range(0, rank, 4):
            weights, group = _weights(p, i, a, rank), _columns(a, rank)
            if a == 0:
                for j in range(cols):
                    m[i, j] -= _mix(q_local_t, j, group, weights)
                    out[i, j] = _mix(q_mean_t, j, group, weights)
            else:
                for j in range(cols):
                    m[i, j] -= _mix(q_local_t, j, group, weights)
                    out[i, j] += _mix(q_mean_t, j, group, weights)
