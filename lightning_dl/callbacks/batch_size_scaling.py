"""``BatchSizeScaling``: scale the learning rate (and momentum) with the effective batch size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl import scaling
from lightning_dl.callbacks._logging import log_step
from lightning_dl.callbacks._param_groups import ParamGroupScaler, initial_value, scheduled_fields, write_field
from lightning_dl.parallel.grad_norm import MicroBatchGradSquares, total_norm


@dataclass(frozen=True)
class BatchGeometry:
    """How the samples of one optimizer step are spread: ``per_device × accumulation × data_parallel``."""

    per_device: int
    accumulation: int
    data_parallel: int

    @property
    def effective(self) -> int:
        return self.per_device * self.accumulation * self.data_parallel

    @property
    def num_small(self) -> int:
        """Micro-batch gradients whose mean is the step's gradient."""
        return self.accumulation * self.data_parallel


def data_parallel_size(trainer: L.Trainer) -> int:
    """Ranks that see different data: a strategy's ``data_parallel_size`` or its device mesh's data-parallel
    dimension when it has one (tensor- and pipeline-parallel ranks share data), else the world size."""
    strategy = trainer.strategy
    size = getattr(strategy, "data_parallel_size", None)
    if isinstance(size, int):
        return size
    mesh = getattr(strategy, "device_mesh", None)
    if mesh is not None and mesh.mesh_dim_names:
        for name in ("data_parallel", "dp"):
            if name in mesh.mesh_dim_names:
                return mesh[name].size()
    return trainer.world_size


def batch_geometry(trainer: L.Trainer, per_device: int | None = None) -> BatchGeometry:
    """The batch geometry of the running fit; ``per_device`` defaults to the train DataLoader's ``batch_size``."""
    if per_device is None:
        per_device = getattr(trainer.train_dataloader, "batch_size", None)
        if not isinstance(per_device, int):
            raise ValueError(
                "The per-device batch size cannot be read from the train DataLoader (it has no `batch_size`, e.g. "
                "with a batch_sampler): pass `batch_size=` to the callback."
            )
    return BatchGeometry(per_device, trainer.accumulate_grad_batches, data_parallel_size(trainer))


def reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (a no-op in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values)
    return values


