"""``build_optimizer(name, params, **kwargs)``: every optimizer of the suite by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from lightning_dl.optim.adaptive_sgd import AdaptiveSGD
from lightning_dl.optim.conjugate_gradient import ConjugateGradient
from lightning_dl.optim.lamb import LAMB
from lightning_dl.optim.lars import LARS
from lightning_dl.optim.simplified_adam import SimplifiedAdam

# name -> (constructor, defaults applied before the user's keyword arguments)
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd": (torch.optim.SGD, {"lr": 0.01}),
    "momentum": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    # w(m+1) = w(m) + (1 − α)Δw_bp(m) + αΔw(m−1): torch's SGD with dampening equal to the momentum
    "momentum_ema": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "dampening": 0.9}),
    "nesterov": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {}),
    "rmsprop": (torch.optim.RMSprop, {}),
    "adadelta": (torch.optim.Adadelta, {}),
    "adam": (torch.optim.Adam, {}),
    "adamw": (torch.optim.AdamW, {}),
    "lars": (LARS, {}),
    "lamb": (LAMB, {}),
    "simplified_adam": (SimplifiedAdam, {}),
    "adaptive_sgd": (AdaptiveSGD, {}),
    "conjugate_gradient": (ConjugateGradient, {}),
}


def build_optimizer(name: str, params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` over ``params`` (tensors or param-group dicts).

    Torch's optimizers take their documented defaults except where a name implies more (``momentum``: 0.9,
    ``nesterov``, ``momentum_ema``: dampening 0.9, and SGD's lr 0.01, which torch leaves unset).

    Example::

        >>> model = torch.nn.Linear(4, 2)
        >>> build_optimizer("lamb", model.parameters(), lr=1e-3).__class__.__name__
        'LAMB'
    """
    try:
        constructor, defaults = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"Unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZERS)}.") from None
    return constructor(params, **(defaults | kwargs))
