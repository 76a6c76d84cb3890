"""Norms: what each normalises, weight norm's reparametrisation, BatchNorm's train/eval difference."""

import pytest
import torch
from torch import nn

from lightning_dl.nn import MLP, ConvNet, RMSNorm2d, apply_weight_norm, make_norm


def test_layer_norm_gives_per_sample_mean_0_std_1() -> None:
    x = torch.randn(16, 32) * 5 + 3
    y = make_norm("layer", 32)(x)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=1, unbiased=False), torch.ones(16), atol=1e-3, rtol=0)


def test_rms_norm_divides_by_the_root_mean_square() -> None:
    x = torch.randn(4, 10)
    torch.testing.assert_close(
        make_norm("rms", 10)(x), x / x.pow(2).mean(1, keepdim=True).add(1e-6).sqrt(), atol=1e-4, rtol=1e-4
    )
    images = torch.randn(2, 4, 3, 3)
    expected = images / images.pow(2).mean(dim=(1, 2, 3), keepdim=True).add(1e-6).sqrt()
    torch.testing.assert_close(RMSNorm2d(4)(images), expected)


def test_batch_norm_differs_between_train_and_eval() -> None:
    torch.manual_seed(0)
    norm = make_norm("batch", 8)
    x = torch.randn(32, 8) * 2 + 5
    norm.train()
    y_train = norm(x)  # batch statistics: each feature centred and scaled over the batch
    torch.testing.assert_close(y_train.mean(dim=0), torch.zeros(8), atol=1e-5, rtol=0)
    norm.eval()
    y_eval = norm(x)  # running statistics after one update: momentum 0.1 from (0, 1)
    running_mean = 0.1 * x.mean(dim=0)
    running_var = 0.9 + 0.1 * x.var(dim=0, unbiased=True)
    torch.testing.assert_close(y_eval, (x - running_mean) / (running_var + 1e-5).sqrt(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y_train, y_eval)


def test_group_norm_and_errors() -> None:
    assert isinstance(make_norm("group", 32, conv=True), nn.GroupNorm)
    with pytest.raises(ValueError, match=r"`group` norm needs `dim` \(30\) divisible by `groups` \(8\)"):
        make_norm("group", 30)
    with pytest.raises(ValueError, match=r"`norm` must be one of \('batch', 'layer', 'rms', 'group', 'weight'"):
        make_norm("instance", 8)


def test_weight_norm_equals_g_v_over_norm_v() -> None:
    layer = apply_weight_norm(nn.Linear(6, 4), "weight")
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(torch.arange(1.0, 5.0).view(4, 1))
    g = layer.parametrizations.weight.original0
    v = layer.parametrizations.weight.original1
    torch.testing.assert_close(layer.weight, g * v / v.norm(dim=1, keepdim=True))
    assert apply_weight_norm(nn.Linear(2, 2), "none").__class__ is nn.Linear


@pytest.mark.parametrize("norm", ["none", "batch", "layer", "rms", "group", "weight"])
def test_models_take_every_norm(norm) -> None:
    mlp = MLP(64, [32, 32], 10, norm=norm, init="he_normal")
    conv = ConvNet(10, norm=norm, init="he_normal")
    x = torch.randn(4, 64)
    assert mlp(x).shape == conv(x).shape == (4, 10)
    if norm == "weight":
        assert hasattr(mlp[0], "parametrizations") and hasattr(conv[1], "parametrizations")
        # weight norm initialised from the scheme: w = v at the start
        torch.testing.assert_close(mlp[0].weight, mlp[0].parametrizations.weight.original1)
