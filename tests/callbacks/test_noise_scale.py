"""GradientNoiseScale against a closed-form answer: linear regression with Gaussian inputs.

With x ~ N(0, I_d), y = w*·x + ε (ε ~ N(0, σ²)), loss (w·x − y)² and δ = w − w*, the per-sample gradient is
2(δ·x − ε)x, so G = 2δ, |G|² = 4|δ|², and by Isserlis' theorem tr Σ = 4((d + 1)|δ|² + dσ²). Per coordinate,
σ_j² = 4(|δ|² + δ_j² + σ²) and g_j² = 4δ_j², so McAllester's B*_j = 16 σ_j² / g_j². The standard errors are checked
on the issue's problem: d = 10, σ = 1, |δ| = 1, where B_simple = 21.
"""

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dl.callbacks import GradientNoiseScale
from tests.helpers.distributed import run_distributed
from tests.helpers.models import TinyRegressor
from tests.helpers.trainer import quiet_trainer

D, SIGMA, DELTA = 64, 1.0, 0.5  # wide enough that one step's estimate is not mostly noise


def _truth() -> tuple[float, float]:
    delta_sq = D * DELTA**2
    return 4 * delta_sq, 4 * ((D + 1) * delta_sq + D * SIGMA**2)


def _data(num_samples: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(D, generator=g)
    x = torch.randn(num_samples, D, generator=g)
    y = x @ w_star + SIGMA * torch.randn(num_samples, generator=g)
    return TensorDataset(x, y.unsqueeze(1)), w_star


def _module(w_star: torch.Tensor) -> TinyRegressor:
    net = nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_((w_star + DELTA).unsqueeze(0))
    return TinyRegressor(net, lr=0.0)  # the parameters stay where the truth is computed


def _b_star() -> float:
    return 16 * (D * DELTA**2 + DELTA**2 + SIGMA**2) / DELTA**2  # the same for every coordinate: 1104


def _check(callback: GradientNoiseScale) -> None:
    g2, trace = _truth()
    assert callback.grad_sq.value == pytest.approx(g2, rel=0.15)
    assert callback.trace.value == pytest.approx(trace, rel=0.15)
    assert callback.b_simple == pytest.approx(trace / g2, rel=0.15)
    assert callback.b_star_median == pytest.approx(_b_star(), rel=0.15)


@pytest.mark.parametrize(("accumulate", "batch_size"), [(4, 16), (1, 64)], ids=["micro-batches", "half-batch"])
def test_estimates_within_15_percent_on_one_device(accumulate, batch_size) -> None:
    steps = 500
    dataset, w_star = _data(steps * accumulate * batch_size)
    callback = GradientNoiseScale(every_n_steps=1, ema_decay=0.995)
    trainer = quiet_trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[callback])
    trainer.fit(_module(w_star), DataLoader(dataset, batch_size=batch_size))
    _check(callback)
    assert trainer.callback_metrics["noise_scale/b_simple"] == pytest.approx(callback.b_simple)
    assert trainer.callback_metrics["noise_scale/suggested_batch_size"] == round(callback.b_simple)


def test_per_coordinate_estimate_on_a_sample_of_coordinates() -> None:
    dataset, w_star = _data(500 * 64)
    callback = GradientNoiseScale(every_n_steps=1, ema_decay=0.995, coordinate_sample=16)
    trainer = quiet_trainer(max_steps=500, accumulate_grad_batches=4, callbacks=[callback])
    trainer.fit(_module(w_star), DataLoader(dataset, batch_size=16))
    assert 8 <= callback.coord_grad_sq.value.numel() <= 16  # drawn with replacement, then unique
    assert callback.b_star_median == pytest.approx(_b_star(), rel=0.15)


def test_every_n_steps_measures_only_those_steps() -> None:
    dataset, w_star = _data(20 * 32)
    callback = GradientNoiseScale(every_n_steps=5, per_coordinate=False)
    trainer = quiet_trainer(max_steps=20, accumulate_grad_batches=2, callbacks=[callback])
    trainer.fit(_module(w_star), DataLoader(dataset, batch_size=16))
    decay = 0.9
    assert callback.grad_sq.weight == pytest.approx(1 - decay**4)  # steps 0, 5, 10, 15
    assert callback.b_star_median is None


def _ddp_noise_scale(rank: int, world_size: int) -> tuple:
    dataset, w_star = _data(400 * 2 * 32)
    callback = GradientNoiseScale(every_n_steps=1, ema_decay=0.995)
    trainer = quiet_trainer(devices=world_size, strategy="ddp", max_steps=400, callbacks=[callback])
    trainer.fit(_module(w_star), DataLoader(dataset, batch_size=32))
    return callback.grad_sq.value, callback.trace.value, callback.b_simple, callback.b_star_median


