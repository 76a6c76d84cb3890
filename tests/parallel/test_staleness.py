"""Staleness corrections against transcriptions of their formulas."""

import pytest
import torch

from lightning_dl.parallel.param_server import compensate


def _tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)]


@pytest.mark.parametrize(("staleness", "factor"), [(0, 1.0), (1, 1.0), (3, 1 / 3), (10, 0.1)])
def test_inverse_scales_the_learning_rate_by_one_over_tau(staleness, factor) -> None:
    grads = _tensors(0)
    corrected, lr_factor = compensate("inverse", grads, staleness=staleness)
    assert lr_factor == pytest.approx(factor)
    for a, b in zip(corrected, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a is not b


def test_none_changes_nothing() -> None:
    grads = _tensors(1)
    corrected, lr_factor = compensate("none", grads, staleness=7)
    assert lr_factor == 1.0 and all(torch.equal(a, b) for a, b in zip(corrected, grads, strict=True))


def test_dc_matches_its_formula_element_by_element() -> None:
    grads, now, stale = _tensors(2), _tensors(3), _tensors(4)
    corrected, lr_factor = compensate("dc", grads, staleness=2, params_now=now, params_stale=stale, dc_lambda=0.3)
    assert lr_factor == 1.0
    for c, g, n, s in zip(corrected, grads, now, stale, strict=True):
        expected = [
            gi + 0.3 * gi * gi * (ni - si)
            for gi, ni, si in zip(g.flatten().tolist(), n.flatten().tolist(), s.flatten().tolist(), strict=True)
        ]
        torch.testing.assert_close(c.flatten(), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "linear"}, r"`staleness_policy` must be one of \('none', 'inverse', 'dc'\), got 'linear'"),
        ({"policy": "none", "staleness": -1}, r"`staleness` must be >= 0, got -1"),
        ({"policy": "dc", "dc_lambda": -0.1}, r"`dc_lambda` \(λ\) must be >= 0, got -0.1"),
        ({"policy": "dc"}, r"needs `params_now` and `params_stale`"),
    ],
)
def test_invalid_values(kwargs, match) -> None:
    args = {"staleness": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        compensate(args.pop("policy"), _tensors(0), **args)
