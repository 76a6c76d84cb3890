"""Weight initialisation schemes by name; biases start at zero. Fans of convolutions count the kernel:
fan_in = C_in·k_h·k_w, fan_out = C_out·k_h·k_w."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SCHEMES = ("xavier_normal", "xavier_uniform", "he_normal", "he_uniform", "normal", "orthogonal", "default")


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear (out, in) or Conv (out, in, *kernel) weight."""
    if weight.ndim < 2:
        raise ValueError(f"fans need a weight with at least 2 dimensions, got shape {tuple(weight.shape)}.")
    receptive = math.prod(weight.shape[2:])
    return weight.shape[1] * receptive, weight.shape[0] * receptive


@torch.no_grad()
def init_tensor(weight: torch.Tensor, scheme: str, *, mode: str = "fan_in", std: float = 0.01) -> None:
    """Initialise one weight in place.

    ``xavier_*``: Var = 2/(fan_in + fan_out) (Glorot & Bengio 2010); ``he_*``: Var = 2/fan (He et al. 2015, ``mode``
    picks fan_in or fan_out); ``normal``: N(0, std²); ``orthogonal``: a (semi-)orthogonal matrix of the flattened
    weight. Normal schemes draw N(0, Var); uniform ones U(−a, a) with a = √(3·Var).
    """
    fan_in, fan_out = fans(weight)
    if scheme in ("xavier_normal", "xavier_uniform"):
        var = 2.0 / (fan_in + fan_out)
    elif scheme in ("he_normal", "he_uniform"):
        var = 2.0 / (fan_in if mode == "fan_in" else fan_out)
    elif scheme == "normal":
        weight.normal_(0.0, std)
        return
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight)
        return
    else:
        raise ValueError(f"`init` must be one of {SCHEMES}, got {scheme!r}.")
    if scheme.endswith("normal"):
        weight.normal_(0.0, math.sqrt(var))
    else:
        bound = math.sqrt(3.0 * var)
        weight.uniform_(-bound, bound)


@torch.no_grad()
def init_weights(module: nn.Module, scheme: str, *, mode: str = "fan_in", std: float = 0.01) -> nn.Module:
    """Initialise every Linear and Conv weight of ``module`` with ``scheme`` and set their biases to zero;
    ``default`` keeps torch's own initialisation. Returns ``module``.

    Example::

        >>> layer = init_weights(nn.Linear(512, 512), "he_normal")
        >>> round(layer.weight.var().item() * 512, 1)  # Var = 2 / fan_in
        2.0
    """
    if scheme not in SCHEMES:
        raise ValueError(f"`init` must be one of {SCHEMES}, got {scheme!r}.")
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"`mode` must be 'fan_in' or 'fan_out', got {mode!r}.")
    if std <= 0:
        raise ValueError(f"`std` must be > 0, got {std!r}.")
    if scheme == "default":
        return module
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            parametrized: Any = getattr(layer, "parametrizations", None)
            if parametrized is not None:  # weight norm: initialise v, then g = ‖v‖ so that w = v
                direction = parametrized.weight.original1
                init_tensor(direction, scheme, mode=mode, std=std)
                dims = tuple(range(1, direction.ndim))
                parametrized.weight.original0.copy_(direction.norm(dim=dims, keepdim=True))
            else:
                init_tensor(layer.weight, scheme, mode=mode, std=std)
            if layer.bias is not None:
                layer.bias.zero_()
    return module