@pytest.mark.distributed
def test_estimates_within_15_percent_under_ddp() -> None:
    """The small gradients are each rank's, read before DDP averages them."""
    results = run_distributed(_ddp_noise_scale, 2, timeout=240)
    assert results[0] == pytest.approx(results[1])  # every rank holds the same estimate
    g2, trace, b_simple, _ = results[0]
    true_g2, true_trace = _truth()
    assert g2 == pytest.approx(true_g2, rel=0.15) and trace == pytest.approx(true_trace, rel=0.15)
    assert b_simple == pytest.approx(true_trace / true_g2, rel=0.15)


# y = w*·x + ε with d = 10, σ = 1, |w*| = 1 and w held at 0 (|δ| = 1): B_simple = ((d + 1)|δ|² + dσ²)/|δ|² = 21
CLOSED_D, CLOSED_STEPS, CLOSED_BATCH = 10, 400, 32


def _closed_form_fit(callbacks: list[GradientNoiseScale]) -> L.Trainer:
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(CLOSED_D, generator=g)
    w_star /= w_star.norm()
    x = torch.randn(CLOSED_STEPS * CLOSED_BATCH, CLOSED_D, generator=g)
    y = x @ w_star + torch.randn(len(x), generator=g)
    net = nn.Linear(CLOSED_D, 1, bias=False)
    nn.init.zeros_(net.weight)
    trainer = quiet_trainer(max_steps=CLOSED_STEPS, callbacks=callbacks)
    trainer.fit(TinyRegressor(net, lr=0.0), DataLoader(TensorDataset(x, y.unsqueeze(1)), batch_size=CLOSED_BATCH))
    return trainer


def test_standard_error_covers_the_closed_form_and_shrinks_as_the_ema_decay_grows() -> None:
    """One fit, four estimators side by side: the defaults (every 25 steps, decay 0.9) and every step at decays 0.5,
    0.9 and 0.99; B_simple = 21 exactly."""
    default = GradientNoiseScale(per_coordinate=False)
    every_step = {d: GradientNoiseScale(every_n_steps=1, ema_decay=d, per_coordinate=False) for d in (0.5, 0.9, 0.99)}
    trainer = _closed_form_fit([default, *every_step.values()])
    assert abs(default.b_simple - 21.0) <= 3 * default.b_simple_stderr
    assert abs(every_step[0.99].b_simple - 21.0) <= 3 * every_step[0.99].b_simple_stderr
    errors = [every_step[d].b_simple_stderr for d in (0.5, 0.9, 0.99)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert trainer.callback_metrics["noise_scale/b_simple_stderr"] == pytest.approx(every_step[0.99].b_simple_stderr)


def test_per_coordinate_standard_error_is_logged_and_shrinks_with_more_measurements() -> None:
    dataset, w_star = _data(60 * 32)
    short, long = (
        GradientNoiseScale(every_n_steps=4, ema_decay=0.99),
        GradientNoiseScale(every_n_steps=1, ema_decay=0.99),
    )
    trainer = quiet_trainer(max_steps=60, accumulate_grad_batches=2, callbacks=[short, long])
    trainer.fit(_module(w_star), DataLoader(dataset, batch_size=16))
    assert 0 < long.b_star_median_stderr < short.b_star_median_stderr
    assert trainer.callback_metrics["noise_scale/b_star_median_stderr"] == pytest.approx(long.b_star_median_stderr)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"`every_n_steps` must be an integer >= 1, got 0"),
        ({"ema_decay": 1.0}, r"`ema_decay` must lie in \[0, 1\), got 1.0"),
        ({"batch_size": -4}, r"`batch_size` must be >= 1, got -4"),
        ({"coordinate_sample": 0}, r"`coordinate_sample` must be >= 1, got 0"),
    ],
)
def test_constructor_rejects_invalid_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        GradientNoiseScale(**kwargs)


def test_loaded_state_gives_the_same_estimates_before_any_new_measurement() -> None:
    dataset, w_star = _data(20 * 32)
    callback = GradientNoiseScale(every_n_steps=1)
    quiet_trainer(max_steps=20, accumulate_grad_batches=2, callbacks=[callback]).fit(
        _module(w_star), DataLoader(dataset, batch_size=16)
    )
    restored = GradientNoiseScale(every_n_steps=1)
    restored.load_state_dict(copy.deepcopy(callback.state_dict()))
    assert restored.b_simple == callback.b_simple and restored.b_star_median == callback.b_star_median
    assert restored.b_simple_stderr == callback.b_simple_stderr is not None
    assert restored.b_star_median_stderr == callback.b_star_median_stderr is not None
