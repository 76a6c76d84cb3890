"""What ``LRSchedule`` and ``BatchSizeScaling`` share: reading and writing a hyper-parameter of a param group, the
value each group started with, and how each finds the other in a Trainer. Both import this module; neither imports
the other."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import lightning as L
from torch.optim import Optimizer

FIELDS = ("lr", "weight_decay", "momentum")


def read_field(group: dict, field: str) -> float:
    """The value of ``field`` in a param group (``momentum`` is ``betas[0]`` for Adam-style optimizers)."""
    if field == "momentum" and "betas" in group:
        return group["betas"][0]
    if field not in group:
        raise ValueError(
            f"`field={field!r}` is not a hyper-parameter of this optimizer's param groups ({sorted(group)})."
        )
    return group[field]


def write_field(group: dict, field: str, value: float) -> None:
    """Set ``field`` of a param group (``momentum`` is ``betas[0]`` for Adam-style optimizers)."""
    if field == "momentum" and "betas" in group:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group[field] = value


def initial_value(group: dict, field: str) -> float:
    """The value the group started with, stamped once as ``initial_<field>`` (kept in the optimizer's state_dict,
    so it survives resume); ratios between groups are preserved because each group keeps its own."""
    return group.setdefault(f"initial_{field}", read_field(group, field))


class FieldSchedule(ABC):
    """A callback that writes one hyper-parameter (``field``) of every param group from a schedule."""

    field: str


class ParamGroupScaler(ABC):
    """A callback that scales hyper-parameters with the batch size; a ``FieldSchedule`` asks it where the schedule
    stands and how to scale the scheduled value."""

    @abstractmethod
    def progress(self, trainer: L.Trainer) -> float:
        """The step at which a schedule is evaluated for the coming optimizer step."""

    @abstractmethod
    def multipliers(self, trainer: L.Trainer, optimizer: Optimizer, field: str) -> list[Callable[[float], float]]:
        """Per param group, the map from the unscaled value of ``field`` to the scaled one at the coming step."""


def find_scaler(trainer: L.Trainer) -> ParamGroupScaler | None:
    """The trainer's batch-size scaling callback, if any."""
    return next((c for c in trainer.callbacks if isinstance(c, ParamGroupScaler)), None)  # type: ignore[attr-defined]


def scheduled_fields(trainer: L.Trainer) -> set[str]:
    """The fields some schedule callback of the trainer writes."""
    return {c.field for c in trainer.callbacks if isinstance(c, FieldSchedule)}  # type: ignore[attr-defined]
