"""MLP: structure, shapes and clear errors."""

import pytest
import torch
from torch import nn

from lightning_dl.nn import MLP, make_activation


def test_mlp_layers_in_order() -> None:
    net = MLP(64, [32, 16], 10, activation="tanh", dropout=0.2)
    kinds = [type(m) for m in net]
    assert kinds == [nn.Linear, nn.Tanh, nn.Dropout, nn.Linear, nn.Tanh, nn.Dropout, nn.Linear]
    shapes = [tuple(m.weight.shape) for m in net if isinstance(m, nn.Linear)]
    assert shapes == [(32, 64), (16, 32), (10, 16)]


def test_mlp_without_hidden_layers_is_linear_and_flattens() -> None:
    net = MLP(64, [], 10)
    assert len(net) == 1
    x = torch.randn(3, 8, 8)
    torch.testing.assert_close(net(x), net[0](x.reshape(3, 64)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 0}, "`in_features` must be >= 1, got 0"),
        ({"out_features": 0}, "`out_features` must be >= 1, got 0"),
        ({"hidden_sizes": [8, 0]}, r"every entry of `hidden_sizes` must be >= 1, got \[8, 0\]"),
        ({"dropout": 1.0}, r"`dropout` must lie in \[0, 1\), got 1.0"),
        (
            {"activation": "sigmoidal"},
            r"`activation` must be one of \['gelu', 'relu', 'silu', 'tanh'\], got 'sigmoidal'",
        ),
    ],
)
def test_mlp_rejects_invalid_values(kwargs, match) -> None:
    args = {"in_features": 4, "hidden_sizes": [8], "out_features": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        MLP(args.pop("in_features"), args.pop("hidden_sizes"), args.pop("out_features"), **args)


def test_make_activation() -> None:
    assert isinstance(make_activation("gelu"), nn.GELU)
