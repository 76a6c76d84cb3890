"""DiLoCo (Douillard et al. 2023): the module's optimizer is the inner one; every ``sync_every`` steps the averaged
pseudo-gradient ``θ_start − mean_r θ_r`` is applied to ``θ_start`` by an outer Nesterov-momentum SGD."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_dl.parallel.comm import average_, check_outer, outer_step_
from lightning_dl.strategies.local_sgd import LocalSGDStrategy


class DiLoCoStrategy(LocalSGDStrategy):
    """Local inner steps, an outer Nesterov step on the averaged parameter change every ``sync_every`` steps. The
    outer state (``θ_start`` and the outer momentum) is saved in checkpoints with every rank's inner state.

    Args:
        sync_every: inner optimizer steps per outer step (H >= 1).
        outer_lr: outer learning rate (> 0); 1 with ``outer_momentum=0`` is local SGD.
        outer_momentum: outer Nesterov momentum μ in [0, 1).
        nesterov: Nesterov (True) or heavy-ball outer momentum.
        **kwargs: as ``LocalSGDStrategy`` (``timeout``, DDP's arguments).

    Example::

        >>> DiLoCoStrategy(sync_every=16, outer_lr=0.7, outer_momentum=0.9).outer_lr
        0.7
    """

    strategy_name = "diloco"

    def __init__(
        self,
        *,
        sync_every: int = 16,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        **kwargs: Any,
    ) -> None:
        check_outer(outer_lr, outer_momentum)
        super().__init__(sync_every=sync_every, **kwargs)
        self.outer_lr, self.outer_momentum, self.nesterov = float(outer_lr), float(outer_momentum), nesterov
        self._start: dict[str, torch.Tensor] = {}
        self._momentum: dict[str, torch.Tensor] = {}

    @override
    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)  # DDP broadcast rank 0's parameters: θ_start is the same everywhere
        if trainer.state.fn == "fit":
            named = dict(self._module.named_parameters())
            self._start = {n: p.detach().clone() for n, p in named.items()}
            self._momentum = {n: torch.zeros_like(p) for n, p in named.items()}

    @override
    def _synchronize(self) -> None:
        names = list(self._start)
        named = dict(self._module.named_parameters())
        params = [named[n] for n in names]
        with torch.no_grad():
            self._param_bytes += average_(params)
            outer_step_(
                params,
                [self._start[n] for n in names],
                [self._momentum[n] for n in names],
                lr=self.outer_lr,
                mu=self.outer_momentum,
                nesterov=self.nesterov,
            )

    @override
    def _shared_state(self) -> dict[str, Any]:
        return {
            "start": {n: t.detach().cpu().clone() for n, t in self._start.items()},
            "momentum": {n: t.detach().cpu().clone() for n, t in self._momentum.items()},
        }

    @override
    def _load_shared_state(self, state: dict[str, Any]) -> None:
        device = self.root_device
        self._start = {n: t.to(device) for n, t in state["start"].items()}
        self._momentum = {n: t.to(device) for n, t in state["momentum"].items()}
