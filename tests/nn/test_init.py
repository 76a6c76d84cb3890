"""Initialisation: empirical variances against their formulas, convolution fans, zero biases."""

import pytest
import torch
from torch import nn

from lightning_dl.nn import fans, init_weights


@pytest.mark.parametrize(
    ("scheme", "mode", "shape", "variance"),
    [
        ("xavier_normal", "fan_in", (512, 512), 2 / (512 + 512)),
        ("xavier_uniform", "fan_in", (512, 512), 2 / (512 + 512)),
        ("he_normal", "fan_in", (512, 512), 2 / 512),
        ("he_uniform", "fan_in", (512, 512), 2 / 512),
        ("he_normal", "fan_in", (256, 1024), 2 / 1024),  # Linear weight is (out, in): fan_in = 1024
        ("he_normal", "fan_out", (256, 1024), 2 / 256),
        ("xavier_normal", "fan_in", (256, 1024), 2 / (256 + 1024)),
    ],
)
def test_empirical_variance_within_5_percent(scheme, mode, shape, variance) -> None:
    torch.manual_seed(0)
    layer = init_weights(nn.Linear(shape[1], shape[0]), scheme, mode=mode)
    assert layer.weight.var().item() == pytest.approx(variance, rel=0.05)
    assert layer.weight.mean().abs().item() < 0.01
    assert torch.count_nonzero(layer.bias) == 0


def test_uniform_schemes_are_bounded_and_normal_takes_std() -> None:
    torch.manual_seed(0)
    layer = init_weights(nn.Linear(512, 512), "xavier_uniform")
    assert layer.weight.abs().max().item() <= (3 * 2 / 1024) ** 0.5
    layer = init_weights(nn.Linear(512, 512), "normal", std=0.01)
    assert layer.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_orthogonal() -> None:
    layer = init_weights(nn.Linear(64, 64), "orthogonal")
    torch.testing.assert_close(layer.weight @ layer.weight.T, torch.eye(64), atol=1e-5, rtol=0)


def test_convolution_fans_count_the_kernel() -> None:
    conv = nn.Conv2d(3, 16, kernel_size=(5, 3))
    assert fans(conv.weight) == (3 * 5 * 3, 16 * 5 * 3)
    torch.manual_seed(0)
    big = init_weights(nn.Conv2d(64, 128, kernel_size=3), "he_normal")
    assert big.weight.var().item() == pytest.approx(2 / (64 * 9), rel=0.05)
    big = init_weights(nn.Conv2d(64, 128, kernel_size=3), "he_normal", mode="fan_out")
    assert big.weight.var().item() == pytest.approx(2 / (128 * 9), rel=0.05)


def test_every_layer_of_a_model_and_default_untouched() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv1d(2, 2, 3))
    before = [p.clone() for p in model.parameters()]
    init_weights(model, "default")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    init_weights(model, "he_normal")
    assert torch.count_nonzero(model[0].bias) == 0 and torch.count_nonzero(model[2].bias) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "lecun"}, r"`init` must be one of \('xavier_normal', 'xavier_uniform', 'he_normal'"),
        ({"scheme": "he_normal", "mode": "fan_avg"}, r"`mode` must be 'fan_in' or 'fan_out', got 'fan_avg'"),
        ({"scheme": "normal", "std": 0.0}, r"`std` must be > 0, got 0.0"),
    ],
)
def test_invalid_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        init_weights(nn.Linear(2, 2), **kwargs)
