"""Learning-rate shapes as pure functions of an explicit step: each returns the factor that multiplies a group's
initial value, so ``lr(step) = initial_lr * factor(step)``. Torch only; no Trainer needed to test them.

Every shape shares the warmup: for ``step < warmup_steps`` the factor rises from ``warmup_start_ratio`` to 1
(linearly or exponentially); afterwards the shape runs over ``progress = (step - warmup_steps) / (total_steps -
warmup_steps)`` in [0, 1], clamped at 1 beyond ``total_steps``.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

WARMUP_TYPES = ("linear", "exponential")
DECAY_TYPES = ("linear", "cosine", "1-sqrt")


def warmup_factor(step: float, warmup_steps: int, start_ratio: float = 0.0, kind: str = "linear") -> float:
    """Factor during warmup: ``start + (1 - start) * step / warmup_steps`` (linear) or
    ``start ** (1 - step / warmup_steps)`` (exponential; ``start_ratio`` must then be > 0). 1 after warmup."""
    if step >= warmup_steps:
        return 1.0
    fraction = step / warmup_steps
    if kind == "linear":
        return start_ratio + (1.0 - start_ratio) * fraction
    return start_ratio ** (1.0 - fraction)


def _progress(step: float, warmup_steps: int, total_steps: int) -> float:
    return min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def _half_cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def constant(progress: float) -> float:
    """1 throughout."""
    return 1.0


def linear(progress: float, *, min_lr_ratio: float = 0.0) -> float:
    """Straight line from 1 to ``min_lr_ratio``."""
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress)


def cosine(progress: float, *, min_lr_ratio: float = 0.0) -> float:
    """Half a cosine from 1 to ``min_lr_ratio`` (Loshchilov & Hutter 2017, no restarts)."""
    return min_lr_ratio + (1.0 - min_lr_ratio) * _half_cosine(progress)


def polynomial(progress: float, *, power: float = 1.0, min_lr_ratio: float = 0.0) -> float:
    """``min + (1 - min) * (1 - progress) ** power``."""
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - progress) ** power


def cosine_restarts(
    progress: float,
    *,
    num_cycles: int = 3,
    cycle_mul: float = 1.0,
    cycle_decay: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> float:
    """Cosine with warm restarts (SGDR): ``num_cycles`` cycles fill the post-warmup span, each ``cycle_mul`` times
    longer than the one before; the peak of cycle ``i`` is ``cycle_decay ** i``."""
    lengths = [cycle_mul**i for i in range(num_cycles)]
    position = progress * sum(lengths)
    for i, length in enumerate(lengths):
        if position < length or i == num_cycles - 1:
            peak = cycle_decay**i
            return min_lr_ratio + (peak - min_lr_ratio) * _half_cosine(min(1.0, position / length))
        position -= length
    raise AssertionError("unreachable")  # pragma: no cover


def wsd(
    progress: float, *, decay_fraction: float = 0.2, decay_type: str = "linear", min_lr_ratio: float = 0.0
) -> float:
    """Warmup-stable-decay: 1 until the last ``decay_fraction`` of the span, then down to ``min_lr_ratio`` by
    ``decay_type`` (``linear``, ``cosine`` or ``1-sqrt``: ``1 - sqrt(t)``)."""
    start = 1.0 - decay_fraction
    if progress <= start:
        return 1.0
    t = (progress - start) / decay_fraction
    shape = {"linear": 1.0 - t, "cosine": _half_cosine(t), "1-sqrt": 1.0 - math.sqrt(t)}[decay_type]
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


SHAPES: dict[str, Callable[..., float]] = {
    "constant": constant,
    "linear": linear,
    "cosine": cosine,
    "cosine_restarts": cosine_restarts,
    "wsd": wsd,
    "polynomial": polynomial,
}
"""Shapes that are functions of the post-warmup progress in [0, 1]. ``inverse_sqrt`` and ``step`` depend on the
step itself and are handled by :func:`lr_factor`."""
STEP_SHAPES = ("inverse_sqrt", "step")
SHAPE_NAMES = (*SHAPES, *STEP_SHAPES)


def inverse_sqrt(step: float, *, warmup_steps: int, timescale: int | None = None) -> float:
    """``sqrt(timescale / (timescale + step - warmup_steps))`` after warmup (1 at the end of warmup, then decaying
    as 1/sqrt(step)); ``timescale`` defaults to ``max(warmup_steps, 1)``, giving the Transformer schedule."""
    scale = timescale if timescale is not None else max(warmup_steps, 1)
    return math.sqrt(scale / (scale + max(0.0, step - warmup_steps)))


def step_decay(step: float, *, milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """``gamma ** (number of milestones <= step)``: multiply by ``gamma`` at each milestone (absolute steps)."""
    return gamma ** sum(1 for m in milestones if step >= m)


def lr_factor(
    shape: str,
    step: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_type: str = "linear",
    warmup_start_ratio: float = 0.0,
    **shape_kwargs: Any,
) -> float:
    """The factor of ``shape`` at ``step`` (an optimizer step, possibly fractional): warmup, then the shape.

    Example::

        >>> [round(lr_factor("cosine", s, total_steps=10, warmup_steps=2), 3) for s in (0, 1, 2, 6, 10)]
        [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    if step < warmup_steps:
        return warmup_factor(step, warmup_steps, warmup_start_ratio, warmup_type)
    if shape == "inverse_sqrt":
        return inverse_sqrt(step, warmup_steps=warmup_steps, **shape_kwargs)
    if shape == "step":
        return step_decay(step, **shape_kwargs)
    return SHAPES[shape](_progress(step, warmup_steps, total_steps), **shape_kwargs)


def shape_parameters(shape: str) -> tuple[str, ...]:
    """Names of the keyword arguments that ``shape`` takes."""
    if shape not in SHAPE_NAMES:
        raise ValueError(f"`shape` must be one of {SHAPE_NAMES}, got {shape!r}.")
    step_shapes: dict[str, Callable[..., float]] = {"inverse_sqrt": inverse_sqrt, "step": step_decay}
    function = step_shapes.get(shape) or SHAPES[shape]
    params = inspect.signature(function).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "warmup_steps")


