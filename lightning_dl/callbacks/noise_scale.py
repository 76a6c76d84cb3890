"""``GradientNoiseScale``: an online estimate of the critical batch size from gradients of two batch sizes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning_utilities.core.apply_func import apply_to_collection
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.callbacks._logging import log_step, should_log
from lightning_dl.callbacks.batch_size_scaling import BatchGeometry, batch_geometry, reduce_sum
from lightning_dl.parallel.grad_norm import MicroBatchGradSquares
from lightning_dl.scaling import DebiasedEMA, RatioEMA, noise_scale_sample

MCALLESTER_LAMBDA_B = 16.0


@contextlib.contextmanager
def _logging_disabled(module: L.LightningModule) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` do nothing inside (for an extra forward the metrics must not see)."""
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del module.log, module.log_dict


def _batch_length(batch: Any) -> int:
    lengths: list[int] = []
    apply_to_collection(batch, torch.Tensor, lambda t: lengths.append(len(t)))
    if not lengths:
        raise ValueError("GradientNoiseScale cannot split a batch that holds no tensors.")
    return lengths[0]


class GradientNoiseScale(Callback):
    """Estimate the simple noise scale ``B_simple = tr(Σ)/|G|²`` (McCandlish et al. 2018), the batch size beyond
    which larger batches stop paying off, and McAllester's per-coordinate critical batch ``B* = 16σ²/g²``
    (median over coordinates), every ``every_n_steps`` optimizer steps.

    The unbiased two-batch-size estimator needs a gradient over a small batch and one over a big batch at the same
    parameters. The big one is the gradient the optimizer steps with (``B_big`` = the effective batch). The small
    ones are each rank's micro-batch gradients (``B_small`` = the per-device batch), read by tensor hooks before
    data-parallel reduction and accumulation, whenever there are at least two per step (``devices >= 2`` or
    ``accumulate_grad_batches >= 2``). On one device without accumulation the callback runs the module's
    ``training_step`` once more on the first half of the batch on measured steps, with ``self.log`` disabled, and
    takes its gradient ``g₁`` by ``torch.autograd.grad`` (``.grad`` is untouched); the second half's gradient then
    follows from the full one, ``g₂ = (n·G − n₁·g₁)/n₂``, and the two are the small gradients (``B_small`` = half
    the batch). This costs half a step every ``every_n_steps`` steps, and side effects of ``training_step`` other
    than logging (a metric's ``update``, random numbers drawn) happen once more on those steps. Like every
    estimator of this kind it assumes a loss that is a mean over the samples of the batch.

    Both ``|G|²`` and ``tr(Σ)`` (and, per coordinate, ``g²`` and ``σ²``) are smoothed by a debiased EMA before the
    ratio. Each estimate comes with a standard error from the spread of the per-measurement values that the EMA
    combines (:class:`~lightning_dl.scaling.RatioEMA`: the delta method over ``n_eff = (Σw)²/Σw²`` measurements'
    worth, assuming independent measurements; drift of the parameters between measurements shows up as spread).
    For the median B* it is the median over coordinates of each coordinate's standard error: how far one
    coordinate's B* can be trusted (the median of many moves less). On the steps Lightning writes logs
    (``log_every_n_steps``) it logs the current ``noise_scale/b_simple`` and ``noise_scale/b_simple_stderr``,
    ``noise_scale/grad_sq``, ``noise_scale/trace_cov``, ``noise_scale/b_star_median`` and
    ``noise_scale/b_star_median_stderr`` and, with ``suggest_batch_size``, ``noise_scale/suggested_batch_size``.
    A standard error appears from the second measurement on (``ema_decay > 0``).

    Args:
        every_n_steps: measure on optimizer steps divisible by this.
        ema_decay: decay of the EMAs, in [0, 1).
        per_coordinate: also estimate McAllester's per-coordinate B*, on about ``coordinate_sample`` coordinates
            drawn once at random (seed 0; all of them when the model has fewer), which bounds its time and memory.
        coordinate_sample: how many coordinates the per-coordinate estimate follows.
        batch_size: per-device batch size when the train DataLoader does not say.
        suggest_batch_size: log ``B_simple`` rounded as a suggested effective batch size.

    Example::

        >>> import lightning as L
        >>> from lightning_dl.callbacks import GradientNoiseScale
        >>> trainer = L.Trainer(callbacks=[GradientNoiseScale(every_n_steps=20)])
    """

    def __init__(
        self,
        every_n_steps: int = 25,
        ema_decay: float = 0.9,
        *,
        per_coordinate: bool = True,
        coordinate_sample: int = 65536,
        batch_size: int | None = None,
        suggest_batch_size: bool = True,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an integer >= 1, got {every_n_steps!r}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must lie in [0, 1), got {ema_decay!r}.")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size!r}.")
        if coordinate_sample < 1:
            raise ValueError(f"`coordinate_sample` must be >= 1, got {coordinate_sample!r}.")
        self.every_n_steps = every_n_steps
        self.per_coordinate = per_coordinate
        self.coordinate_sample = coordinate_sample
        self._coordinates: dict[int, torch.Tensor] | None = None
        self.batch_size = batch_size
        self.suggest_batch_size = suggest_batch_size
        self.simple = RatioEMA(ema_decay)  # tr(Σ) / |G|²
        self.coordinate = RatioEMA(ema_decay)  # σ² / g², per followed coordinate
        self._squares: MicroBatchGradSquares | None = None
        self._batch: tuple[Any, int] | None = None
        self._geometry: BatchGeometry | None = None

    @property
    def grad_sq(self) -> DebiasedEMA:
        """The EMA of ``|G|²``."""
        return self.simple.denominator

    @property
    def trace(self) -> DebiasedEMA:
        """The EMA of ``tr(Σ)``."""
        return self.simple.numerator

    @property
    def coord_grad_sq(self) -> DebiasedEMA:
        """The EMA of ``g²`` of each followed coordinate."""
        return self.coordinate.denominator

    @property
    def coord_var(self) -> DebiasedEMA:
        """The EMA of ``σ²`` of each followed coordinate."""
        return self.coordinate.numerator

    @property
    def b_simple(self) -> float | None:
        """The current estimate of ``tr(Σ)/|G|²`` (None before the first measurement)."""
        g2, trace = self.grad_sq.value, self.trace.value
        if g2 is None:
            return None
        return trace / g2 if g2 > 0 else float("inf")

    @property
    def b_star_median(self) -> float | None:
        """The median over the followed coordinates of ``16·σ²/g²`` (coordinates with ``g² > 0``)."""
        g2, var = self.coord_grad_sq.value, self.coord_var.value
        if g2 is None:
            return None
        informative = g2 > 0
        if not informative.any():
            return None
        return (MCALLESTER_LAMBDA_B * var.clamp_min(0)[informative] / g2[informative]).median().item()

    @property
    def b_simple_stderr(self) -> float | None:
        """The standard error of :attr:`b_simple` (None before two measurements, or while ``|G|² <= 0``)."""
        g2 = self.grad_sq.value
        return None if g2 is None or g2 <= 0 else self.simple.stderr

    @property
    def b_star_median_stderr(self) -> float | None:
        """The median over the followed coordinates (``g² > 0``) of the standard error of ``16·σ²/g²``."""
        g2, stderr = self.coord_grad_sq.value, self.coordinate.stderr
        if g2 is None or stderr is None or not (g2 > 0).any():
            return None
        return (MCALLESTER_LAMBDA_B * stderr[g2 > 0]).median().item()

    def _params(self, pl_module: L.LightningModule) -> list[torch.nn.Parameter]:
        return [p for p in pl_module.parameters() if p.requires_grad]

    def _coordinates_of(self, params: list[torch.nn.Parameter]) -> dict[int, torch.Tensor] | None:
        """Flat indices, per ``id(param)``, of the coordinates the per-coordinate estimate follows."""
        if not self.per_coordinate:
            return None
        if self._coordinates is None:
            sizes = [p.numel() for p in params]
            total = sum(sizes)
            if total <= self.coordinate_sample:
                chosen = torch.arange(total)
            else:
                # with replacement, then unique: ~coordinate_sample coordinates, at a fraction of randperm's cost
                generator = torch.Generator().manual_seed(0)
                chosen = torch.randint(total, (self.coordinate_sample,), generator=generator).unique()
            self._coordinates, offset = {}, 0
            for p, size in zip(params, sizes, strict=True):
                mine = chosen[(chosen >= offset) & (chosen < offset + size)] - offset
                if len(mine):
                    self._coordinates[id(p)] = mine.to(p.device)
                offset += size
        return self._coordinates

    def _pick(self, tensors: list[torch.Tensor], params: list[torch.nn.Parameter]) -> torch.Tensor:
        assert self._coordinates is not None
        return torch.cat(
            [
                t.flatten()[self._coordinates[id(p)]]
                for t, p in zip(tensors, params, strict=True)
                if id(p) in self._coordinates
            ]
        )

    def _measuring(self, trainer: L.Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._measuring(trainer):
            return
        self._geometry = geometry = batch_geometry(trainer, self.batch_size)
        if geometry.num_small >= 2:
            if self._squares is None:
                params = self._params(pl_module)
                self._squares = MicroBatchGradSquares([params], coordinates=self._coordinates_of(params))
        else:
            if _batch_length(batch) < 2:
                raise ValueError("GradientNoiseScale on one device needs batches of at least 2 samples to split.")
            self._batch = (batch, batch_idx)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if self._measuring(trainer) and self._geometry is not None:
            self._measure(pl_module)
        if self.grad_sq.value is not None and should_log(trainer):
            self._log(pl_module)

    def _measure(self, pl_module: L.LightningModule) -> None:
        assert self._geometry is not None
        params = self._params(pl_module)
        grads = [
            p.grad.detach().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32) for p in params
        ]
        big_sq = torch.stack(torch._foreach_norm(grads)).pow(2).sum()
        big_vec = self._pick(grads, params) if self._coordinates_of(params) is not None else None
        if self._squares is not None:
            small_sq, small_vec, b_small, b_big = self._from_micro_batches(params, self._geometry)
        else:
            small_sq, small_vec, b_small, b_big = self._from_half_batch(pl_module, params, grads, big_sq)
        self._update(float(small_sq), float(big_sq), small_vec, big_vec, b_small, b_big)

    def _from_micro_batches(
        self, params: list[torch.nn.Parameter], geometry: BatchGeometry
    ) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
        assert self._squares is not None
        scale = geometry.accumulation**2 / geometry.num_small  # undo the loss division, then average
        small_sq = reduce_sum(self._squares.pop()) * scale  # type: ignore[arg-type]
        small_vec = None
        if self.per_coordinate:
            small_vec = reduce_sum(self._squares.pop_elementwise(params)) * scale  # type: ignore[arg-type]
        self._squares.remove()
        self._squares = None
        return small_sq.sum(), small_vec, float(geometry.per_device), float(geometry.effective)

    def _from_half_batch(
        self,
        pl_module: L.LightningModule,
        params: list[torch.nn.Parameter],
        big: list[torch.Tensor],
        big_sq: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
        """Gradient of the first half by an extra ``training_step``; the second half's follows for free from the
        full-batch gradient, ``g₂ = (n·G − n₁·g₁)/n₂``, so two small gradients are averaged at the cost of one."""
        assert self._batch is not None
        batch, batch_idx = self._batch
        self._batch = None
        size = _batch_length(batch)
        n1 = size // 2
        n2 = size - n1
        first = apply_to_collection(batch, torch.Tensor, lambda t: t[:n1])
        with _logging_disabled(pl_module), torch.enable_grad():
            output = pl_module.training_step(first, batch_idx)
        loss = output["loss"] if isinstance(output, Mapping) else output
        if not isinstance(loss, torch.Tensor):
            raise ValueError("GradientNoiseScale needs `training_step` to return the loss (a tensor or {'loss': ...}).")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        g1 = [torch.zeros_like(p) if g is None else g.detach().float() for p, g in zip(params, grads, strict=True)]
        # |g₂|² without forming g₂: (n²|G|² − 2 n n₁ G·g₁ + n₁²|g₁|²) / n₂²
        g1_sq = torch.stack(torch._foreach_norm(g1)).pow(2).sum()
        dot = sum((ga * gb).sum() for ga, gb in zip(g1, big, strict=True))
        g2_sq = (size**2 * big_sq - 2 * size * n1 * dot + n1**2 * g1_sq) / n2**2
        small_sq = (g1_sq + g2_sq) / 2
        small_vec = None
        if self._coordinates_of(params) is not None:
            a, b = self._pick(g1, params), self._pick(big, params)
            small_vec = (a.pow(2) + ((size * b - n1 * a) / n2).pow(2)) / 2
        # the mean of |g_i|² over halves of n1 and n2 samples has the expectation of one batch of their harmonic mean
        b_small = 2.0 / (1.0 / n1 + 1.0 / n2)
        return small_sq, small_vec, b_small, float(size)

    def _update(
        self,
        small_sq: float,
        big_sq: float,
        small_vec: torch.Tensor | None,
        big_vec: torch.Tensor | None,
        b_small: float,
        b_big: float,
    ) -> None:
        g2, trace = noise_scale_sample(small_sq, big_sq, b_small, b_big)
        self.simple.update(trace, g2)
        if small_vec is not None and big_vec is not None:
            small, big = small_vec.double(), big_vec.double().pow(2)  # the spread subtracts moments: keep precision
            coord_g2, coord_var = noise_scale_sample(small, big, b_small, b_big)  # type: ignore[arg-type]
            self.coordinate.update(coord_var, coord_g2)

    def _log(self, pl_module: L.LightningModule) -> None:
        log_step(pl_module, "noise_scale/grad_sq", float(self.grad_sq.value))
        log_step(pl_module, "noise_scale/trace_cov", float(self.trace.value))
        if self.b_simple is not None:
            log_step(pl_module, "noise_scale/b_simple", self.b_simple)
            if self.b_simple_stderr is not None:
                log_step(pl_module, "noise_scale/b_simple_stderr", self.b_simple_stderr)
            if self.suggest_batch_size and 0 < self.b_simple < float("inf"):
                log_step(pl_module, "noise_scale/suggested_batch_size", float(max(1, round(self.b_simple))))
        if self.b_star_median is not None:
            log_step(pl_module, "noise_scale/b_star_median", self.b_star_median)
            if self.b_star_median_stderr is not None:
                log_step(pl_module, "noise_scale/b_star_median_stderr", self.b_star_median_stderr)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._squares is not None:
            self._squares.remove()
            self._squares = None

    @property
    @override
    def state_key(self) -> str:
        """Unique per setting, so that several estimators (e.g. different ``ema_decay``) can run in one Trainer."""
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, ema_decay=self.simple.numerator.decay, per_coordinate=self.per_coordinate
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"simple": self.simple.state_dict(), "coordinate": self.coordinate.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.simple.load_state_dict(state_dict["simple"])
        self.coordinate.load_state_dict(state_dict["coordinate"])
