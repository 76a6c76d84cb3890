"""LAMB (You et al. 2019): Adam's direction with a per-layer trust ratio ‖w‖/‖update‖, for large-batch training."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_dl.optim._checks import check_betas, check_range, dense_grads, evaluate


class LAMB(torch.optim.Optimizer):
    """Layer-wise adaptive moments. Per parameter tensor ``w`` with gradient ``g`` at step ``t``:

        m = β1·m + (1 − β1)·g;   v = β2·v + (1 − β2)·g²
        u = (m / (1 − β1ᵗ)) / (√(v / (1 − β2ᵗ)) + ε) + λ·w
        trust = ‖w‖ / ‖u‖   (1 when either is 0; at most ``max_trust`` when given)
        w ← w − lr · trust · u

    Parameters with ``ndim <= 1`` skip the trust ratio and the weight decay when ``exclude_1d`` (an Adam step).

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = LAMB(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model(torch.randn(3, 4)).sum().backward(); optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_trust: float | None = None,
        exclude_1d: bool = True,
    ) -> None:
        check_range("lr", lr, low=0.0, high=None)
        check_betas(betas)
        check_range("eps", eps, low=0.0, high=None, low_open=True)
        check_range("weight_decay", weight_decay, low=0.0, high=None)
        if max_trust is not None:
            check_range("max_trust", max_trust, low=0.0, high=None, low_open=True)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, max_trust=max_trust, exclude_1d=exclude_1d
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate(closure)
        for group in self.param_groups:
            params, grads = dense_grads("LAMB", group["params"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
            exp_avg = [self.state[p]["exp_avg"] for p in params]
            exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in params]
            steps = [self.state[p]["step"] for p in params]
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            # u = m̂/(√v̂ + ε) = m / (bc1·(√v/√bc2 + ε)): both bias corrections folded into one denominator
            bc1 = [1 - beta1**t for t in steps]
            bc2_sqrt = [(1 - beta2**t) ** 0.5 for t in steps]
            updates = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_mul_(updates, [a / b for a, b in zip(bc1, bc2_sqrt, strict=True)])
            torch._foreach_add_(updates, [group["eps"] * a for a in bc1])
            torch._foreach_div_(updates, exp_avg)
            torch._foreach_reciprocal_(updates)
            adapt = [not (group["exclude_1d"] and p.ndim <= 1) for p in params]
            wd = group["weight_decay"]
            if wd:
                decayed = [(u, p) for u, p, a in zip(updates, params, adapt, strict=True) if a]
                if decayed:
                    torch._foreach_add_([u for u, _ in decayed], [p for _, p in decayed], alpha=wd)
            w_norms = torch.stack(torch._foreach_norm(params))
            u_norms = torch.stack(torch._foreach_norm(updates))
            trust = torch.where((w_norms > 0) & (u_norms > 0), w_norms / u_norms, torch.ones_like(w_norms))
            if group["max_trust"] is not None:
                trust = trust.clamp(max=group["max_trust"])
            # one host synchronisation for the group, then a single pass per tensor
            for p, u, ratio, a in zip(params, updates, trust.tolist(), adapt, strict=True):
                p.add_(u, alpha=-group["lr"] * (ratio if a else 1.0))
        return loss
