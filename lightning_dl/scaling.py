"""Batch-size scaling rules as pure functions of ``k = B / B_ref``, and the AdaScale gain estimator. Torch only.

- ``linear``: η = k·η_ref (Goyal et al. 2017); ``sqrt``: η = √k·η_ref;
- ``mcallester``: linear η, and the momentum horizon kept constant in examples: β_B = max(0, 1 − k(1 − β_ref))
  for SGD momentum and Adam's β1; Adam's β2 is unchanged (its horizon N_s counts examples already);
- ``adascale`` (Johnson et al. 2020): η = r_t·η_ref with the per-step gain r = (σ² + μ²)/(σ²/S + μ²), S = k;
- ``none``: nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

RULES = ("linear", "sqrt", "mcallester", "adascale", "none")


def scale_factor(batch_size: int, reference_batch_size: int) -> float:
    """``k = batch_size / reference_batch_size``."""
    if reference_batch_size <= 0:
        raise ValueError(f"`reference_batch_size` must be >= 1, got {reference_batch_size!r}.")
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}.")
    return batch_size / reference_batch_size


def lr_multiplier(rule: str, k: float) -> float:
    """The fixed LR multiplier of ``rule`` at scale ``k`` (``adascale`` multiplies per step instead: 1 here)."""
    if rule not in RULES:
        raise ValueError(f"`rule` must be one of {RULES}, got {rule!r}.")
    return {"linear": k, "sqrt": math.sqrt(k), "mcallester": k}.get(rule, 1.0)


def mcallester_momentum(beta: float, k: float) -> float:
    """``max(0, 1 − k(1 − β))``: the momentum at batch ``k·B_ref`` whose horizon, counted in examples, equals that of
    ``β`` at ``B_ref`` (to first order)."""
    return max(0.0, 1.0 - k * (1.0 - beta))


def adascale_sample(
    small_sq_sum: torch.Tensor, big_sq: torch.Tensor, num_small: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's estimates ``(σ², μ²)`` per parameter group from ``Σ_i ‖g_i‖²`` over ``num_small`` small gradients
    and ``‖ḡ‖²`` of their mean (Johnson et al. 2020, appendix B.3, with S ≠ num_small allowed):

        σ² = Σ‖g_i‖² · (S/n)/(n − 1) − ‖ḡ‖² · S/(n − 1),   μ² = ‖ḡ‖² − σ²/S,   σ² ≥ 1e-6,  μ² ≥ 0.
    """
    if num_small < 2:
        raise ValueError(f"AdaScale needs at least 2 small gradients per step, got `num_small={num_small}`.")
    n = float(num_small)
    var = small_sq_sum * (scale / n) / (n - 1) - big_sq * scale / (n - 1)
    sqr = big_sq - var / scale
    return var.clamp_min(1e-6), sqr.clamp_min(0.0)


