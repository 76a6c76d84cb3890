"""Gradient compressors as pure tensor rules: per-tensor scaled int8, 1-bit sign with scale, and PowerSGD's low-rank
power step; each one used with error feedback (the part a step could not send is added to the next gradient).

Rules (``c`` is the gradient plus the residual of the previous step, ``n`` its number of elements):

- ``int8``: ``s = max|c| / 127``, ``q = round(c / s)`` in ``[-127, 127]`` (half to even), sent ``q·s``;
- ``sign``: ``s = ‖c‖₁ / n``, sent ``s·sign(c)`` with ``sign(0) = +1`` (EF-signSGD, Karimireddy et al. 2019);
- ``powersgd``: a matrix ``M`` (the tensor as ``shape[0] × rest``) and the previous ``Q``: ``P = MQ``, all-reduced and
  orthogonalised to ``P̂``, ``Q = MᵀP̂``, sent ``P̂Qᵀ`` (Vogels et al. 2019).

The new residual is ``c − sent``; for ``int8`` it is exact in floating point (Sterbenz: ``sent`` and ``c`` are
within a factor of two, or ``sent`` is zero), so ``sent + residual == c`` bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

COMPRESSORS = ("powersgd", "int8", "sign")
# row b: the eight signs (+1 for a set bit, -1 otherwise) that byte b stands for; decoding is one lookup
SIGN_TABLE = ((torch.arange(256).view(-1, 1) >> torch.arange(8)) & 1).float() * 2 - 1
# eight 0/1 bytes read as one little-endian int64 x: byte 7 of x·PACK holds byte i of x as bit i (the products of
# the eight bytes with the eight powers of two land on 64 distinct bit positions: no carries)
PACK = 0x0102040810204080


def int8_scale(c: torch.Tensor) -> torch.Tensor:
    """``max|c| / 127`` as a 0-dimensional float32 tensor (zero for an empty ``c``), in one pass over ``c``."""
    if not c.numel():
        return torch.zeros((), device=c.device)
    low, high = torch.aminmax(c)
    return torch.maximum(high, low.neg()).float() / 127.0


def int8_quantize_(c: torch.Tensor, scale: torch.Tensor, codes: torch.Tensor, sent: torch.Tensor) -> None:
    """Write ``q = round(c / scale)`` (half to even) into ``codes`` (int8 values as ``uint8``) and ``q·scale`` into
    the float32 ``sent``, without allocating. ``|c / scale| <= 127`` by the choice of ``scale``: no clamp."""
    if float(scale) == 0.0:
        codes.zero_()
        sent.zero_()
        return
    torch.div(c, scale, out=sent)
    sent.round_()
    codes.view(torch.int8).copy_(sent)
    sent.mul_(scale)  # q·s from the rounded floats: the same numbers as int8 → float32 → · s, one pass fewer


def int8_encode(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (``int8`` values viewed as ``uint8``, one byte per element) and the float32 scale ``max|c| / 127``.

    Example::

        >>> codes, scale = int8_encode(torch.tensor([1.27, -0.5, 0.0]))
        >>> codes.view(torch.int8).tolist(), round(scale.item(), 6)
        ([127, -50, 0], 0.01)
    """
    flat = c.detach().reshape(-1).float()
    scale = int8_scale(flat)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    int8_quantize_(flat, scale, codes, torch.empty_like(flat))
    return codes, scale.reshape(1)


def int8_decode_(codes: torch.Tensor, scale: torch.Tensor | float, out: torch.Tensor) -> torch.Tensor:
    """Write ``q·s`` into the float32 ``out``: a converting copy, then a multiply in place (a multiply that promotes
    int8 to float32 on the fly is about five times slower on CPU)."""
    out.copy_(codes.view(torch.int8))
    return out.mul_(scale)


def int8_decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q·s``: the float32 values that ``int8_encode`` stands for (flat)."""
    return int8_decode_(codes, scale.reshape(()), torch.empty(codes.numel(), device=codes.device))


def sign_bits_(c: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Write ``c >= 0`` into the bool tensor ``bits`` (NumPy's comparison on CPU: about five times faster than
    torch's comparisons that write bool)."""
    if c.device.type == "cpu":
        np.greater_equal(c.detach().numpy(), 0, out=bits.numpy())
    else:
        torch.ge(c, 0, out=bits)
    return bits


