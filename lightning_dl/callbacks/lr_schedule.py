"""``LRSchedule``: warmup and a decay shape, written into every param group before each optimizer step."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl import schedules
from lightning_dl.callbacks._logging import log_step
from lightning_dl.callbacks._param_groups import FIELDS, FieldSchedule, find_scaler, initial_value, write_field


class LRSchedule(Callback, FieldSchedule):
    """Warmup then a decay shape, applied to every param group of every optimizer as
    ``value = initial_value × factor(step)`` before each optimizer step (so gradient accumulation counts optimizer
    steps, not batches). The step is ``trainer.global_step``; under ``BatchSizeScaling(rule="adascale")`` it is the
    scale-invariant progress instead, and the scaling factors multiply the scheduled value.

    Args:
        shape: ``constant``, ``linear``, ``cosine``, ``cosine_restarts``, ``wsd``, ``polynomial``, ``inverse_sqrt``
            or ``step`` (see :mod:`lightning_dl.schedules`).
        warmup_steps: optimizer steps of warmup.
        warmup_type: ``linear`` or ``exponential``.
        warmup_start_ratio: factor at step 0 of the warmup.
        total_steps: length of the schedule; ``None`` takes ``trainer.estimated_stepping_batches``.
        field: ``lr`` (default), ``weight_decay`` or ``momentum`` (``betas[0]`` for Adam).
        log: log the value of each group as ``<field>`` (one group) or ``<field>/pg<i>`` on the steps Lightning
            writes logs (``log_every_n_steps``).
        **shape_kwargs: the shape's own parameters, e.g. ``min_lr_ratio``, ``num_cycles``, ``decay_fraction``,
            ``milestones``.

    Example::

        >>> import lightning as L
        >>> from lightning_dl.callbacks import LRSchedule
        >>> trainer = L.Trainer(callbacks=[LRSchedule("cosine", warmup_steps=100, min_lr_ratio=0.1)])
    """

    def __init__(
        self,
        shape: str = "cosine",
        *,
        warmup_steps: int = 0,
        warmup_type: str = "linear",
        warmup_start_ratio: float = 0.0,
        total_steps: int | None = None,
        field: str = "lr",
        log: bool = True,
        **shape_kwargs: Any,
    ) -> None:
        if field not in FIELDS:
            raise ValueError(f"`field` must be one of {FIELDS}, got {field!r}.")
        self.shape = shape
        self.warmup_steps = warmup_steps
        self.warmup_type = warmup_type
        self.warmup_start_ratio = warmup_start_ratio
        self.total_steps = total_steps
        self._resolved_total: int | None = total_steps  # the length this fit uses (state_dict keeps it)
        self.field = field
        self.log = log
        self.shape_kwargs = shape_kwargs
        self._validate()

    def _validate(self, total_steps: int | None = None) -> None:
        schedules.validate_schedule(
            self.shape,
            warmup_steps=self.warmup_steps,
            warmup_type=self.warmup_type,
            warmup_start_ratio=self.warmup_start_ratio,
            total_steps=total_steps or self.total_steps,
            **self.shape_kwargs,
        )

    def factor(self, step: float, total_steps: int | None = None) -> float:
        """The schedule's factor at ``step`` over ``total_steps`` (default: the length resolved for this fit)."""
        total = total_steps or self._resolved_total
        if total is None:
            raise RuntimeError("`total_steps` is not known yet: it is resolved when fitting starts.")
        return schedules.lr_factor(
            self.shape,
            step,
            total_steps=total,
            warmup_steps=self.warmup_steps,
            warmup_type=self.warmup_type,
            warmup_start_ratio=self.warmup_start_ratio,
            **self.shape_kwargs,
        )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            raise ValueError(
                f"LRSchedule writes `{self.field}` itself, but `configure_optimizers` also returns the LR scheduler "
                f"{type(config.scheduler).__name__}: remove one of the two."
            )
        if self.total_steps is None and self._resolved_total is None:  # not given, not restored from a checkpoint
            estimated = trainer.estimated_stepping_batches
            if estimated == float("inf"):
                raise ValueError("LRSchedule needs `total_steps` when the Trainer has no `max_steps` or `max_epochs`.")
            self._resolved_total = int(estimated)
        self._validate(self._resolved_total)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                initial_value(group, self.field)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        scaling = find_scaler(trainer)
        progress = scaling.progress(trainer) if scaling is not None else trainer.global_step
        factor = self.factor(progress)
        multipliers = scaling.multipliers(trainer, optimizer, self.field) if scaling is not None else None
        values = []
        for index, group in enumerate(optimizer.param_groups):
            value = initial_value(group, self.field) * factor
            if multipliers is not None:
                value = multipliers[index](value)
            write_field(group, self.field, value)
            values.append(value)
        if self.log:
            many = len(values) > 1
            for index, value in enumerate(values):
                name = f"{self.field}/pg{index}" if many else self.field
                log_step(pl_module, name, value)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._resolved_total = self.total_steps  # the next fit resolves its own length

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self._resolved_total}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resolved_total = state_dict["total_steps"]