class DebiasedEMA:
    """Exponential moving average with the start-up bias removed: ``biased ← d·biased + (1 − d)·x``,
    ``weight ← d·weight + (1 − d)``, value ``biased / weight``. Works on floats and on tensors (element-wise).

    Example::

        >>> ema = DebiasedEMA(0.9)
        >>> ema.update(2.0), round(ema.update(4.0), 4)  # the first value is returned as is, then a weighted mean
        (2.0, 3.0526)
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"the EMA decay must lie in [0, 1), got {decay!r}.")
        self.decay = decay
        self.biased: Any = None
        self.weight = 0.0

    def update(self, value: Any) -> Any:
        """Fold in ``value``; returns the new average."""
        rate = 1.0 - self.decay
        self.biased = value * rate if self.biased is None else self.biased * self.decay + value * rate
        self.weight = self.weight * self.decay + rate
        return self.value

    @property
    def value(self) -> Any:
        """The average, or None before the first update."""
        return None if self.biased is None else self.biased / self.weight

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "biased": self.biased, "weight": self.weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.biased, self.weight = state["decay"], state["biased"], state["weight"]


@dataclass
class AdaScaleEstimator:
    """Debiased moving averages of AdaScale's σ² and μ² per parameter group, and the gain they give.

    ``smoothing`` is the EMA decay; ``None`` picks ``max(0, 1 − num_small/1000)`` at the first update (fairscale's
    default). The state is plain floats (``state_dict``), so resuming reproduces the same gains.
    """

    num_groups: int
    smoothing: float | None = None
    var: list[DebiasedEMA] = field(default_factory=list)
    sqr: list[DebiasedEMA] = field(default_factory=list)

    def update(self, small_sq_sum: torch.Tensor, big_sq: torch.Tensor, num_small: int, scale: float) -> None:
        """Fold in one step's measurements (``small_sq_sum`` and ``big_sq`` hold one entry per group)."""
        var, sqr = adascale_sample(small_sq_sum.double(), big_sq.double(), num_small, scale)
        if self.smoothing is None:
            self.smoothing = max(1.0 - num_small / 1000.0, 0.0)
        if not self.var:
            self.var = [DebiasedEMA(self.smoothing) for _ in range(self.num_groups)]
            self.sqr = [DebiasedEMA(self.smoothing) for _ in range(self.num_groups)]
        for ema, value in zip(self.var, var.tolist(), strict=True):
            ema.update(value)
        for ema, value in zip(self.sqr, sqr.tolist(), strict=True):
            ema.update(value)

    def gain(self, scale: float, group: int | None = None) -> float:
        """``(σ² + μ²)/(σ²/S + μ²)`` for one group, or with σ² and μ² summed over groups when ``group`` is None;
        1 before the first update."""
        if not self.var:
            return 1.0
        groups = range(self.num_groups) if group is None else [group]
        var = sum(self.var[i].value for i in groups)
        sqr = sum(self.sqr[i].value for i in groups)
        return (var + sqr) / (var / scale + sqr)

    def rescale(self, old_scale: float, new_scale: float) -> None:
        """Keep σ² consistent when S changes (σ² is measured in units of S)."""
        for ema in self.var:
            if ema.biased is not None:
                ema.biased *= old_scale / new_scale

    def state_dict(self) -> dict[str, Any]:
        return {
            "smoothing": self.smoothing,
            "var": [e.state_dict() for e in self.var],
            "sqr": [e.state_dict() for e in self.sqr],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.smoothing = state["smoothing"]
        self.var, self.sqr = [], []
        for name in ("var", "sqr"):
            for entry in state[name]:
                ema = DebiasedEMA(entry["decay"])
                ema.load_state_dict(entry)
                getattr(self, name).append(ema)


def noise_scale_sample(small_sq: float, big_sq: float, small_batch: float, big_batch: float) -> tuple[float, float]:
    """Unbiased two-batch-size estimates ``(|G|², tr Σ)`` (McCandlish et al. 2018, appendix A.1) from the mean
    squared norm of gradients over batches of ``small_batch`` samples and the squared norm over ``big_batch``:

        |G|² ≈ (B_big|G_big|² − B_small|G_small|²)/(B_big − B_small),
        tr Σ ≈ (|G_small|² − |G_big|²)/(1/B_small − 1/B_big).
    """
    if not big_batch > small_batch > 0:
        raise ValueError(f"need big_batch > small_batch > 0, got small_batch={small_batch}, big_batch={big_batch}.")
    g2 = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    trace = (small_sq - big_sq) / (1.0 / small_batch - 1.0 / big_batch)
    return g2, trace


class RatioEMA:
    """An estimate ``ā/b̄`` from debiased EMAs of paired measurements ``(a_i, b_i)`` (floats, or tensors
    element-wise), with its standard error from the spread of the measurements the EMAs combine.

    The EMA is a weighted mean with weights ``w_i = (1 − d)·d^{n−i}``; with ``n_eff = (Σw)²/Σw²`` measurements'
    worth of information, the delta method gives, for independent measurements,

        SE(ā/b̄) = √( Σw·(a − R·b)² / Σw / (n_eff − 1) ) / |b̄|,   R = ā/b̄,

    the weighted spread of the residuals ``a_i − R·b_i`` (whose weighted mean is 0), with the reliability-weights
    correction. ``None`` while ``n_eff <= 1`` (one measurement, or ``decay = 0``).

    Example::

        >>> ratio = RatioEMA(0.5)
        >>> for a, b in [(2.0, 1.0), (6.0, 2.0), (3.0, 1.0)]:
        ...     _ = ratio.update(a, b)
        >>> round(ratio.ratio, 4), round(ratio.stderr, 4)
        (2.8889, 0.2466)
    """

    def __init__(self, decay: float) -> None:
        self.numerator, self.denominator = DebiasedEMA(decay), DebiasedEMA(decay)
        self.numerator_sq, self.denominator_sq, self.cross = DebiasedEMA(decay), DebiasedEMA(decay), DebiasedEMA(decay)
        self.weight_sq = 0.0  # Σw², with Σw = self.numerator.weight

    def update(self, numerator: Any, denominator: Any) -> Any:
        """Fold in one measurement; returns the new ratio."""
        self.numerator.update(numerator)
        self.denominator.update(denominator)
        self.numerator_sq.update(numerator * numerator)
        self.denominator_sq.update(denominator * denominator)
        self.cross.update(numerator * denominator)
        decay = self.numerator.decay
        self.weight_sq = self.weight_sq * decay**2 + (1.0 - decay) ** 2
        return self.ratio

    @property
    def effective_count(self) -> float:
        """``n_eff = (Σw)²/Σw²`` (0 before the first measurement)."""
        return self.numerator.weight**2 / self.weight_sq if self.weight_sq > 0 else 0.0

    @property
    def ratio(self) -> Any:
        """``ā/b̄`` (None before the first measurement)."""
        if self.numerator.value is None:
            return None
        return self.numerator.value / self.denominator.value

    @property
    def stderr(self) -> Any:
        """The standard error of :attr:`ratio` (None while ``n_eff <= 1``)."""
        n_eff = self.effective_count
        if self.numerator.value is None or n_eff <= 1.0 + 1e-12:
            return None
        ratio = self.ratio
        spread = self.numerator_sq.value - 2 * ratio * self.cross.value + ratio * ratio * self.denominator_sq.value
        if isinstance(spread, torch.Tensor):
            return (spread.clamp_min(0.0) / (n_eff - 1.0)).sqrt() / self.denominator.value.abs()
        return math.sqrt(max(spread, 0.0) / (n_eff - 1.0)) / abs(self.denominator.value)

    def state_dict(self) -> dict[str, Any]:
        names = ("numerator", "denominator", "numerator_sq", "denominator_sq", "cross")
        return {name: getattr(self, name).state_dict() for name in names} | {"weight_sq": self.weight_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight_sq = state["weight_sq"]
        for name in ("numerator", "denominator", "numerator_sq", "denominator_sq", "cross"):
            getattr(self, name).load_state_dict(state[name])
