"""McAllester's adaptive SGD: a per-coordinate learning rate from running estimates of the gradient's mean and
variance, and a per-coordinate averaging horizon from the critical batch size B* they imply."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_dl.optim._checks import check_range, dense_grads


class AdaptiveSGD(torch.optim.Optimizer):
    """At step ``t`` (from 1) with gradient ĝ_t over a batch of ``B`` samples, per coordinate ``i``:

        w = min(1, B / B*_{t−1}[i])
        g̃_t = (1 − w)·g̃_{t−1} + w·ĝ_t;   s̃_t = (1 − w)·s̃_{t−1} + w·ĝ_t²;   σ̃_t² = max(s̃_t − g̃_t², 0)
        B*_t = K for t ≤ K, else λ_B·σ̃_t² / (g̃_t² + ε)
        η_t  = 0 for t ≤ K, else λ_η·g̃_t² / (σ̃_t² + ε)
        Φ_{t+1} = Φ_t − lr·η_t·ĝ_t

    with ``B*_0 = K`` and ``g̃_0 = s̃_0 = 0``. The first ``K`` steps only gather statistics. ``lr`` (default 1)
    scales the step so that LR schedules compose; ``batch_size`` is kept in each param group, where
    ``BatchSizeScaling`` updates it. λ_B = 16 comes from the one-dimensional derivation; λ_η = 1/(32·L) for a
    curvature bound ``L``. :meth:`statistics` gives the mean B* and the mean η, for logging.

    Choose ``K`` above the batch size: the weight is ``min(1, B/B*)``, so a coordinate whose B* falls to ``B`` or
    below averages over the latest gradient alone, its variance estimate is 0, and its B* stays 0 from then on.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = AdaptiveSGD(model.parameters(), batch_size=32, warmup_steps=2)
        >>> model(torch.randn(3, 4)).sum().backward(); optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        batch_size: int = 32,
        warmup_steps: int = 10,
        lambda_b: float = 16.0,
        lambda_eta: float = 1.0 / 32,
        eps: float = 1e-8,
        lr: float = 1.0,
    ) -> None:
        check_range("batch_size", batch_size, low=1.0, high=None)
        check_range("warmup_steps", warmup_steps, low=0.0, high=None)
        check_range("lambda_b", lambda_b, low=0.0, high=None, low_open=True)
        check_range("lambda_eta", lambda_eta, low=0.0, high=None, low_open=True)
        check_range("eps", eps, low=0.0, high=None, low_open=True)
        check_range("lr", lr, low=0.0, high=None)
        defaults = dict(
            batch_size=batch_size, warmup_steps=warmup_steps, lambda_b=lambda_b, lambda_eta=lambda_eta, eps=eps, lr=lr
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = dense_grads("AdaptiveSGD", group["params"])
            if not params:
                continue
            k = group["warmup_steps"]
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["mean"] = torch.zeros_like(p)
                    state["mean_sq"] = torch.zeros_like(p)
                    state["b_star"] = torch.full_like(p, float(max(k, 1)))
                    state["eta"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                w = (group["batch_size"] / state["b_star"]).clamp_(max=1.0)
                state["mean"].lerp_(g, w)
                state["mean_sq"].lerp_(g * g, w)
                mean_sq_of_mean = state["mean"].square()
                var = (state["mean_sq"] - mean_sq_of_mean).clamp_(min=0.0)
                if t <= k:
                    state["b_star"].fill_(float(max(k, 1)))
                    state["eta"].zero_()
                    continue
                torch.div(group["lambda_b"] * var, mean_sq_of_mean + group["eps"], out=state["b_star"])
                torch.div(group["lambda_eta"] * mean_sq_of_mean, var + group["eps"], out=state["eta"])
                p.addcmul_(state["eta"], g, value=-group["lr"])
        return loss

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """Mean B* and mean η over every coordinate that has state."""
        b_star = [s["b_star"] for s in self.state.values() if "b_star" in s]
        eta = [s["eta"] for s in self.state.values() if "eta" in s]
        if not b_star:
            return {}
        count = sum(t.numel() for t in b_star)
        return {"b_star": float(sum(t.sum() for t in b_star)) / count, "eta": float(sum(t.sum() for t in eta)) / count}
