"""McAllester's simplified Adam: running means over explicit horizons instead of decay rates plus bias correction."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_dl.optim._checks import check_range, dense_grads, evaluate


class SimplifiedAdam(torch.optim.Optimizer):
    """At step ``t`` (from 1), with horizons ``N_g`` and ``N_s``:

        μ_t = (1 − 1/min(t, N_g))·μ_{t−1} + (1/min(t, N_g))·ĝ_t
        s_t = (1 − 1/min(t, N_s))·s_{t−1} + (1/min(t, N_s))·ĝ_t²
        Φ_{t+1} = Φ_t − η·μ_t / (√s_t + ε)

    Until ``t`` reaches a horizon the average is the plain mean of all gradients so far, so no bias correction is
    needed; afterwards it is an exponential average with decay ``1 − 1/N``.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = SimplifiedAdam(model.parameters(), lr=1e-3, horizon_g=10, horizon_s=1000)
        >>> model(torch.randn(3, 4)).sum().backward(); optimizer.step()
    """

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, horizon_g: int = 10, horizon_s: int = 1000, eps: float = 1e-8
    ) -> None:
        check_range("lr", lr, low=0.0, high=None)
        check_range("horizon_g", horizon_g, low=1.0, high=None)
        check_range("horizon_s", horizon_s, low=1.0, high=None)
        check_range("eps", eps, low=0.0, high=None, low_open=True)
        super().__init__(params, dict(lr=lr, horizon_g=horizon_g, horizon_s=horizon_s, eps=eps))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate(closure)
        for group in self.param_groups:
            params, grads = dense_grads("SimplifiedAdam", group["params"])
            if not params:
                continue
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["mean"] = torch.zeros_like(p)
                    state["mean_sq"] = torch.zeros_like(p)
                state["step"] += 1
            means = [self.state[p]["mean"] for p in params]
            mean_sqs = [self.state[p]["mean_sq"] for p in params]
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_lerp_(means, grads, [1.0 / min(t, group["horizon_g"]) for t in steps])
            rates = [1.0 / min(t, group["horizon_s"]) for t in steps]
            torch._foreach_mul_(mean_sqs, [1.0 - r for r in rates])
            torch._foreach_addcmul_(mean_sqs, grads, grads, rates)
            denom = torch._foreach_sqrt(mean_sqs)
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(params, means, denom, value=-group["lr"])
        return loss
