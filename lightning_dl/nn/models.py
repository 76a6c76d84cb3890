"""Reference networks of the suite. Each exposes its layers as an ordered ``nn.Sequential`` so that pipeline
strategies can cut it into stages."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    """Build an activation by name: ``relu``, ``gelu``, ``tanh`` or ``silu``."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {name!r}.") from None


class MLP(nn.Sequential):
    """A multi-layer perceptron: ``Linear -> activation -> Dropout`` per hidden layer, then a ``Linear`` head.

    Args:
        in_features: size of each input sample.
        hidden_sizes: width of each hidden layer, in order (may be empty: a linear model).
        out_features: size of each output sample.
        activation: ``relu``, ``gelu``, ``tanh`` or ``silu``.
        dropout: dropout probability after each hidden activation, in [0, 1).

    Example::

        >>> net = MLP(64, [128, 128], 10)
        >>> net(torch.zeros(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        out_features: int,
        *,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        sizes = [in_features, *hidden_sizes, out_features]
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value!r}.")
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"every entry of `hidden_sizes` must be >= 1, got {list(hidden_sizes)!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes[:-1]):
            layers += [nn.Linear(fan_in, fan_out), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))
