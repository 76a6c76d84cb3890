"""What the optimizers share: argument checks whose errors name the parameter, the value and the valid range;
dense gradients; the closure call."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


def check_range(
    name: str, value: float, *, low: float, high: float | None = None, low_open: bool = False, high_open: bool = True
) -> None:
    """Raise unless ``value`` lies in the interval (bounds open or closed as given; ``high=None``: unbounded)."""
    below = value <= low if low_open else value < low
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high is None or high_open else "]"
        raise ValueError(f"`{name}` must lie in {left}{low}, {'inf' if high is None else high}{right}, got {value!r}.")


def check_betas(betas: tuple[float, float]) -> None:
    for index, beta in enumerate(betas):
        check_range(f"betas[{index}]", beta, low=0.0, high=1.0)


def dense_grads(optimizer_name: str, params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters that have a gradient, and their gradients; a sparse gradient is an error (these updates need
    dense ones)."""
    with_grad, grads = [], []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{optimizer_name} does not support sparse gradients; use a dense embedding "
                "(`sparse=False`) or an optimizer that takes sparse gradients (e.g. `adagrad`)."
            )
        with_grad.append(p)
        grads.append(p.grad)
    return with_grad, grads


def evaluate(closure: Callable[[], Any] | None) -> Any:
    """Run ``closure`` with gradients enabled (as torch's optimizers do inside ``step``); None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
