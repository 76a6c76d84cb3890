"""``ScalingEfficiency``: per-step wall time ``T_N``, samples per second, peak memory per rank and time to a target
validation loss of any run, and the lecture's efficiency ``E_N = T_1 / (N · T_N)`` given the one-process time."""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_dl._log_steps import writes_logs
from lightning_dl.callbacks.batch_size_scaling import batch_geometry


def efficiency(t_1: float, t_n: float, n: int) -> float:
    """The parallel efficiency ``E_N = T / (N · T_N)`` of a task that takes ``t_1`` seconds on one node and ``t_n``
    on ``n`` nodes (1.0 is linear scaling).

    Example::

        >>> efficiency(10.0, 5.0, 2), efficiency(10.0, 10.0, 2)  # T_N = T/N, then T_N = 2T/N
        (1.0, 0.5)
    """
    if not t_1 > 0 or not t_n > 0 or not math.isfinite(t_1) or not math.isfinite(t_n):
        raise ValueError(f"the times must be finite and > 0, got t_1={t_1!r} and t_n={t_n!r}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n={n!r}` must be a positive integer (the number of processes).")
    return t_1 / (n * t_n)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's ``values`` (the same length on every rank), ordered by rank; ``[values]`` without a process
    group. A collective over the default group where one exists."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [list(values)]
    local = torch.tensor(values, dtype=torch.float64)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [part.tolist() for part in parts]


def reduce_floats(values: list[float], op: str) -> list[float]:
    """Element-wise ``"max"`` or ``"mean"`` of ``values`` over every rank of the default group (unchanged without
    one). A collective where a process group exists."""
    parts = gather_floats(values)
    columns = list(zip(*parts, strict=True))
    return [max(c) if op == "max" else sum(c) / len(c) for c in columns]