def validate_schedule(
    shape: str,
    *,
    warmup_steps: int,
    warmup_type: str,
    warmup_start_ratio: float,
    total_steps: int | None,
    **shape_kwargs: Any,
) -> None:
    """Raise ``ValueError`` naming the parameter, its value and the valid range for anything ``lr_factor`` cannot
    honour. ``total_steps=None`` skips the checks that need it (it is known once the Trainer is set up)."""
    allowed = shape_parameters(shape)
    unknown = sorted(set(shape_kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"shape {shape!r} takes no parameter(s) {unknown}; it takes {list(allowed)}.")
    if warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps!r}.")
    if warmup_type not in WARMUP_TYPES:
        raise ValueError(f"`warmup_type` must be one of {WARMUP_TYPES}, got {warmup_type!r}.")
    low = 0.0 if warmup_type == "linear" else 1e-12
    if not low <= warmup_start_ratio <= 1.0:
        bound = "[0, 1]" if warmup_type == "linear" else "(0, 1] for exponential warmup"
        raise ValueError(f"`warmup_start_ratio` must lie in {bound}, got {warmup_start_ratio!r}.")
    if total_steps is not None:
        if total_steps < 1:
            raise ValueError(f"`total_steps` must be >= 1, got {total_steps!r}.")
        if warmup_steps > total_steps:
            raise ValueError(f"`warmup_steps` must be <= total_steps ({total_steps}), got {warmup_steps!r}.")
    checks: dict[str, tuple[Callable[[Any], bool], str]] = {
        "min_lr_ratio": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
        "power": (lambda v: v > 0, "> 0"),
        "num_cycles": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
        "cycle_mul": (lambda v: v > 0, "> 0"),
        "cycle_decay": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
        "decay_fraction": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
        "decay_type": (lambda v: v in DECAY_TYPES, f"one of {DECAY_TYPES}"),
        "timescale": (lambda v: v is None or v >= 1, ">= 1"),
        "gamma": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
        "milestones": (
            lambda v: all(b > a for a, b in itertools.pairwise(v)) and all(m >= 0 for m in v),
            "increasing steps >= 0",
        ),
    }
    for name, value in shape_kwargs.items():
        ok, rule = checks[name]
        if not ok(value):
            raise ValueError(f"`{name}` must be {rule}, got {value!r}.")
