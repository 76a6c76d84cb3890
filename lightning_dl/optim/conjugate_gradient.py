"""Nonlinear conjugate gradient over all parameters as one vector, with Fletcher–Reeves or Hestenes–Stiefel β,
restarts, and a fixed step or a backtracking (Armijo) line search through a closure."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from lightning_dl.optim._checks import check_range, dense_grads, evaluate

BETAS = ("fletcher_reeves", "hestenes_stiefel")


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


class ConjugateGradient(torch.optim.Optimizer):
    """With g_t = ∇L(W_t) and the previous direction p_t:

        β = g_t·g_t / g_{t−1}·g_{t−1}                              (Fletcher–Reeves)
        β = g_t·(g_t − g_{t−1}) / (g_t − g_{t−1})·p_t               (Hestenes–Stiefel)
        β = 0 at the first step, every ``restart_every`` steps, when β < 0, or when p is not a descent direction
        p_{t+1} = β·p_t − g_t;   W_{t+1} = W_t + α·p_{t+1}

    ``α = lr`` when ``line_search=False``. With ``line_search=True`` the step needs a closure that re-evaluates the
    loss (as ``torch.optim.LBFGS`` does): starting from ``α = lr`` it halves α (``shrink``) until
    ``L(W + α·p) ≤ L(W) + c·α·(g·p)`` or ``max_backtracks`` is reached. One param group only: the directions span
    every parameter.

    Example::

        >>> w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
        >>> optimizer = ConjugateGradient([w], lr=0.5, line_search=True)
        >>> def closure():
        ...     optimizer.zero_grad(); loss = (w ** 2).sum(); loss.backward(); return loss
        >>> for _ in range(3):
        ...     _ = optimizer.step(closure)
        >>> bool(w.abs().max() < 1e-3)
        True
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        beta: str = "fletcher_reeves",
        restart_every: int | None = None,
        line_search: bool = False,
        c: float = 1e-4,
        shrink: float = 0.5,
        max_backtracks: int = 20,
    ) -> None:
        check_range("lr", lr, low=0.0, high=None, low_open=True)
        if beta not in BETAS:
            raise ValueError(f"`beta` must be one of {BETAS}, got {beta!r}.")
        if restart_every is not None:
            check_range("restart_every", restart_every, low=1.0, high=None)
        check_range("c", c, low=0.0, high=1.0, low_open=True)
        check_range("shrink", shrink, low=0.0, high=1.0, low_open=True)
        check_range("max_backtracks", max_backtracks, low=0.0, high=None)
        defaults = dict(
            lr=lr,
            beta=beta,
            restart_every=restart_every,
            line_search=line_search,
            c=c,
            shrink=shrink,
            max_backtracks=max_backtracks,
        )
        super().__init__(params, defaults)
        if len(self.param_groups) != 1:
            raise ValueError(f"ConjugateGradient takes one param group, got {len(self.param_groups)}.")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        group = self.param_groups[0]
        if group["line_search"] and closure is None:
            raise ValueError("`line_search=True` needs `step(closure)` with a closure that returns the loss.")
        loss = evaluate(closure)
        params, grads = dense_grads("ConjugateGradient", group["params"])
        if not params:
            return loss
        grads = [g.detach().clone() for g in grads]
        # the directions span all parameters: one state, kept with the first parameter so state_dict carries it
        state = self.state[group["params"][0]]
        t = state.get("step", 0)
        previous, direction = state.get("grad"), state.get("direction")
        beta = torch.zeros(())
        restart = previous is None or (group["restart_every"] is not None and t % group["restart_every"] == 0)
        if not restart:
            if group["beta"] == "fletcher_reeves":
                beta = _dot(grads, grads) / _dot(previous, previous)
            else:
                change = torch._foreach_sub(grads, previous)
                beta = _dot(grads, change) / _dot(change, direction)
            if not bool(torch.isfinite(beta)) or beta < 0:
                beta = torch.zeros(())
        new_direction = list(torch._foreach_neg(grads))
        if beta != 0:
            torch._foreach_add_(new_direction, torch._foreach_mul(direction, float(beta)))
        slope = _dot(grads, new_direction)
        if slope >= 0:  # not a descent direction: restart along −g
            new_direction, slope, beta = list(torch._foreach_neg(grads)), -_dot(grads, grads), torch.zeros(())
        alpha = group["lr"]
        if group["line_search"]:
            assert closure is not None and loss is not None
            alpha = self._backtrack(params, new_direction, closure, float(loss), float(slope), group)
        else:
            torch._foreach_add_(params, new_direction, alpha=alpha)
        state.update(step=t + 1, grad=grads, direction=new_direction, alpha=alpha, beta=float(beta))
        return loss

    def _backtrack(
        self,
        params: list[torch.Tensor],
        direction: list[torch.Tensor],
        closure: Callable[[], Any],
        loss: float,
        slope: float,
        group: dict,
    ) -> float:
        """Armijo backtracking; leaves the parameters at W + α·p and returns α."""
        alpha, moved = group["lr"], 0.0
        for _ in range(group["max_backtracks"] + 1):
            torch._foreach_add_(params, direction, alpha=alpha - moved)
            moved = alpha
            trial = float(evaluate(closure))
            if trial <= loss + group["c"] * alpha * slope:
                break
            alpha *= group["shrink"]
        return moved
