"""Fused CPU loops for the compressed hooks, compiled by numba: each rule in one or two passes over the gradient where
torch's CPU operations take one pass per operation (about ten per element for the sign rule). Same rules and, for
``int8`` and ``sign``, the same float32 arithmetic as the torch path of ``codecs.py``, which devices other than the CPU
run; ``tests/parallel/comm/test_kernels.py`` checks each loop against its rule, ``test_workspace.py`` both paths.

Every function takes NumPy views of CPU tensors (``tensor.numpy()`` shares memory) and writes in place. Compiled once
per machine (about 6 s for all) and cached on disk beside this file (0.3–2.6 s to load); ``hooks.compile_fused``
does it when a strategy configures DDP, so that no training step pays for it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# reassociation lets LLVM vectorise sums (an L1 norm, a dot product): used only where the order of summation is free
_SUMS = {"reassoc", "nsz", "contract"}


def _jit(fastmath: bool | set[str] = False, inline: Literal["never", "always"] = "never") -> Any:
    return njit(cache=True, nogil=True, error_model="numpy", boundscheck=False, fastmath=fastmath, inline=inline)


SIGNS = (((np.arange(256).reshape(-1, 1) >> np.arange(8)) & 1) * 2 - 1).astype(np.float32)
"""Row ``b``: the eight unit signs (+1 for a set bit, −1 otherwise) that the byte ``b`` stands for."""


def _minus_typed(typingctx, a, b):
    """``a − b`` rounded as written: the subtraction carries only ``nsz`` (numba's fastmath pass flags only operations
    without flags), so LLVM cannot reassociate it with what is added next (see ``_take``)."""

    def codegen(context, builder, signature, args):
        return builder.fsub(args[0], args[1], flags=("nsz",))

    return a(a, b), codegen


_minus: Any = intrinsic(_minus_typed)


def _stream_typed(typingctx, dst, src):
    """``dst[:] = src`` with streaming (non-temporal) stores for the 64-byte-aligned middle of ``dst``: a line written
    whole goes to memory without being read into the cache first, which a plain store does (a write-only pass over
    25 MB of gradient then costs what a copy does). Both 1-D, contiguous, float32, of one length; callers compute a
    row into a small buffer that stays in L1 and stream it out, so the arithmetic is the plain loop's. ``_fence``
    orders the streamed stores before anything another thread reads."""
    row = types.Array(types.float32, 1, "C")
    if dst != row or src != row:
        return None

    def codegen(context, builder, signature, args):
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[1])(context, builder, args[1])
        n = builder.extract_value(d.shape, 0)
        intp = n.type
        vector = ir.VectorType(ir.FloatType(), 16)
        misaligned = builder.and_(builder.ptrtoint(d.data, intp), intp(63))
        head = builder.udiv(builder.and_(builder.sub(intp(64), misaligned), intp(63)), intp(4))
        head = builder.select(builder.icmp_unsigned("<", n, head), n, head)
        body = builder.udiv(builder.sub(n, head), intp(16))
        tail = builder.add(head, builder.mul(body, intp(16)))
        streaming = builder.module.add_metadata([ir.IntType(32)(1)])
        with cgutils.for_range(builder, head, intp=intp) as loop:
            builder.store(builder.load(builder.gep(s.data, [loop.index])), builder.gep(d.data, [loop.index]))
        with cgutils.for_range(builder, body, intp=intp) as loop:
            i = builder.add(head, builder.mul(loop.index, intp(16)))
            value = builder.load(builder.bitcast(builder.gep(s.data, [i]), vector.as_pointer()), align=4)
            store = builder.store(value, builder.bitcast(builder.gep(d.data, [i]), vector.as_pointer()), align=64)
            store.set_metadata("nontemporal", streaming)
        with cgutils.for_range(builder, builder.sub(n, tail), intp=intp) as loop:
            i = builder.add(tail, loop.index)
            builder.store(builder.load(builder.gep(s.data, [i])), builder.gep(d.data, [i]))
        return context.get_dummy_value()

    return types.void(dst, src), codegen


_stream: Any = intrinsic(_stream_typed)


def _fence_typed(typingctx):
    """A sequentially consistent fence (``mfence`` on x86): streamed stores are weakly ordered until one."""

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


_fence: Any = intrinsic(_fence_typed)


@_jit(inline="always")
def _unit(bits, k):
    """The unit sign (±1.0) that bit ``k`` of ``bits`` stands for."""
    return np.float32((np.uint64(bits) >> np.uint64(k)) & np.uint64(1)) * np.float32(2) - np.float32(1)


@_jit(inline="always")
def _left(value, bits, k, s):
    """``value − s·σ`` with σ bit ``k`` of ``bits``: the residual a sign message left (``s·σ`` is ``±s``, exact), the
    one expression that the encodes take off on the way and ``sign_settle`` writes out."""
    return _minus(value, _unit(bits, k) * s)


@_jit(fastmath=_SUMS)
def sign_encode(c, g, packed, s):
    """``c ← (c − s·σ) + g``, σ the unit signs that ``packed`` holds on entry (this rank's last message, whose
    residual is still to be taken off; ``s = 0`` takes off zeros), then bit ``k`` of ``packed[j]`` set where
    ``c[8j + k] >= 0`` (padding bits zero); returns ``‖c‖₁`` (float64; partial sums of eight in float32). Eight
    elements a byte; ``sign_encode_words`` does 64 at a time with the same arithmetic."""
    n = c.size
    total = 0.0
    for j in range(-(-n // 8)):
        old, byte, part, b = packed[j], np.uint8(0), np.float32(0), 8 * j
        for k in range(min(8, n - b)):
            v = _left(c[b + k], old, k, s) + g[b + k]
            c[b + k] = v
            byte |= np.uint8(v >= 0) << k
            part += abs(v)
        total += float(part)
        packed[j] = byte
    return total


@_jit(fastmath=_SUMS)
def sign_encode_words(c, g, words, s):
    """``sign_encode`` for whole 64-bit words of signs (element ``64j + k`` is bit ``k`` of ``words[j]``): a fixed
    trip count of 64 that LLVM vectorises; partial sums of 64."""
    total = 0.0
    for j in range(words.size):
        old, word, part, b = words[j], np.uint64(0), np.float32(0), 64 * j
        for k in range(64):
            v = _left(c[b + k], old, k, s) + g[b + k]
            c[b + k] = v
            word |= np.uint64(v >= 0) << np.uint64(k)
            part += abs(v)
        total += float(part)
        words[j] = word
    return total


@_jit()
def sign_settle(c, packed, s):
    """``c ← c − s·σ`` (σ from ``packed``): the residual that ``sign_encode`` would take off on the way, written out
    with the same bits (``s·σ`` is ``±s``, exact)."""
    for i in range(c.size):
        c[i] = _left(c[i], packed[i // 8], i % 8, s)


@_jit()
def sign_finish_pair(mine, other, s_me, s_other, out):
    """``sign_finish`` for two ranks on whole words: ``mine`` and ``other`` hold 64 signs per ``uint64`` (element
    ``64j + k`` is bit ``k`` of word ``j``), ``out`` 64 elements per word; a fixed trip count of 64 that LLVM
    vectorises, about three times faster than going byte by byte."""
    half_me, half_other = s_me / np.float32(2), s_other / np.float32(2)
    for j in range(mine.size):
        wm, wo, b = mine[j], other[j], 64 * j
        for k in range(64):
            out[b + k] = _unit(wo, k) * half_other + _unit(wm, k) * half_me


@_jit(inline="always")
def _sign_finish_two(out, b, count, half_me, half_other, bm, bo):
    for k in range(count):
        out[b + k] = half_other[bo, k] + half_me[bm, k]


@_jit()
def sign_finish(codes, scales, me, out, table):
    """``out ←`` the mean of the ranks' ``s_r·σ_r`` (``codes``: one row of packed signs per rank, ``scales``:
    float32, one per rank). With two ranks ``(s_o/2)·σ_o + (s_me/2)·σ_me`` (halving is exact, and ``a + b == b +
    a``: both ranks get the same bits); otherwise the sum in rank order, then divided. This rank's residual
    ``c − s_me·σ_me`` is left for its next ``sign_encode`` to take off (or ``sign_settle`` to write out)."""
    n = out.size
    full = n // 8
    world = codes.shape[0]
    if world == 2:
        half_me = table * (scales[me] / np.float32(2))
        half_other = table * (scales[1 - me] / np.float32(2))
        for j in range(full):  # eight at a time: a fixed trip count that LLVM vectorises
            _sign_finish_two(out, 8 * j, 8, half_me, half_other, codes[me, j], codes[1 - me, j])
        if n > 8 * full:
            bm, bo = codes[me, full], codes[1 - me, full]
            _sign_finish_two(out, 8 * full, n - 8 * full, half_me, half_other, bm, bo)
        return
    divisor = np.float32(world)
    for j in range(full + (n > 8 * full)):
        b = 8 * j
        for k in range(min(8, n - b)):
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


def _take_typed(typingctx, m, w0, l0, w1, l1, w2, l2, w3, l3):
    """``m − (w0·l0 + w1·l1 + w2·l2 + w3·l3)``, every operation rounded, in this order. The operations carry only the
    ``nsz`` flag: numba's fastmath pass flags only operations without flags, and ``nsz`` lets LLVM neither reassociate
    nor contract them. So a residual taken off on the way into the next step (``add_project``) and one written out
    for a checkpoint (``settle``) have the same bits, whatever the loops around them are vectorised into."""

    def codegen(context, builder, signature, args):
        m, w0, l0, w1, l1, w2, l2, w3, l3 = args
        exact = ("nsz",)
        t = builder.fmul(w0, l0, flags=exact)
        for w, col in ((w1, l1), (w2, l2), (w3, l3)):
            t = builder.fadd(t, builder.fmul(w, col, flags=exact), flags=exact)
        return builder.fsub(m, t, flags=exact)

    return m(m, w0, l0, w1, l1, w2, l2, w3, l3), codegen


_take: Any = intrinsic(_take_typed)


@_jit(inline="always")
def _take_group(row, p, i, a, l_t):
    """``row −= p[i, a .. a + 3]·l_t[a .. a + 3]`` (one group of four rank columns of the residual's factors)."""
    rank = l_t.shape[0]
    w0, w1, w2, w3 = _weights(p, i, a, rank)
    b0, b1, b2, b3 = _columns(a, rank)
    l0, l1, l2, l3 = l_t[b0], l_t[b1], l_t[b2], l_t[b3]
    for j in range(row.size):
        row[j] = _take(row[j], w0, l0[j], w1, l1[j], w2, l2[j], w3, l3[j])


@_jit(inline="always")
def _take_add(row, grad, j, w, l0, l1, l2, l3):
    """``row[j] ← (row[j] − w·l[j]) + grad[j]`` (``_take``, then the gradient), returned."""
    r = _take(row[j], w[0], l0[j], w[1], l1[j], w[2], l2[j], w[3], l3[j]) + grad[j]
    row[j] = r
    return r


@_jit(inline="always")
def _add_four(rows, grads, q, lt, weights):
    """Four rows of ``M``: each less its weights times ``Lᵀ`` (``lt``: four rows of ``Lᵀ``; zero weights take off
    zeros), plus its gradient row; returns their products with the four rows ``q`` of ``Qᵀ``. Four rows per pass
    load each element of ``Qᵀ`` and ``Lᵀ`` (64 KB for 2048 columns, more than L1 holds, so from L2) once for all
    four: 3.8–3.9 ms on the benchmark MLP against 4.5 two rows at a time. One loop whether or not a residual is
    pending, so that ``P`` gets the same bits either way."""
    x, y, z, t = rows
    gx, gy, gz, gt = grads
    u, v, w, h = weights
    q0, q1, q2, q3 = q
    l0, l1, l2, l3 = lt
    zero = np.float32(0)
    a0, a1, a2, a3, b0, b1, b2, b3 = zero, zero, zero, zero, zero, zero, zero, zero
    c0, c1, c2, c3, d0, d1, d2, d3 = zero, zero, zero, zero, zero, zero, zero, zero
    for j in range(x.size):
        e, f, g, k = q0[j], q1[j], q2[j], q3[j]
        r = _take_add(x, gx, j, u, l0, l1, l2, l3)
        a0, a1, a2, a3 = a0 + r * e, a1 + r * f, a2 + r * g, a3 + r * k
        r = _take_add(y, gy, j, v, l0, l1, l2, l3)
        b0, b1, b2, b3 = b0 + r * e, b1 + r * f, b2 + r * g, b3 + r * k
        r = _take_add(z, gz, j, w, l0, l1, l2, l3)
        c0, c1, c2, c3 = c0 + r * e, c1 + r * f, c2 + r * g, c3 + r * k
        r = _take_add(t, gt, j, h, l0, l1, l2, l3)
        d0, d1, d2, d3 = d0 + r * e, d1 + r * f, d2 + r * g, d3 + r * k
    return (a0, a1, a2, a3), (b0, b1, b2, b3), (c0, c1, c2, c3), (d0, d1, d2, d3)


@_jit(inline="always")
def _put(p, i, a, sums):
    """``p[i, a .. a + 3] = sums``, the columns up to the rank."""
    for k in range(4):
        if a + k < p.shape[1]:
            p[i, a + k] = sums[k]


@_jit(fastmath=_SUMS)
def add_project(m, g, q_t, p, l_t, pending):
    """PowerSGD's first pass, four rows at a time: ``M ← M − P̂·Lᵀ`` when ``pending`` (the last step's residual,
    left in factors: ``p`` holds that step's ``P̂`` on entry, ``l_t`` its ``Q_localᵀ``), ``M += g``, and ``P = M·Q``
    into ``p`` (``q_t`` is ``Qᵀ``, ``rank × cols``; ``l_t`` must be finite even when nothing is pending: zero
    weights multiply it). The groups of four rank columns are taken off last to first, the first in the same pass
    as the addition and the first four columns of ``P``; every further group of ``P`` takes a pass over the rows
    (in cache). Rows past the last multiple of four are paired with rows of zeros."""
    rows, cols = m.shape
    rank = q_t.shape[0]
    last = (rank - 1) // 4 * 4
    first = _columns(0, rank)
    q = (q_t[first[0]], q_t[first[1]], q_t[first[2]], q_t[first[3]])
    lt = (l_t[first[0]], l_t[first[1]], l_t[first[2]], l_t[first[3]])
    # the partners of the last rows (then their gradients), each a row of its own: rows that alias one another would
    # fail LLVM's run-time overlap check and send the group down the loop's scalar version, summing in another order
    spare = np.zeros((6, cols if rows % 4 else 0), dtype=m.dtype)
    no_weights = (np.float32(0), np.float32(0), np.float32(0), np.float32(0))
    for i in range(0, rows, 4):
        n = min(4, rows - i)
        x, y, z, t = (
            m[i],
            (m[i + 1] if n > 1 else spare[0]),
            (m[i + 2] if n > 2 else spare[1]),
            (m[i + 3] if n > 3 else spare[2]),
        )
        grads = (
            g[i],
            (g[i + 1] if n > 1 else spare[3]),
            (g[i + 2] if n > 2 else spare[4]),
            (g[i + 3] if n > 3 else spare[5]),
        )
        if pending:
            for a in range(last, 0, -4):
                for row in range(i, i + n):
                    _take_group(m[row], p, row, a, l_t)
        weights = (
            _weights(p, i, 0, rank) if pending else no_weights,
            _weights(p, i + 1, 0, rank) if pending and n > 1 else no_weights,
            _weights(p, i + 2, 0, rank) if pending and n > 2 else no_weights,
            _weights(p, i + 3, 0, rank) if pending and n > 3 else no_weights,
        )
        sums = _add_four((x, y, z, t), grads, q, lt, weights)
        for r in range(n):
            _put(p, i + r, 0, sums[r])
        for a in range(4, rank, 4):
            group = _columns(a, rank)
            for row in range(i, i + n):
                values = m[row]
                s0, s1, s2, s3 = np.float32(0), np.float32(0), np.float32(0), np.float32(0)
                for j in range(cols):
                    v = values[j]
                    s0 += v * q_t[group[0], j]
                    s1 += v * q_t[group[1], j]
                    s2 += v * q_t[group[2], j]
                    s3 += v * q_t[group[3], j]
                _put(p, row, a, (s0, s1, s2, s3))


@_jit()
def settle(m, p, l_t):
    """``M ← M − P̂·Lᵀ``: the residual that ``add_project`` would take off on the way, written out (for a checkpoint,
    or a new bucket layout) with the same bits."""
    last = (l_t.shape[0] - 1) // 4 * 4
    for i in range(m.shape[0]):
        for a in range(last, -4, -4):
            _take_group(m[i], p, i, a, l_t)


@_jit(fastmath=_SUMS)
def project_back(p, m, q_t):
    """``Qᵀ = P̂ᵀ·M`` into ``q_t`` (``rank × cols``), reading ``M`` once, four rows at a time: each pass over four
    rows updates four rows of ``Qᵀ`` at once, so every element of ``M`` is loaded once per group of four rank
    columns, and ``Qᵀ`` once per four rows of ``M``. Rows past the last four, and columns past a multiple of four
    of the rank, get zero weights (they add exact zeros)."""
    rows, cols = m.shape
    rank = p.shape[1]
    q_t[:] = 0
    zero = np.float32(0)
    for i in range(0, rows, 4):
        n = min(4, rows - i)
        r0, r1, r2, r3 = m[i], m[i + (n > 1)], m[i + 2 * (n > 2)], m[i + 3 * (n > 3)]
        for a in range(0, rank, 4):
            b0, b1, b2, b3 = _columns(a, rank)
            t0, t1, t2, t3 = q_t[b0], q_t[b1], q_t[b2], q_t[b3]
            x0, x1, x2, x3 = _weights(p, i, a, rank)
            y0, y1, y2, y3 = _weights(p, i + 1, a, rank) if n > 1 else (zero, zero, zero, zero)
            z0, z1, z2, z3 = _weights(p, i + 2, a, rank) if n > 2 else (zero, zero, zero, zero)
            w0, w1, w2, w3 = _weights(p, i + 3, a, rank) if n > 3 else (zero, zero, zero, zero)
            for j in range(cols):
                e, f, g, h = r0[j], r1[j], r2[j], r3[j]
                t0[j] += x0 * e + y0 * f + z0 * g + w0 * h
                t1[j] += x1 * e + y1 * f + z1 * g + w1 * h
                t2[j] += x2 * e + y2 * f + z2 * g + w2 * h
                t3[j] += x3 * e + y3 * f + z3 * g + w3 * h


@_jit(fastmath=_SUMS)
def result(p, q_t, out):
    """PowerSGD's last pass: ``out = P̂·Q̄ᵀ`` (the averaged gradient), row by row, four rank columns per pass over
    the row (one pass for a rank up to four), each row computed into a buffer that stays in L1 and streamed out
    (``_stream``: the 25 MB of gradient are written without being read first; 2.7 → 1.5 ms on the benchmark MLP)."""
    rows, cols = out.shape
    rank = p.shape[1]
    row = np.empty(cols, dtype=out.dtype)
    for i in range(rows):
        for a in range(0, rank, 4):
            w0, w1, w2, w3 = _weights(p, i, a, rank)
            b0, b1, b2, b3 = _columns(a, rank)
            q0, q1, q2, q3 = q_t[b0], q_t[b1], q_t[b2], q_t[b3]
            if a == 0:
                for j in range(cols):
                    row[j] = w0 * q0[j] + w1 * q1[j] + w2 * q2[j] + w3 * q3[j]
            else:
                for j in range(cols):
                    row[j] += w0 * q0[j] + w1 * q1[j] + w2 * q2[j] + w3 * q3[j]
        _stream(out[i], row)
    _fence()


@_jit(fastmath=_SUMS)
def orthogonalize(p, eps):
    """Gram-Schmidt on the columns of ``p`` (``rows × rank``) in place, as ``compressors.orthogonalize_``: column
    ``i`` less its projections on the columns before it (all taken from the column as it came), then divided by its
    norm plus ``eps`` (a zero column stays zero). Torch's small products cost about 0.3 ms a matrix in calls."""
    rows, rank = p.shape
    coef = np.empty(rank, dtype=p.dtype)
    for i in range(rank):
        if i:
            coef[:i] = 0
            for r in range(rows):
                for k in range(i):
                    coef[k] += p[r, k] * p[r, i]
            for r in range(rows):
                t = p[r, i]
                for k in range(i):
                    t -= p[r, k] * coef[k]
                p[r, i] = t
        total = np.float32(0)
        for r in range(rows):
            total += p[r, i] * p[r, i]
        scale = np.float32(1) / (np.float32(np.sqrt(total)) + np.float32(eps))
        for r in range(rows):
            p[r, i] *= scale
