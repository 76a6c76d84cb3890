"""LARS (You et al. 2017): SGD with momentum whose step for each layer is scaled by the trust ratio
η·‖w‖/(‖g‖ + λ‖w‖), so that every layer moves by a similar fraction of its weights at large batch sizes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_dl.optim._checks import check_range, dense_grads, evaluate


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling. Per parameter tensor ``w`` with gradient ``g``:

        trust = η·‖w‖ / (‖g‖ + λ‖w‖ + ε)   (1 when ‖w‖ or ‖g‖ is 0; min(trust, 1) with ``trust_clip``)
        d = trust · (g + λw);   buf = μ·buf + d;   w ← w − lr·buf

    Parameters with ``ndim <= 1`` (biases, norm weights) skip the trust ratio and the weight decay when
    ``exclude_1d`` (their update is plain SGD with momentum).

    Args:
        params: parameters or param groups.
        lr: learning rate (>= 0).
        momentum: μ in [0, 1).
        weight_decay: λ >= 0.
        trust_coefficient: η > 0.
        eps: ε > 0 in the trust ratio's denominator.
        trust_clip: cap the trust ratio at 1 (LARC's clipping).
        exclude_1d: leave parameters with ``ndim <= 1`` out of adaptation and weight decay.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = LARS(model.parameters(), lr=0.1, weight_decay=1e-4)
        >>> model(torch.randn(3, 4)).sum().backward(); optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        exclude_1d: bool = True,
    ) -> None:
        check_range("lr", lr, low=0.0, high=None)
        check_range("momentum", momentum, low=0.0, high=1.0)
        check_range("weight_decay", weight_decay, low=0.0, high=None)
        check_range("trust_coefficient", trust_coefficient, low=0.0, high=None, low_open=True)
        check_range("eps", eps, low=0.0, high=None, low_open=True)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            trust_clip=trust_clip,
            exclude_1d=exclude_1d,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate(closure)
        for group in self.param_groups:
            params, grads = dense_grads("LARS", group["params"])
            if not params:
                continue
            adapt = [not (group["exclude_1d"] and p.ndim <= 1) for p in params]
            w_norms = torch.stack(torch._foreach_norm(params))
            g_norms = torch.stack(torch._foreach_norm(grads))
            wd, eta = group["weight_decay"], group["trust_coefficient"]
            trust = eta * w_norms / (g_norms + wd * w_norms + group["eps"])
            trust = torch.where((w_norms > 0) & (g_norms > 0), trust, torch.ones_like(trust))
            if group["trust_clip"]:
                trust = trust.clamp(max=1.0)
            trust = torch.where(torch.tensor(adapt, device=trust.device), trust, torch.ones_like(trust))
            decayed = [g.add(p, alpha=wd) if a and wd else g for p, g, a in zip(params, grads, adapt, strict=True)]
            updates = list(torch._foreach_mul(decayed, list(trust.unbind())))
            if group["momentum"]:
                buffers = []
                for p, update in zip(params, updates, strict=True):
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = update.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                    buffers.append(state["momentum_buffer"])
                updates = buffers
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss
