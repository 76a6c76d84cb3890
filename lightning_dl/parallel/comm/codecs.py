"""The ``int8`` and ``sign`` exchanges of ``quantized_hook``, one bucket at a time: ``encode`` (``c = g + e``, the
codes and scales into this rank's message) and ``finish`` (after the all-gather: the new residual and the mean of
the ranks' decoded messages), written with torch operations (any device) and with the fused CPU loops of
``kernels.py``; ``CODECS`` maps ``(compressor, fused)`` to the pair. ``loops`` and ``as_numpy`` serve the fused
PowerSGD passes of ``hooks.py`` too.
"""

from types import ModuleType

import numpy as np
import torch

from lightning_dl.parallel.comm.compressors import (
    int8_decode_,
    int8_quantize_,
    int8_scale,
    pack_bits_,
    sign_bits_,
    sign_decode_,
)
from lightning_dl.parallel.comm.workspace import CHUNK, BucketWorkspace


def int8_encode(ws: BucketWorkspace, out: torch.Tensor) -> None:
    """``c = g + e`` in the residual buffer, this rank's codes and scales into the message, its decoded message
    ``q·s`` over the gradient in ``out`` (no longer needed), then ``e ← c − q·s`` (exact: Sterbenz)."""
    ws.residual.add_(out)
    for i in range(len(ws.names)):
        c = ws.view(ws.residual, i)
        ws.scales[i] = int8_scale(c)
        int8_quantize_(c, ws.scales[i], ws.codes(ws.message, i), ws.view(out, i))
    ws.residual.sub_(out)


def int8_finish(ws: BucketWorkspace, out: torch.Tensor, world: int, me: int) -> None:
    """The mean of the ranks' decoded messages into ``out`` (which holds this rank's own ``q·s``)."""
    heads = [r[: 4 * len(ws.names)].view(torch.float32) for r in ws.received]
    for i in range(len(ws.names)):
        target, scratch = ws.view(out, i), ws.view(ws.scratch, i)
        if world == 2:
            target.add_(int8_decode_(ws.codes(ws.received[1 - me], i), heads[1 - me][i], scratch))
            continue
        for r in range(world):
            int8_decode_(ws.codes(ws.received[r], i), heads[r][i], target if r == 0 else scratch)
            if r:
                target.add_(scratch)
    out.div_(world)


