"""McAllester's adaptive SGD: a per-coordinate learning rate from running estimates of the gradient's mean and
variance, and a per-coordinate averaging horizon from the critical batch size B* they imply."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_dl.optim._checks import check_range, dense_grads, evaluate


class AdaptiveSGD(torch.optim.Optimizer):
    """At step ``t`` (from 1) with gradient ĝ_t over a batch of ``B`` samples, per coordinate ``i``:

        w_t  = 1 / min(t, N_{t−1})                                   (N_0 = K, or 1 when K = 0)
        g̃_t = (1 − w_t)·g̃_{t−1} + w_t·ĝ_t;   s̃_t = (1 − w_t)·s̃_{t−1} + w_t·ĝ_t²;   σ̃_t² = max(s̃_t − g̃_t², 0)
        N_t  = K for t ≤ K, else max(λ_B·σ̃_t² / (g̃_t² + ε), min_horizon)
        η_t  = 0 for t ≤ K, else min(λ_η·g̃_t² / (σ̃_t² + ε), max_eta)
        Φ_{t+1} = Φ_t − lr·η_t·ĝ_t

    with ``g̃_0 = s̃_0 = 0``. ``N`` is the averaging horizon in *batches* and σ̃² the variance of *batch* gradients,
    so ``B·σ̃²`` estimates the per-sample variance σ̂² and the critical batch ``B* = B·N = λ_B·σ̂²/ĝ²`` counts
    samples, as in the derivation (λ_B = 16). ``w_t = 1/min(t, N)`` is the bias-corrected weight of the seed's
    running averages: the mean of all gradients so far while ``t ≤ N``. The first ``K`` steps only
    gather statistics. λ_η = 1/(32·L) for a curvature bound ``L`` gives the derivation's η_B = B·ĝ²/(32·σ̂²·L).
    ``lr`` (default 1) scales the step so that LR schedules compose.

    Two additions to the derivation's rule keep it finite: ``min_horizon`` (default 2) bounds N from below, so the
    averages always span more than the latest gradient (at N = 1 the weight is 1, σ̃² is exactly 0 and N stays at
    its floor); ``max_eta`` (default 1) bounds η where σ̃² is tiny (η = λ_η·g̃²/ε otherwise, e.g. under full-batch
    gradients). ``batch_size`` only converts N into B*: give it the effective batch (``BatchSizeScaling`` keeps it
    so) for B* in samples. :meth:`statistics` gives the mean B* (samples) and the mean η, for logging.

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = AdaptiveSGD(model.parameters(), batch_size=3, warmup_steps=2, lr=0.1)
        >>> for _ in range(3):
        ...     model.zero_grad(); model(torch.randn(3, 4)).pow(2).mean().backward(); optimizer.step()
        >>> sorted(optimizer.statistics())
        ['b_star', 'eta']
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
        min_horizon: float = 2.0,
        max_eta: float = 1.0,
    ) -> None:
        check_range("batch_size", batch_size, low=1.0, high=None)
        check_range("warmup_steps", warmup_steps, low=0.0, high=None)
        check_range("lambda_b", lambda_b, low=0.0, high=None, low_open=True)
        check_range("lambda_eta", lambda_eta, low=0.0, high=None, low_open=True)
        check_range("eps", eps, low=0.0, high=None, low_open=True)
        check_range("lr", lr, low=0.0, high=None)
        check_range("min_horizon", min_horizon, low=1.0, high=None)
        check_range("max_eta", max_eta, low=0.0, high=None, low_open=True)
        defaults = dict(
            batch_size=batch_size,
            warmup_steps=warmup_steps,
            lambda_b=lambda_b,
            lambda_eta=lambda_eta,
            eps=eps,
            lr=lr,
            min_horizon=min_horizon,
            max_eta=max_eta,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate(closure)
        for group in self.param_groups:
            params, grads = dense_grads("AdaptiveSGD", group["params"])
            if not params:
                continue
            k = group["warmup_steps"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["mean"] = torch.zeros_like(p)
                    state["mean_sq"] = torch.zeros_like(p)
                    state["rate"] = torch.full_like(p, 1.0 / max(k, 1))  # 1/N_0 = 1/K (1 when K = 0: w_1 = 1)
                    state["eta"] = torch.zeros_like(p)
                state["step"] += 1
            states = [self.state[p] for p in params]
            means, mean_sqs = [s["mean"] for s in states], [s["mean_sq"] for s in states]
            # w = 1/min(t, N_{t−1}) = max(1/t, 1/N_{t−1}); the state keeps the rate 1/N
            weights = torch._foreach_clamp_min([s["rate"] for s in states], [1.0 / s["step"] for s in states])
            torch._foreach_lerp_(means, grads, weights)
            squares = torch._foreach_mul(grads, grads)
            torch._foreach_lerp_(mean_sqs, squares, weights)
            active = [i for i, s in enumerate(states) if s["step"] > k]
            if not active:
                continue
            actives = [states[i] for i in active]
            act_means = [means[i] for i in active]
            g2 = torch._foreach_mul(act_means, act_means)  # g̃²
            var = torch._foreach_sub([mean_sqs[i] for i in active], g2)
            torch._foreach_clamp_min_(var, 0.0)  # σ̃² = max(s̃ − g̃², 0)
            # η = min(λ_η·g̃²/(σ̃² + ε), max_eta)
            etas = torch._foreach_div(g2, torch._foreach_add(var, group["eps"]))
            torch._foreach_mul_(etas, group["lambda_eta"])
            torch._foreach_clamp_max_(etas, group["max_eta"])
            # 1/N = min((g̃² + ε)/(λ_B·σ̃²), 1/min_horizon)  (σ̃² = 0 gives 1/min_horizon)
            torch._foreach_add_(g2, group["eps"])  # g2 becomes the new rate 1/N
            torch._foreach_div_(g2, var)
            torch._foreach_mul_(g2, 1.0 / group["lambda_b"])
            torch._foreach_clamp_max_(g2, 1.0 / group["min_horizon"])
            for state, eta, rate in zip(actives, etas, g2, strict=True):
                state["eta"], state["rate"] = eta, rate
            torch._foreach_addcmul_([params[i] for i in active], etas, [grads[i] for i in active], value=-group["lr"])
        return loss

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """Mean B* = ``batch_size``·N (in samples) and mean η over every coordinate that has state."""
        b_star = eta = 0.0
        count = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "rate" in state:
                    b_star += group["batch_size"] * float(state["rate"].reciprocal().sum())
                    eta += float(state["eta"].sum())
                    count += state["rate"].numel()
        return {"b_star": b_star / count, "eta": eta / count} if count else {}
