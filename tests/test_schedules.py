"""Each schedule shape against its formula, written out independently here."""

import math

import pytest
import torch

from lightning_dl import schedules
from lightning_dl.schedules import lr_factor, validate_schedule

TOTAL, WARMUP = 100, 10


def _post(step):
    return (step - WARMUP) / (TOTAL - WARMUP)


@pytest.mark.parametrize("step", [0, 3, 9])
def test_linear_and_exponential_warmup(step) -> None:
    assert lr_factor("constant", step, total_steps=TOTAL, warmup_steps=WARMUP, warmup_start_ratio=0.1) == (
        pytest.approx(0.1 + 0.9 * step / WARMUP)
    )
    value = lr_factor(
        "cosine", step, total_steps=TOTAL, warmup_steps=WARMUP, warmup_type="exponential", warmup_start_ratio=0.01
    )
    assert value == pytest.approx(0.01 ** (1 - step / WARMUP))


@pytest.mark.parametrize("step", [10, 25, 55, 99, 100, 150])
def test_decay_shapes_match_their_formulas(step) -> None:
    t = min(1.0, _post(step))
    kw = dict(total_steps=TOTAL, warmup_steps=WARMUP)
    assert lr_factor("constant", step, **kw) == 1.0
    assert lr_factor("linear", step, min_lr_ratio=0.1, **kw) == pytest.approx(0.1 + 0.9 * (1 - t))
    assert lr_factor("cosine", step, min_lr_ratio=0.1, **kw) == pytest.approx(
        0.1 + 0.9 * (1 + math.cos(math.pi * t)) / 2
    )
    assert lr_factor("polynomial", step, power=2.0, **kw) == pytest.approx((1 - t) ** 2)
    assert lr_factor("inverse_sqrt", step, **kw) == pytest.approx(math.sqrt(WARMUP / step))
    assert lr_factor("step", step, milestones=[30, 60], gamma=0.5, **kw) == pytest.approx(
        0.5 ** ((step >= 30) + (step >= 60))
    )


@pytest.mark.parametrize("decay_type", ["linear", "cosine", "1-sqrt"])
def test_wsd_is_flat_then_decays(decay_type) -> None:
    kw = dict(total_steps=TOTAL, warmup_steps=WARMUP, decay_fraction=0.25, decay_type=decay_type, min_lr_ratio=0.0)
    stable_end = WARMUP + 0.75 * (TOTAL - WARMUP)  # 77.5
    assert [lr_factor("wsd", s, **kw) for s in (10, 50, 77)] == [1.0, 1.0, 1.0]
    for step in (80, 90, 100):
        d = (step - stable_end) / (TOTAL - stable_end)
        expected = {"linear": 1 - d, "cosine": (1 + math.cos(math.pi * d)) / 2, "1-sqrt": 1 - math.sqrt(d)}[decay_type]
        assert lr_factor("wsd", step, **kw) == pytest.approx(expected)


def test_cosine_restarts_cycles_grow_and_decay() -> None:
    # 3 cycles with lengths 1, 2, 4 (x 90/7 steps), peaks 1, 0.5, 0.25
    kw = dict(total_steps=TOTAL, warmup_steps=WARMUP, num_cycles=3, cycle_mul=2.0, cycle_decay=0.5)
    unit = (TOTAL - WARMUP) / 7
    starts = [WARMUP, WARMUP + unit, WARMUP + 3 * unit]
    for start, length, peak in zip(starts, (unit, 2 * unit, 4 * unit), (1.0, 0.5, 0.25), strict=True):
        assert lr_factor("cosine_restarts", start, **kw) == pytest.approx(peak)
        mid = start + length / 2
        assert lr_factor("cosine_restarts", mid, **kw) == pytest.approx(peak / 2)
    assert lr_factor("cosine_restarts", TOTAL, **kw) == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_linear_warmup_equals_torch_sequential_lr() -> None:
    total, warmup, start, floor, base = 50, 8, 0.1, 0.05, 0.3
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base)
    scheduler = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=start, end_factor=1.0, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total - warmup, eta_min=base * floor),
        ],
        milestones=[warmup],
    )
    torch_lrs, ours = [], []
    for step in range(total + 1):
        torch_lrs.append(optimizer.param_groups[0]["lr"])
        ours.append(
            base
            * lr_factor(
                "cosine", step, total_steps=total, warmup_steps=warmup, warmup_start_ratio=start, min_lr_ratio=floor
            )
        )
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(torch_lrs, dtype=torch.float64))


@pytest.mark.parametrize(
    ("shape", "kwargs", "match"),
    [
        (
            "cosine",
            {"warmup_steps": 200, "total_steps": 100},
            r"`warmup_steps` must be <= total_steps \(100\), got 200",
        ),
        ("cosine", {"warmup_steps": -1}, r"`warmup_steps` must be >= 0, got -1"),
        ("cosine", {"min_lr_ratio": -0.1}, r"`min_lr_ratio` must be in \[0, 1\], got -0.1"),
        ("cosine", {"warmup_start_ratio": -0.5}, r"`warmup_start_ratio` must lie in \[0, 1\], got -0.5"),
        ("cosine", {"warmup_type": "exponential", "warmup_start_ratio": 0.0}, r"must lie in \(0, 1\] for exponential"),
        ("cosine", {"warmup_type": "quadratic"}, r"`warmup_type` must be one of \('linear', 'exponential'\)"),
        ("triangle", {}, r"`shape` must be one of \('constant', 'linear', 'cosine'"),
        ("cosine", {"gamma": 0.5}, r"shape 'cosine' takes no parameter\(s\) \['gamma'\]; it takes \['min_lr_ratio'\]"),
        ("step", {"milestones": [50, 20]}, r"`milestones` must be increasing steps >= 0, got \[50, 20\]"),
        ("wsd", {"decay_type": "exp"}, r"`decay_type` must be one of \('linear', 'cosine', '1-sqrt'\), got 'exp'"),
        ("polynomial", {"power": 0}, r"`power` must be > 0, got 0"),
        ("cosine", {"total_steps": 0}, r"`total_steps` must be >= 1, got 0"),
    ],
)
def test_invalid_schedules_are_rejected(shape, kwargs, match) -> None:
    args = {"warmup_steps": 0, "warmup_type": "linear", "warmup_start_ratio": 0.0, "total_steps": 100} | kwargs
    with pytest.raises(ValueError, match=match):
        validate_schedule(shape, **args)


def test_every_shape_starts_at_one_after_warmup_and_is_bounded() -> None:
    for shape in schedules.SHAPE_NAMES:
        values = [lr_factor(shape, s, total_steps=TOTAL, warmup_steps=WARMUP) for s in range(TOTAL + 1)]
        assert values[WARMUP] == pytest.approx(1.0), shape
        assert all(0.0 <= v <= 1.0 for v in values), shape