class BatchSizeScaling(Callback, ParamGroupScaler):
    """Scale hyper-parameters with the effective batch ``B = per-device batch × accumulate_grad_batches ×
    data-parallel size`` relative to ``reference_batch_size``: ``k = B / B_ref``.

    Rules: ``linear`` (η·k), ``sqrt`` (η·√k), ``mcallester`` (η·k and β → max(0, 1 − k(1 − β)) for SGD momentum
    and Adam's β1), ``adascale`` (η·r_t with AdaScale's gain r_t measured each step from the spread of the
    micro-batch gradients; the LR schedule then advances by r_t per step), ``none``. With an ``LRSchedule`` the
    schedule applies to the scaled value. A param group with a ``batch_size`` entry (``adaptive_sgd``) is told ``B``.
    Recomputed at every epoch start, so a batch size changed by ``BatchSizeFinder`` is picked up.

    Args:
        reference_batch_size: the batch size the hyper-parameters were tuned for.
        rule: ``linear``, ``sqrt``, ``mcallester``, ``adascale`` or ``none``.
        batch_size: per-device batch size, when the train DataLoader does not say.
        smoothing: AdaScale's EMA decay (default ``max(0, 1 − n/1000)`` for ``n`` micro-batch gradients per step).
        log: log ``batch_size/effective``, ``batch_size/k`` and every factor applied.

    Example::

        >>> import lightning as L
        >>> from lightning_dl.callbacks import BatchSizeScaling
        >>> trainer = L.Trainer(callbacks=[BatchSizeScaling(reference_batch_size=32, rule="linear")])
    """

    def __init__(
        self,
        reference_batch_size: int,
        rule: str = "linear",
        *,
        batch_size: int | None = None,
        smoothing: float | None = None,
        log: bool = True,
    ) -> None:
        if (
            isinstance(reference_batch_size, bool)
            or not isinstance(reference_batch_size, int)
            or reference_batch_size < 1
        ):
            raise ValueError(f"`reference_batch_size` must be an integer >= 1, got {reference_batch_size!r}.")
        if rule not in scaling.RULES:
            raise ValueError(f"`rule` must be one of {scaling.RULES}, got {rule!r}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}.")
        if smoothing is not None and not 0.0 <= smoothing < 1.0:
            raise ValueError(f"`smoothing` must lie in [0, 1), got {smoothing!r}.")
        self.reference_batch_size = reference_batch_size
        self.rule = rule
        self.batch_size = batch_size
        self.log = log
        self.geometry: BatchGeometry | None = None
        self.k = 1.0
        self.estimator = scaling.AdaScaleEstimator(num_groups=0, smoothing=smoothing)
        self._progress_offset = 0.0  # AdaScale: scale-invariant steps minus optimizer steps, before this step
        self._squares: MicroBatchGradSquares | None = None
        self._step_state: tuple[int, float, list[float]] | None = None  # (global_step, progress, per-group gains)

    # -- what LRSchedule asks ------------------------------------------------------------------------------------
    @override
    def progress(self, trainer: L.Trainer) -> float:
        """The step at which a schedule is evaluated for the coming optimizer step."""
        return self._measure(trainer)[1]

    @override
    def multipliers(self, trainer: L.Trainer, optimizer: Optimizer, field: str) -> list[Callable[[float], float]]:
        """Per param group, the map from the unscaled value of ``field`` to the scaled one at the coming step."""
        gains = self._measure(trainer, optimizer)[2]
        if field == "lr":
            factor = scaling.lr_multiplier(self.rule, self.k)
            return [lambda v, g=g: v * factor * g for g in gains]  # type: ignore[misc]
        if field == "momentum" and self.rule == "mcallester":
            return [lambda v: scaling.mcallester_momentum(v, self.k)] * len(optimizer.param_groups)
        return [lambda v: v] * len(optimizer.param_groups)

    # -- hooks -----------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rule == "adascale":
            if len(trainer.optimizers) != 1:
                raise ValueError(f"`rule='adascale'` supports one optimizer, got {len(trainer.optimizers)}.")
            groups = [group["params"] for group in trainer.optimizers[0].param_groups]
            if self.estimator.num_groups not in (0, len(groups)):
                raise ValueError("The optimizer's param groups changed since the AdaScale state was saved.")
            self.estimator.num_groups = len(groups)
            self._squares = MicroBatchGradSquares(groups)
        self._update_geometry(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._update_geometry(trainer, pl_module)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        _, _, gains = self._measure(trainer, optimizer)
        owned = scheduled_fields(trainer)
        for field in ("lr", "momentum"):
            if field in owned or (field == "momentum" and self.rule != "mcallester"):
                continue
            maps = self.multipliers(trainer, optimizer, field)
            for group, scale in zip(optimizer.param_groups, maps, strict=True):
                write_field(group, field, scale(initial_value(group, field)))
        if self.log and self.rule == "adascale":
            log_step(pl_module, "batch_size/adascale_gain", sum(gains) / len(gains))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._squares is not None:
            self._squares.remove()
            self._squares = None

    # -- internals ---------------------------------------------------------------------------------------------
    def _update_geometry(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        geometry = batch_geometry(trainer, self.batch_size)
        if geometry == self.geometry:
            return
        k = scaling.scale_factor(geometry.effective, self.reference_batch_size)
        if self.rule == "adascale":
            if geometry.num_small < 2 and k != 1.0:
                raise ValueError(
                    "`rule='adascale'` measures the gradient variance from at least 2 gradients per step: use "
                    f"devices >= 2 or accumulate_grad_batches >= 2 (got {geometry.data_parallel} data-parallel "
                    f"rank(s) and accumulate_grad_batches={geometry.accumulation})."
                )
            if self.geometry is not None:
                self.estimator.rescale(self.k, k)
        self.geometry, self.k = geometry, k
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if "batch_size" in group:
                    group["batch_size"] = geometry.effective
        if self.log:
            factor = scaling.lr_multiplier(self.rule, k)
            for name, value in (("effective", geometry.effective), ("k", k), ("lr_factor", factor)):
                pl_module.log(f"batch_size/{name}", float(value), on_step=False, on_epoch=True, batch_size=1)

    def _measure(self, trainer: L.Trainer, optimizer: Optimizer | None = None) -> tuple[int, float, list[float]]:
        """Once per optimizer step (memoised on ``global_step``): AdaScale's gains and the schedule progress."""
        step = trainer.global_step
        if self._step_state is not None and self._step_state[0] == step:
            return self._step_state
        optimizer = optimizer or trainer.optimizers[0]
        num_groups = len(optimizer.param_groups)
        gains = [1.0] * num_groups
        progress = step + self._progress_offset
        if self.rule == "adascale" and self._squares is not None and self.geometry is not None:
            small = self._squares.pop()
            if small is not None and self.geometry.num_small >= 2:
                # ‖ḡ‖² per group, the averaged gradient the optimizer steps with (one multi-tensor norm a group)
                big = torch.stack(
                    [
                        total_norm([p.grad for p in g["params"] if p.grad is not None]).to(small.device).pow(2)
                        for g in optimizer.param_groups
                    ]
                )
                # Lightning divides the loss by accumulate_grad_batches: undo it for the micro-batch gradients
                small = reduce_sum(small) * self.geometry.accumulation**2
                self.estimator.update(small, big, self.geometry.num_small, self.k)
                gains = [self.estimator.gain(self.k, group=i) for i in range(num_groups)]
                self._progress_offset += self.estimator.gain(self.k) - 1.0
        self._step_state = (step, progress, gains)
        return self._step_state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "adascale": self.estimator.state_dict(),
            "num_groups": self.estimator.num_groups,
            "progress_offset": self._progress_offset,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state_dict["adascale"])
        self.estimator.num_groups = state_dict["num_groups"]
        self._progress_offset = state_dict["progress_offset"]