@dataclass
class ScalingReport:
    """What :class:`ScalingEfficiency` measured in one fit."""

    world_size: int
    """N: processes of the run."""
    global_batch_size: int
    """Samples per optimizer step over all data-parallel replicas (``per-device × accumulation × dp``)."""
    steps_measured: int
    """Optimizer steps after the warm-up (of every fit, resumed ones included) that the step time averages over."""
    step_seconds: float
    """T_N: mean wall time of a measured optimizer step, the slowest rank's (a synchronous step waits for it)."""
    step_seconds_median: float
    """Median over the measured steps (of the slowest rank by mean)."""
    samples_per_second: float
    """``global_batch_size / step_seconds``."""
    train_seconds: float
    """Training time of the whole fit, warm-up included (batches only: validation excluded), the slowest rank's."""
    peak_rss_bytes: list[int]
    """Peak resident memory of each rank's process, by rank."""
    seconds_to_target: float | None
    """Training seconds (the slowest rank's) until the monitored validation value, averaged over the ranks, first
    reached the target (None: not reached)."""
    efficiency: float | None
    """``T_1 / (N · T_N)`` when the one-process step time was given."""
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    """(optimizer step, training seconds, monitored validation value) at each validation, the same on every rank."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ScalingEfficiency(Callback):
    """Measure how fast a run trains, for comparing process counts and layouts on one model and global batch.

    Per optimizer step it takes the wall time from the first batch's ``on_train_batch_start`` to the last batch's
    ``on_train_batch_end`` (forward, backward, communication and the optimizer step; data loading between batches
    and validation are not counted; with ``accumulate_grad_batches`` the batches of one step are summed). The first
    ``warmup_steps`` steps of every fit are left out of ``T_N`` (one-off costs: allocator growth, first collectives;
    a fit resumed from a checkpoint, usually in a new process, pays them again). At every
    validation it records the monitored value averaged over the ranks against the training seconds so far (the
    slowest rank's), and the time at which it first reached ``target``. When training ends every rank's mean step
    time and peak RSS are gathered (a collective where a process group exists) and :attr:`report` holds the
    :class:`ScalingReport`; given ``reference_step_seconds`` (T_1, the same model and global batch in one process)
    it includes ``E_N = T_1 / (N · T_N)``.

    On logging steps it logs ``scaling/step_seconds`` and ``scaling/samples_per_second`` of the step just done
    (after the warm-up) and this rank's ``scaling/peak_rss_mib`` so far. At the end of training the report's
    T_N, samples per second, largest peak RSS (MiB), E_N and time to target are also put in
    ``trainer.callback_metrics`` as ``scaling/report_<name>``: a launcher that spawns the ranks returns those to
    the calling process, whose own copy of the callback is never run.

    Args:
        warmup_steps: optimizer steps at the start of every fit left out of the step time.
        target: the monitored validation value to reach (a loss: reached when ``value <= target``).
        monitor: the logged validation metric to follow.
        reference_step_seconds: T_1, the one-process step time, for ``E_N``.
        batch_size: per-device batch size when the train DataLoader does not say.
        clock: the wall clock (seconds), replaceable in tests.

    Example::

        >>> import lightning as L
        >>> from lightning_dl.callbacks import ScalingEfficiency
        >>> trainer = L.Trainer(callbacks=[ScalingEfficiency(warmup_steps=2, target=0.5)])
    """

    def __init__(
        self,
        *,
        warmup_steps: int = 2,
        target: float | None = None,
        monitor: str = "val_loss",
        reference_step_seconds: float | None = None,
        batch_size: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps={warmup_steps!r}` must be an integer >= 0.")
        if target is not None and not math.isfinite(target):
            raise ValueError(f"`target={target!r}` must be a finite number (the validation value to reach) or None.")
        if reference_step_seconds is not None and not (
            math.isfinite(reference_step_seconds) and reference_step_seconds > 0
        ):
            raise ValueError(f"`reference_step_seconds={reference_step_seconds!r}` must be a finite number > 0.")
        if batch_size is not None and (isinstance(batch_size, bool) or batch_size < 1):
            raise ValueError(f"`batch_size={batch_size!r}` must be an integer >= 1.")
        self.warmup_steps = warmup_steps
        self.target = target
        self.monitor = monitor
        self.reference_step_seconds = reference_step_seconds
        self.batch_size = batch_size
        self.clock = clock
        self.step_seconds: list[float] = []
        """Wall time of every optimizer step of this rank, warm-up included."""
        self.train_seconds = 0.0
        self.curve: list[tuple[int, float, float]] = []
        self.seconds_to_target: float | None = None
        self.report: ScalingReport | None = None
        self.warmup_indices: list[int] = []
        """Indices in :attr:`step_seconds` of the warm-up steps of every fit (a resumed fit warms up again)."""
        self._start: float | None = None
        self._pending = 0.0
        self._step_at_start = 0
        self._steps_this_fit = 0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps_this_fit = 0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_start = trainer.global_step
        self._start = self.clock()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._start is None:
            return
        elapsed = self.clock() - self._start
        self._start = None
        self.train_seconds += elapsed
        self._pending += elapsed
        if trainer.global_step == self._step_at_start:  # accumulating: the optimizer step comes with a later batch
            return
        self.step_seconds.append(self._pending)
        self._pending = 0.0
        self._steps_this_fit += 1
        if self._steps_this_fit <= self.warmup_steps:
            self.warmup_indices.append(len(self.step_seconds) - 1)
        else:
            samples = batch_geometry(trainer, self.batch_size).effective
            if writes_logs(trainer, trainer.global_step):
                for name, value in (
                    ("step_seconds", self.step_seconds[-1]),
                    ("samples_per_second", samples / self.step_seconds[-1]),
                    ("peak_rss_mib", peak_rss_bytes() / 2**20),
                ):
                    pl_module.log(f"scaling/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # not on_validation_epoch_end: callbacks run it before the module's, whose logged values come later
        if (
            trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
            or self.monitor not in trainer.callback_metrics
        ):
            return
        (value,) = reduce_floats([float(trainer.callback_metrics[self.monitor])], "mean")
        (seconds,) = reduce_floats([self.train_seconds], "max")
        self.curve.append((trainer.global_step, seconds, value))
        if self.target is not None and self.seconds_to_target is None and value <= self.target:
            self.seconds_to_target = seconds

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        warm = set(self.warmup_indices)
        measured = [s for i, s in enumerate(self.step_seconds) if i not in warm]
        mean = sum(measured) / len(measured) if measured else math.nan
        median = float(torch.tensor(measured).median()) if measured else math.nan
        ranks = gather_floats([mean, median, float(peak_rss_bytes())])
        slowest = max(ranks, key=lambda r: -math.inf if math.isnan(r[0]) else r[0])
        t_n = slowest[0]
        samples = batch_geometry(trainer, self.batch_size).effective
        self.report = ScalingReport(
            world_size=trainer.world_size,
            global_batch_size=samples,
            steps_measured=len(measured),
            step_seconds=t_n,
            step_seconds_median=slowest[1],
            samples_per_second=samples / t_n if t_n > 0 else math.nan,
            train_seconds=reduce_floats([self.train_seconds], "max")[0],
            peak_rss_bytes=[int(r[2]) for r in ranks],
            seconds_to_target=self.seconds_to_target,
            efficiency=(
                efficiency(self.reference_step_seconds, t_n, trainer.world_size)
                if self.reference_step_seconds is not None and t_n > 0
                else None
            ),
            curve=list(self.curve),
        )
        # a launcher that spawns the ranks (ddp_spawn, the model-parallel strategies started in one process) returns
        # only `trainer.callback_metrics` to the calling process, whose copy of this callback stays empty
        headline = {
            "step_seconds": self.report.step_seconds,
            "samples_per_second": self.report.samples_per_second,
            "peak_rss_mib": max(self.report.peak_rss_bytes) / 2**20,
            "efficiency": self.report.efficiency,
            "seconds_to_target": self.report.seconds_to_target,
        }
        trainer.callback_metrics.update(
            {f"scaling/report_{k}": torch.tensor(float(v)) for k, v in headline.items() if v is not None}
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "step_seconds": list(self.step_seconds),
            "warmup_indices": list(self.warmup_indices),
            "train_seconds": self.train_seconds,
            "curve": list(self.curve),
            "seconds_to_target": self.seconds_to_target,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_seconds = list(state_dict["step_seconds"])
        self.warmup_indices = list(state_dict["warmup_indices"])
        self.train_seconds = float(state_dict["train_seconds"])
        self.curve = [tuple(point) for point in state_dict["curve"]]
        self.seconds_to_target = state_dict["seconds_to_target"]