def pack_bits_(bits: torch.Tensor, words: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Pack 0/1 bytes eight to a byte: byte ``8j + i`` of ``bits`` becomes bit ``i`` of ``out[j]``. ``bits`` (bool)
    has ``8·k`` elements, ``out`` (uint8) ``k``. NumPy's ``packbits`` on CPU; elsewhere one integer multiply per
    eight bytes (``PACK``, into the int64 scratch ``words`` of ``k`` elements) and a strided copy of the top bytes
    (little-endian devices).

    Example::

        >>> bits = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
        >>> pack_bits_(bits, torch.empty(2, dtype=torch.int64), torch.empty(2, dtype=torch.uint8)).tolist()
        [141, 2]
    """
    if bits.device.type == "cpu":
        out.numpy()[:] = np.packbits(bits.numpy(), bitorder="little")
        return out
    return pack_bits_multiply_(bits, words, out)


def pack_bits_multiply_(bits: torch.Tensor, words: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``pack_bits_`` with torch operations only (any device): ``x·PACK`` per eight bytes, each product's top byte."""
    torch.mul(bits.view(torch.uint8).view(torch.int64), PACK, out=words)
    return out.copy_(words.view(torch.uint8)[7::8])


def sign_decode_(
    codes: torch.Tensor, scale: torch.Tensor | float, out: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Write ``scale·sign`` of the ``out.numel()`` signs packed in ``codes`` into the flat float32 ``out``: one
    lookup of eight values per byte (``index``: int32 scratch of at least ``codes.numel()`` elements)."""
    n, full = out.numel(), out.numel() // 8
    table = SIGN_TABLE.to(out.device) * scale
    idx = index[: codes.numel()]
    idx.copy_(codes)
    torch.index_select(table, 0, idx[:full], out=out[: 8 * full].view(full, 8))
    if n > 8 * full:
        out[8 * full :] = table[idx[full], : n - 8 * full]
    return out


def sign_encode(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs packed eight to a byte (bit set: ``c >= 0``) and the float32 scale ``‖c‖₁ / n``.

    Example::

        >>> codes, scale = sign_encode(torch.tensor([0.5, -1.0, 0.0, 2.5]))
        >>> codes.tolist(), scale.item()
        ([13], 1.0)
    """
    flat = c.detach().reshape(-1).float()
    k = -(-flat.numel() // 8)
    bits = torch.zeros(8 * k, dtype=torch.bool, device=flat.device)
    sign_bits_(flat, bits[: flat.numel()])
    codes = torch.empty(k, dtype=torch.uint8, device=flat.device)
    pack_bits_(bits, torch.empty(k, dtype=torch.int64, device=flat.device), codes)
    scale = flat.abs().sum() / flat.numel() if flat.numel() else torch.zeros((), device=flat.device)
    return codes, scale.reshape(1)


def sign_decode(codes: torch.Tensor, scale: torch.Tensor, numel: int) -> torch.Tensor:
    """``s·sign``: the ``numel`` float32 values that ``sign_encode`` stands for (flat)."""
    out = torch.empty(numel, device=codes.device)
    index = torch.empty(codes.numel(), dtype=torch.int32, device=codes.device)
    return sign_decode_(codes, scale.reshape(()), out, index)


EPS = 1e-8
"""Added to a column's norm before PowerSGD's Gram-Schmidt divides by it: a zero column stays zero."""


def orthogonalize_(p: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``p`` in place (PowerSGD's ``P̂``); a zero column stays zero."""
    for i in range(p.shape[1]):
        col = p[:, i]
        if i:
            col -= p[:, :i] @ (p[:, :i].T @ col)
        col /= col.norm() + eps
    return p


def compressible(shape: torch.Size, rank: int) -> bool:
    """PowerSGD sends a tensor as ``P`` and ``Q`` only when that is smaller: ``rank·(n + m) < n·m``."""
    if len(shape) < 2:
        return False
    n, m = shape[0], shape.numel() // shape[0]
    return rank * (n + m) < n * m


def initial_q(shape: torch.Size, rank: int, seed: int) -> torch.Tensor:
    """The first ``Q`` (``m × rank``, standard normal from ``seed``): the same on every rank, then warm-started."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape.numel() // shape[0], rank, generator=generator)


def check_compressor(compressor: str, rank: int, start_iter: int) -> None:
    """Validate the compressor's arguments (name, PowerSGD ``rank >= 1``, ``start_iter >= 0``)."""
    if compressor not in COMPRESSORS:
        raise ValueError(f"`compressor` must be one of {COMPRESSORS}, got {compressor!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` (PowerSGD's approximation rank) must be an integer >= 1, got {rank!r}.")
    if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
        raise ValueError(f"`start_iter` must be an integer >= 0, got {start_iter!r}.")


def check_dense_gradients(module: nn.Module, what: str) -> None:
    """Compressors work on dense gradient buckets: a module with sparse gradients is an error naming it."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Embedding | nn.EmbeddingBag) and sub.sparse:
            raise ValueError(
                f"{what} compresses dense gradients, but module {name!r} ({type(sub).__name__}) has sparse=True "
                "(sparse gradients); valid: sparse=False, or strategy='ddp'."
            )
