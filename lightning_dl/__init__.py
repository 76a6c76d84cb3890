"""lightning_dl: a PyTorch Lightning plugin suite for distributed training strategies, training callbacks and the
optimizers, norms and initialisations of the deep-learning literature.

Importing the package registers its strategy names in Lightning's ``StrategyRegistry``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lightning-dl")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.0.0"

from lightning_dl import strategies  # registers the strategy names

__all__ = ["__version__", "strategies"]
