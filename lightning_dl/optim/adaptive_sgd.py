"""McAllester's adaptive SGD: a per-coordinate learning rate from running estimates of the gradient's mean and
variance, and a per-coordinate averaging horizon from the critical batch size B* they imply."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_dl.optim._checks import check_range, dense_grads, evaluate


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
        loss = evaluate(closure)
        for group in self.param_groups:
            params, grads = dense_grads("AdaptiveSGD", group["params"])
            if not params:
                continue
            k, eps = group["warmup_steps"], group["eps"]
            lambda_b, lambda_eta = group["lambda_b"], group["lambda_eta"]
            # state holds B*/λ_B and η/λ_η: the constants fold into the weight and the update
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["mean"] = torch.zeros_like(p)
                    state["mean_sq"] = torch.zeros_like(p)
                    state["b_star_ratio"] = torch.full_like(p, float(max(k, 1)) / lambda_b)
                    state["eta_ratio"] = torch.zeros_like(p)
                state["step"] += 1
            states = [self.state[p] for p in params]
            means, mean_sqs = [s["mean"] for s in states], [s["mean_sq"] for s in states]
            # w = min(1, B / B*) = min(1, (B/λ_B) / ratio), in a scratch list that later holds g̃²
            weights = torch._foreach_reciprocal([s["b_star_ratio"] for s in states])
            torch._foreach_mul_(weights, group["batch_size"] / lambda_b)
            torch._foreach_clamp_max_(weights, 1.0)
            torch._foreach_lerp_(means, grads, weights)
            squares = torch._foreach_mul(grads, grads)
            torch._foreach_lerp_(mean_sqs, squares, weights)
            for p, g, state, mean_sq, var in zip(params, grads, states, weights, squares, strict=True):
                torch.mul(state["mean"], state["mean"], out=mean_sq)  # g̃²
                torch.sub(state["mean_sq"], mean_sq, out=var).clamp_(min=0.0)  # σ̃² = max(s̃ − g̃², 0)
                if state["step"] <= k:
                    state["b_star_ratio"].fill_(float(max(k, 1)) / lambda_b)
                    state["eta_ratio"].zero_()
                    continue
                torch.div(mean_sq, var.add_(eps), out=state["eta_ratio"])  # η/λ_η = g̃²/(σ̃² + ε)
                torch.div(var.sub_(eps), mean_sq.add_(eps), out=state["b_star_ratio"])  # B*/λ_B = σ̃²/(g̃² + ε)
                p.addcmul_(state["eta_ratio"], g, value=-group["lr"] * lambda_eta)
        return loss

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """Mean B* and mean η over every coordinate that has state."""
        b_star = eta = 0.0
        count = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "b_star_ratio" in state:
                    b_star += group["lambda_b"] * float(state["b_star_ratio"].sum())
                    eta += group["lambda_eta"] * float(state["eta_ratio"].sum())
                    count += state["b_star_ratio"].numel()
        return {"b_star": b_star / count, "eta": eta / count} if count else {}
