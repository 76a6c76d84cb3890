"""Asynchronous SGD with a parameter server (Downpour SGD): the torch-only pieces. So far the staleness
corrections a server applies to a gradient computed at an older version of the parameters."""

from lightning_dl.parallel.param_server.staleness import POLICIES, compensate

__all__ = ["POLICIES", "compensate"]