def _units(bits: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """The unit signs σ = 2·bit − 1 (exactly ±1) of 0/1 ``bits``, in ``buffer``."""
    units = buffer[: bits.numel()]
    units.copy_(bits.view(torch.uint8))
    return units.mul_(2.0).sub_(1.0)


def sign_encode(ws: BucketWorkspace, out: torch.Tensor) -> None:
    """``c = g + e`` in the residual buffer, the signs ``c >= 0`` packed into the message and ``s = c·σ / n``
    (= ‖c‖₁ / n) into its scales, in chunks that stay in cache while ``c`` is read once."""
    for i, n in enumerate(ws.numels):
        c_all, g_all, bits_all, total = ws.view(ws.residual, i), ws.view(out, i), ws.sign_bits(i), 0.0
        for lo in range(0, n, CHUNK):
            c, bits = c_all[lo : lo + CHUNK], bits_all[lo : lo + CHUNK]
            c.add_(g_all[lo : lo + CHUNK])
            sign_bits_(c, bits)
            total += float(torch.dot(c, _units(bits, ws.units)))
        ws.scales[i] = total / n if n else 0.0
    pack_bits_(ws.bits, ws.words, ws.message[ws.code_offsets[0] :])


def sign_finish(ws: BucketWorkspace, out: torch.Tensor, world: int, me: int) -> None:
    """Per chunk: ``e ← c − s·σ`` (exact: ``s·σ`` is ``±s``), and the mean of the ranks' ``s_r·σ_r`` into ``out``;
    with two ranks ``(s_o/2)·σ_o + (s/2)·σ`` (halving is exact), in one pass over ``out``."""
    heads = [r[: 4 * len(ws.names)].view(torch.float32) for r in ws.received]
    for i, n in enumerate(ws.numels):
        c_all, bits_all, out_all, s = ws.view(ws.residual, i), ws.sign_bits(i), ws.view(out, i), float(ws.scales[i])
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            units, decoded, codes = (
                _units(bits_all[lo:hi], ws.units),
                ws.decoded[: hi - lo],
                slice(lo // 8, -(-hi // 8)),
            )
            c_all[lo:hi].sub_(units, alpha=s)
            if world == 2:
                sign_decode_(ws.codes(ws.received[1 - me], i)[codes], heads[1 - me][i] / 2, decoded, ws.index)
                torch.add(decoded, units, alpha=s / 2, out=out_all[lo:hi])
                continue
            for r in range(world):
                term = out_all[lo:hi] if r == 0 else decoded
                sign_decode_(ws.codes(ws.received[r], i)[codes], heads[r][i], term, ws.index)
                if r:
                    out_all[lo:hi].add_(term)
    if world != 2:
        out.div_(world)


def fused_int8_encode(ws: BucketWorkspace, out: torch.Tensor) -> None:
    """``int8_encode`` with the codes and ``e`` in one fused pass per tensor; ``out`` is left to
    ``fused_int8_finish``."""
    ws.residual.add_(out)
    for i in range(len(ws.names)):
        c = ws.view(ws.residual, i)
        ws.scales[i] = int8_scale(c)
        loops().int8_quantize(
            as_numpy(c), np.float32(float(ws.scales[i])), as_numpy(ws.codes(ws.message, i).view(torch.int8))
        )


def fused_int8_finish(ws: BucketWorkspace, out: torch.Tensor, world: int, me: int) -> None:
    """The mean of every rank's ``q·s`` (this rank's own from its message too) into ``out``: one pass."""
    scales = as_numpy(ws.received_scales())
    for i in range(len(ws.names)):
        codes, mean = as_numpy(ws.received_codes(i).view(torch.int8)), as_numpy(ws.view(out, i))
        if world == 2:
            loops().int8_finish_pair(codes[0], codes[1], scales[i, 0], scales[i, 1], mean)
        else:
            loops().int8_finish(codes, scales[i], mean)


def fused_sign_encode(ws: BucketWorkspace, out: torch.Tensor) -> None:
    """``sign_encode`` in one fused pass per tensor (``c``, its packed signs and ``‖c‖₁``), whole 64-bit words of
    signs first, then the last ``n mod 64`` elements. The last step's residual ``c − s·σ``, left in the message by
    ``fused_sign_finish``, is taken off on the way."""
    for i, n in enumerate(ws.numels):
        s = np.float32(float(ws.scales[i]) if ws.pending[i] else 0.0)
        ws.pending[i] = False
        c, g, codes = as_numpy(ws.view(ws.residual, i)), as_numpy(ws.view(out, i)), as_numpy(ws.codes(ws.message, i))
        bulk = n // 64 * 64
        total = loops().sign_encode_words(c[:bulk], g[:bulk], codes[: bulk // 8].view(np.uint64), s) if bulk else 0.0
        if n > bulk:
            total += loops().sign_encode(c[bulk:], g[bulk:], codes[bulk // 8 :], s)
        ws.scales[i] = total / n if n else 0.0


def fused_sign_finish(ws: BucketWorkspace, out: torch.Tensor, world: int, me: int) -> None:
    """The mean of the ranks' ``s·σ`` into ``out``, one pass per tensor: with two ranks whole 64-bit words of signs at
    a time, then the last ``n mod 64`` elements. This rank's residual ``c − s·σ`` is not written: its message keeps
    ``s`` and σ for the next ``fused_sign_encode`` to take it off on the way (``BucketWorkspace.settle`` writes it
    out, with the same bits, for whatever reads it first), one read and one write of ``c`` fewer per step."""
    scales = as_numpy(ws.received_scales())
    for i, n in enumerate(ws.numels):
        codes, mean = as_numpy(ws.received_codes(i)), as_numpy(ws.view(out, i))
        bulk = n // 64 * 64 if world == 2 else 0
        if bulk:
            words = codes[:, : bulk // 8].view(np.uint64)
            s_me, s_other = scales[i, me], scales[i, 1 - me]
            loops().sign_finish_pair(words[me], words[1 - me], s_me, s_other, mean[:bulk])
        loops().sign_finish(codes[:, bulk // 8 :], scales[i], me, mean[bulk:], loops().SIGNS)
        ws.pending[i] = True


CODECS = {  # (compressor, fused): (encode, finish)
    ("int8", False): (int8_encode, int8_finish),
    ("sign", False): (sign_encode, sign_finish),
    ("int8", True): (fused_int8_encode, fused_int8_finish),
    ("sign", True): (fused_sign_encode, fused_sign_finish),
}


def loops() -> ModuleType:
    """``kernels.py``, imported on first use: numba takes about 0.3 s to import, which a process without a compressed
    CPU bucket need not pay."""
    from lightning_dl.parallel.comm import kernels

    return kernels


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The NumPy view of a CPU tensor (shared memory), for the fused loops."""
    return tensor.detach().numpy()
