"""Optimizers the literature describes that torch lacks (LARS, LAMB, simplified Adam, adaptive SGD, nonlinear
conjugate gradient), and ``build_optimizer(name, params, **kwargs)`` for every optimizer by name. Torch only."""

from lightning_dl.optim.adaptive_sgd import AdaptiveSGD
from lightning_dl.optim.conjugate_gradient import ConjugateGradient
from lightning_dl.optim.lamb import LAMB
from lightning_dl.optim.lars import LARS
from lightning_dl.optim.registry import OPTIMIZERS, build_optimizer
from lightning_dl.optim.simplified_adam import SimplifiedAdam

__all__ = ["LAMB", "LARS", "OPTIMIZERS", "AdaptiveSGD", "ConjugateGradient", "SimplifiedAdam", "build_optimizer"]
