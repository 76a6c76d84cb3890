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

import torch
from torch import nn

COMPRESSORS = ("powersgd", "int8", "sign")
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
# row b: the eight signs (+1 for a set bit, -1 otherwise) that byte b stands for; decoding is one lookup
_SIGN_TABLE = ((torch.arange(256).view(-1, 1) >> torch.arange(8)) & 1).float() * 2 - 1


def int8_encode(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (``int8`` values viewed as ``uint8``, one byte per element) and the float32 scale ``max|c| / 127``.

    Example::

        >>> codes, scale = int8_encode(torch.tensor([1.27, -0.5, 0.0]))
        >>> codes.view(torch.int8).tolist(), round(scale.item(), 6)
        ([127, -50, 0], 0.01)
    """
    flat = c.detach().reshape(-1).float()
    scale = flat.abs().max().reshape(1) / 127.0 if flat.numel() else torch.zeros(1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(flat / safe).clamp_(-127, 127).to(torch.int8)
    return codes.view(torch.uint8), scale


def int8_decode(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q·s``: the float32 values that ``int8_encode`` stands for (flat)."""
    return codes.view(torch.int8).float() * scale


def sign_encode(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs packed eight to a byte (bit set: ``c >= 0``) and the float32 scale ``‖c‖₁ / n``.

    Example::

        >>> codes, scale = sign_encode(torch.tensor([0.5, -1.0, 0.0, 2.5]))
        >>> codes.tolist(), scale.item()
        ([13], 1.0)
    """
    flat = c.detach().reshape(-1).float()
    scale = flat.abs().mean().reshape(1) if flat.numel() else torch.zeros(1)
    bits = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8, device=flat.device)
    bits[: flat.numel()] = (flat >= 0).to(torch.uint8)
    codes = (bits.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)
    return codes, scale


def sign_decode(codes: torch.Tensor, scale: torch.Tensor, numel: int) -> torch.Tensor:
    """``s·sign``: the ``numel`` float32 values that ``sign_encode`` stands for (flat)."""
    signs = _SIGN_TABLE.to(codes.device)[codes.long()].view(-1)[:numel]
    return signs * scale


def orthogonalize_(p: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
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
