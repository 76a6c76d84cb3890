"""Reference networks of the suite, each taking ``norm`` and ``init`` by name. Each exposes its layers as an
ordered sequence so that pipeline strategies can cut it into stages."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from lightning_dl.nn.init import init_weights
from lightning_dl.nn.norms import apply_weight_norm, make_norm

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


def make_activation(name: str) -> nn.Module:
    """Build an activation by name: ``relu``, ``gelu``, ``tanh`` or ``silu``."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {name!r}.") from None


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value!r}.")


class MLP(nn.Sequential):
    """A multi-layer perceptron: ``Linear -> norm -> activation -> Dropout`` per hidden layer, then a ``Linear``
    head. Inputs are flattened.

    Args:
        in_features: size of each input sample.
        hidden_sizes: width of each hidden layer, in order (may be empty: a linear model).
        out_features: size of each output sample.
        activation: ``relu``, ``gelu``, ``tanh`` or ``silu``.
        dropout: dropout probability after each hidden activation, in [0, 1).
        norm: ``none``, ``batch``, ``layer``, ``rms``, ``group`` or ``weight`` (see :func:`make_norm`).
        init: weight initialisation (see :func:`init_weights`); ``default`` keeps torch's.

    Example::

        >>> net = MLP(64, [128, 128], 10, norm="layer", init="he_normal")
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
        norm: str = "none",
        init: str = "default",
    ) -> None:
        _positive("in_features", in_features)
        _positive("out_features", out_features)
        if any(h < 1 for h in hidden_sizes):
            raise ValueError(f"every entry of `hidden_sizes` must be >= 1, got {list(hidden_sizes)!r}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must lie in [0, 1), got {dropout!r}.")
        sizes = [in_features, *hidden_sizes, out_features]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes[:-1]):
            layers.append(nn.Linear(fan_in, fan_out))
            norm_layer = make_norm(norm, fan_out)
            if not isinstance(norm_layer, nn.Identity):
                layers.append(norm_layer)
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-2], sizes[-1]))
        super().__init__(*layers)
        init_weights(self, init)
        for index, layer in enumerate(self):
            if isinstance(layer, nn.Linear) and index < len(self) - 1:
                self[index] = apply_weight_norm(layer, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))


class ConvNet(nn.Sequential):
    """A small convolutional network for 8×8 single-channel images (the digits, given as 64 features):
    three 3×3 convolutions (32, 64, 64 channels) each followed by ``norm`` and ReLU, a 2×2 max-pool after the
    second, then global average pooling and a Linear head.

    Example::

        >>> net = ConvNet(num_classes=10, norm="batch")
        >>> net(torch.zeros(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (32, 64, 64),
        norm: str = "none",
        init: str = "default",
        image_size: int = 8,
    ) -> None:
        _positive("num_classes", num_classes)
        if len(channels) != 3 or any(c < 1 for c in channels):
            raise ValueError(f"`channels` must be three positive widths, got {list(channels)!r}.")
        layers: list[nn.Module] = [nn.Unflatten(1, (1, image_size, image_size))]
        widths = [1, *channels]
        for index, (c_in, c_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            norm_layer = make_norm(norm, c_out, conv=True)
            if not isinstance(norm_layer, nn.Identity):
                layers.append(norm_layer)
            layers.append(nn.ReLU())
            if index == 1:
                layers.append(nn.MaxPool2d(2))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
        super().__init__(*layers)
        init_weights(self, init)
        for index, layer in enumerate(self):
            if isinstance(layer, nn.Conv2d):
                self[index] = apply_weight_norm(layer, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))
