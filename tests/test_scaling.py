"""Batch-size scaling rules against their formulas; the AdaScale gain against fairscale's AdaScale."""

import math

import pytest
import torch
from fairscale.optim import AdaScale

from lightning_dl import scaling


def test_rules() -> None:
    assert scaling.scale_factor(256, 32) == 8.0
    assert scaling.lr_multiplier("linear", 8.0) == 8.0
    assert scaling.lr_multiplier("sqrt", 8.0) == pytest.approx(math.sqrt(8.0))
    assert scaling.lr_multiplier("mcallester", 8.0) == 8.0
    assert scaling.lr_multiplier("none", 8.0) == scaling.lr_multiplier("adascale", 8.0) == 1.0
    assert scaling.mcallester_momentum(0.9, 4.0) == pytest.approx(0.6)
    assert scaling.mcallester_momentum(0.9, 20.0) == 0.0
    assert scaling.mcallester_momentum(0.99, 0.5) == pytest.approx(0.995)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: scaling.scale_factor(64, 0), r"`reference_batch_size` must be >= 1, got 0"),
        (lambda: scaling.lr_multiplier("cubic", 2.0), r"`rule` must be one of \('linear', 'sqrt', 'mcallester'"),
        (lambda: scaling.adascale_sample(torch.ones(1), torch.ones(1), 1, 2.0), "at least 2 small gradients"),
        (lambda: scaling.noise_scale_sample(1.0, 1.0, 8, 8), "need big_batch > small_batch > 0"),
    ],
)
def test_errors(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(("num_small", "scale", "groups"), [(4, 4.0, 1), (4, 8.0, 2), (2, 2.0, 2)])
def test_adascale_gain_equals_fairscale(num_small, scale, groups) -> None:
    """Same small gradients into fairscale's AdaScale (accumulation in one process) and into our estimator."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(5, 3)) for _ in range(groups)]
    optimizer = torch.optim.SGD([{"params": [p]} for p in params], lr=0.1)
    ada = AdaScale(optimizer, num_gradients_to_accumulate=num_small, scale=scale, is_scaled_loss=False)
    ours = scaling.AdaScaleEstimator(num_groups=groups)
    for _ in range(6):
        small = [[torch.randn(5, 3) + 0.5 for _ in params] for _ in range(num_small)]
        for grads in small:
            # one backward per small gradient: d(sum(p * g))/dp = g
            sum((p * g).sum() for p, g in zip(params, grads, strict=True)).backward()
        ada.scale_grad_by_num_grads_to_accum()  # .grad is now the mean of the small gradients
        small_sq = torch.tensor([sum(grads[i].pow(2).sum().item() for grads in small) for i in range(groups)])
        big_sq = torch.tensor([p.grad.pow(2).sum().item() for p in params])
        ours.update(small_sq, big_sq, num_small, scale)
        for i in range(groups):
            assert ours.gain(scale, group=i) == pytest.approx(ada.gain(pg_idx=i), abs=1e-5)
        assert ours.gain(scale) == pytest.approx(ada.gain(), abs=1e-5)
        ada.step()
        ada.zero_grad()
    ada.unhook()


def test_adascale_gain_bounds() -> None:
    est = scaling.AdaScaleEstimator(num_groups=1, smoothing=0.0)
    assert est.gain(8.0) == 1.0  # before any measurement
    est.update(torch.tensor([4.0 * 100.0]), torch.tensor([1.0]), 4, 8.0)  # very noisy: gain near S
    noisy = est.gain(8.0)
    est.update(torch.tensor([4.0]), torch.tensor([1.0]), 4, 8.0)  # identical gradients: no noise, gain 1
    assert 1.0 <= est.gain(8.0) < 1.01 and 7.0 < noisy <= 8.0


def test_noise_scale_sample_recovers_known_moments() -> None:
    # E|G_B|^2 = |G|^2 + tr(S)/B exactly: plug in expectations and get the moments back
    g2, trace = 3.0, 60.0
    small, big = 8, 64
    est_g2, est_trace = scaling.noise_scale_sample(g2 + trace / small, g2 + trace / big, small, big)
    assert est_g2 == pytest.approx(g2) and est_trace == pytest.approx(trace)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_ratio_ema_and_its_standard_error_match_the_weighted_sums(decay) -> None:
    """ā/b̄ and SE = √(Σw(a − Rb)²/Σw/(n_eff − 1))/|b̄| with w_i = (1 − d)d^(n−i), written out; floats and tensors."""
    g = torch.Generator().manual_seed(0)
    numerators, denominators = torch.rand(7, generator=g) + 2, torch.rand(7, generator=g) + 0.5
    pairs = [(float(a), float(b)) for a, b in zip(numerators, denominators, strict=True)]
    ratio, elementwise = scaling.RatioEMA(decay), scaling.RatioEMA(decay)
    for a, b in pairs:
        ratio.update(a, b)
        elementwise.update(torch.tensor([a, 2 * a], dtype=torch.float64), torch.tensor([b, b], dtype=torch.float64))
    weights = [(1 - decay) * decay ** (len(pairs) - 1 - i) for i in range(len(pairs))]
    total = sum(weights)
    mean_a = sum(w * a for w, (a, _) in zip(weights, pairs, strict=True)) / total
    mean_b = sum(w * b for w, (_, b) in zip(weights, pairs, strict=True)) / total
    r = mean_a / mean_b
    n_eff = total**2 / sum(w * w for w in weights)
    assert ratio.ratio == pytest.approx(r) and ratio.effective_count == pytest.approx(n_eff)
    if decay == 0.0:  # the last measurement alone: no spread to measure
        assert ratio.stderr is None and elementwise.stderr is None
        return
    spread = sum(w * (a - r * b) ** 2 for w, (a, b) in zip(weights, pairs, strict=True)) / total
    assert ratio.stderr == pytest.approx(math.sqrt(spread / (n_eff - 1)) / mean_b, rel=1e-9)
    torch.testing.assert_close(elementwise.ratio, torch.tensor([r, 2 * r], dtype=torch.float64))
    torch.testing.assert_close(elementwise.stderr[0], torch.tensor(ratio.stderr, dtype=torch.float64))
    restored = scaling.RatioEMA(decay)
    restored.load_state_dict(ratio.state_dict())
    assert restored.ratio == ratio.ratio and restored.stderr == ratio.stderr


def test_ratio_ema_has_no_standard_error_from_one_measurement() -> None:
    ratio = scaling.RatioEMA(0.9)
    assert ratio.ratio is None and ratio.stderr is None and ratio.effective_count == 0.0
    ratio.update(3.0, 1.0)
    assert ratio.ratio == 3.0 and ratio.stderr is None
