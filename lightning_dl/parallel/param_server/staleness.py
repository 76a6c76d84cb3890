"""Staleness corrections for asynchronous SGD. A gradient ``g`` computed at parameters ``θ_stale`` (version ``v``)
reaches the server at version ``v + τ``; before applying it the server may correct it:

- ``none``: apply ``g`` as it is (Downpour SGD, Dean et al. 2012);
- ``inverse``: scale the learning rate by ``1/τ`` (staleness-aware SGD, Zhang et al. 2016), τ taken as at least 1;
- ``dc``: delay compensation, ``g + λ·g⊙g⊙(θ_now − θ_stale)`` (DC-ASGD, Zheng et al. 2017), a first-order
  Taylor correction of the gradient towards the current parameters with ``g⊙g`` approximating the Hessian diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POLICIES = ("none", "inverse", "dc")


def compensate(
    policy: str,
    grads: Sequence[torch.Tensor],
    *,
    staleness: int,
    params_now: Sequence[torch.Tensor] | None = None,
    params_stale: Sequence[torch.Tensor] | None = None,
    dc_lambda: float = 0.04,
) -> tuple[list[torch.Tensor], float]:
    """The corrected gradients (new tensors) and the factor for the learning rate, for a gradient ``staleness``
    versions old. ``dc`` needs the parameters now and those the gradient was computed at.

    Example::

        >>> g = [torch.tensor([1.0, -2.0])]
        >>> compensate("inverse", g, staleness=4)[1]
        0.25
        >>> compensate("dc", g, staleness=1, params_now=[torch.tensor([1.0, 1.0])],
        ...            params_stale=[torch.tensor([0.0, 0.0])], dc_lambda=0.5)[0][0].tolist()
        [1.5, 0.0]
    """
    if policy not in POLICIES:
        raise ValueError(f"`staleness_policy` must be one of {POLICIES}, got {policy!r}.")
    if staleness < 0:
        raise ValueError(f"`staleness` must be >= 0, got {staleness!r}.")
    if dc_lambda < 0:
        raise ValueError(f"`dc_lambda` (λ) must be >= 0, got {dc_lambda!r}.")
    if policy == "none":
        return [g.clone() for g in grads], 1.0
    if policy == "inverse":
        return [g.clone() for g in grads], 1.0 / max(staleness, 1)
    if params_now is None or params_stale is None or not len(params_now) == len(params_stale) == len(grads):
        raise ValueError("`staleness_policy='dc'` needs `params_now` and `params_stale`, one tensor per gradient.")
    drift = torch._foreach_sub(list(params_now), list(params_stale))
    corrected = torch._foreach_mul(list(grads), list(grads))
    torch._foreach_mul_(corrected, drift)
    torch._foreach_mul_(corrected, dc_lambda)
    torch._foreach_add_(corrected, list(grads))
    return list(corrected), 1.0
