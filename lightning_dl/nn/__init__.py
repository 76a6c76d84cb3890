"""Networks, norms and initialisations (torch only: nothing here imports Lightning)."""

from lightning_dl.nn.init import SCHEMES, fans, init_tensor, init_weights
from lightning_dl.nn.models import MLP, ConvNet, make_activation
from lightning_dl.nn.norms import NORMS, RMSNorm2d, apply_weight_norm, make_norm
from lightning_dl.nn.transformer import TransformerLM

__all__ = [
    "MLP",
    "NORMS",
    "SCHEMES",
    "ConvNet",
    "RMSNorm2d",
    "TransformerLM",
    "apply_weight_norm",
    "fans",
    "init_tensor",
    "init_weights",
    "make_activation",
    "make_norm",
]
