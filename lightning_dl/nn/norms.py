"""Normalization layers by name. ``make_norm(kind, dim)`` builds the layer that follows a Linear (``conv=False``)
or a Conv2d (``conv=True``) of ``dim`` features; ``weight`` normalization instead reparametrises that layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

NORMS = ("batch", "layer", "rms", "group", "weight", "none")


class RMSNorm2d(nn.Module):
    """RMS normalization over channels and positions of each sample: ``x / sqrt(mean(x²) + eps) · γ`` (γ per
    channel), the conv counterpart of ``torch.nn.RMSNorm``."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(self.eps).rsqrt()
        return x * rms * self.weight.view(1, -1, 1, 1)


def make_norm(kind: str, dim: int, *, conv: bool = False, groups: int = 8) -> nn.Module:
    """The normalization ``kind`` for ``dim`` features (channels when ``conv``).

    - ``batch``: BatchNorm; normalises each feature over the batch with batch statistics in training and running
      averages in evaluation, so ``model.train()`` and ``model.eval()`` give different outputs for the same input.
    - ``layer``: LayerNorm over the features of each sample (GroupNorm with one group for convolutions).
    - ``rms``: RMSNorm (no centring).
    - ``group``: GroupNorm with ``groups`` groups (``dim`` must be divisible).
    - ``weight`` and ``none``: the identity here; for ``weight`` call :func:`apply_weight_norm` on the layer.

    Example::

        >>> type(make_norm("layer", 16)).__name__, type(make_norm("layer", 16, conv=True)).__name__
        ('LayerNorm', 'GroupNorm')
    """
    if kind not in NORMS:
        raise ValueError(f"`norm` must be one of {NORMS}, got {kind!r}.")
    if dim < 1:
        raise ValueError(f"`dim` must be >= 1, got {dim!r}.")
    if kind == "batch":
        return nn.BatchNorm2d(dim) if conv else nn.BatchNorm1d(dim)
    if kind == "layer":
        return nn.GroupNorm(1, dim) if conv else nn.LayerNorm(dim)
    if kind == "rms":
        return RMSNorm2d(dim) if conv else nn.RMSNorm(dim)
    if kind == "group":
        if dim % groups:
            raise ValueError(f"`group` norm needs `dim` ({dim}) divisible by `groups` ({groups}).")
        return nn.GroupNorm(groups, dim)
    return nn.Identity()


def apply_weight_norm(layer: nn.Module, kind: str) -> nn.Module:
    """With ``kind="weight"``, reparametrise ``layer.weight`` as ``g·v/‖v‖`` (one ``g`` per output unit, through
    ``torch.nn.utils.parametrizations.weight_norm``); any other kind returns ``layer`` unchanged."""
    return weight_norm(layer) if kind == "weight" else layer
