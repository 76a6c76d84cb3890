"""Networks, norms and initialisations (torch only: nothing here imports Lightning)."""

from lightning_dl.nn.models import MLP, make_activation

__all__ = ["MLP", "make_activation"]
