"""``GradientClipping``: clip by global norm, by value, adaptively (AGC, z-score), with the norm logged and
non-finite gradients handled; shard-aware through :mod:`lightning_dl.parallel.grad_norm`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.callbacks._logging import log_step, should_log
from lightning_dl.parallel.grad_norm import total_norm

MODES = ("norm", "value", "agc", "zscore")
NONFINITE = ("error", "skip", "zero")


def _positive(name: str, value: float | Sequence[float] | None) -> None:
    values = value if isinstance(value, Sequence) else [value]
    if value is not None and not all(v is not None and v > 0 for v in values):
        raise ValueError(f"`{name}` must be > 0 (a number, or one per param group), got {value!r}.")


def _grads(group: dict) -> list[torch.Tensor]:
    return [p.grad for p in group["params"] if p.grad is not None]


def global_group_norms(
    groups: Sequence[Sequence[torch.Tensor]],
    slots: Sequence[int | None],
    num_slots: int,
    norm_type: float = 2.0,
    *,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The p-norm of each of ``num_slots`` param groups of the whole model, the same on every rank of ``group``.

    Local group ``i`` (its tensors ``groups[i]``) is part of the whole model's group ``slots[i]`` (None: it adds
    nothing); the slot numbers must mean the same group on every rank. Each rank puts its groups' p-th powers (max
    for p = inf) at their slots and one collective over ``group`` sums (maxes) them, so ranks that hold different
    numbers of groups (pipeline stages, an empty group) join the same single collective. DTensors are reduced over
    their own mesh first, as in :func:`~lightning_dl.parallel.grad_norm.total_norm`.

    Example::

        >>> global_group_norms([[torch.tensor([3.0])], [], [torch.tensor([4.0])]], [1, None, 1], 2).tolist()
        [0.0, 5.0]
    """
    if len(slots) != len(groups):
        raise ValueError(f"`slots` gives {len(slots)} entries for {len(groups)} groups: give one per group.")
    if any(s is not None and not 0 <= s < num_slots for s in slots):
        raise ValueError(f"`slots={list(slots)}` must lie in [0, {num_slots}) (or be None).")
    inf = math.isinf(norm_type)
    local = [(total_norm(list(ts), norm_type), s) for ts, s in zip(groups, slots, strict=True) if s is not None and ts]
    device = local[0][0].device if local else torch.device("cpu")
    values = torch.zeros(num_slots, device=device)
    if local:
        index = torch.tensor([s for _, s in local], device=device)
        parts = torch.stack([n for n, _ in local])
        if inf:
            values.scatter_reduce_(0, index, parts, "amax")
        else:
            values.index_add_(0, index, parts.pow(norm_type))
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM, group=group)
    return values if inf else values.pow(1.0 / norm_type)


def _whole_model_groups(trainer: L.Trainer, optimizer: Optimizer) -> list[list[str]] | None:
    """The parameter names of each param group of the whole model's optimizer, as a strategy that splits the model
    gives them (``_optimizer_layout``: the list, or a method of the optimizer's index and the optimizer); None
    when the strategy does not."""
    source = getattr(trainer.strategy, "_optimizer_layout", None)
    if callable(source):
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        source = source(index, optimizer)
    return [list(names) for names in source] if source else None


def _scale(grads: list[torch.Tensor], coef: float) -> None:
    """Multiply in place: one multi-tensor kernel for plain tensors, one multiply per DTensor (a foreach kernel does
    not take DTensors on different meshes)."""
    plain = [g for g in grads if not isinstance(g, DTensor)]
    if plain:
        torch._foreach_mul_(plain, coef)
    for g in grads:
        if isinstance(g, DTensor):
            g.mul_(coef)


def _combine(norms: torch.Tensor, norm_type: float) -> torch.Tensor:
    """The p-norm of the whole model from the p-norms of its groups."""
    return norms.max() if math.isinf(norm_type) else norms.pow(norm_type).sum().pow(1.0 / norm_type)


class GradientClipping(Callback):
    """Clip gradients in ``on_before_optimizer_step`` (after AMP unscaling, once per optimizer step under
    accumulation) and log the norm before and after.

    Modes:
        ``norm``: scale all gradients by ``min(1, max_norm / ‖g‖_p)``, ‖g‖_p the global p-norm (2, 1 or inf) over
        every parameter; with a list, one threshold per param group applied to that group's norm.
        ``value``: clamp every element to ``[-max_value, max_value]``.
        ``agc``: adaptive gradient clipping (Brock et al. 2021): per output unit, ``‖g‖ ≤ clip_factor · max(‖w‖,
        eps)``.
        ``zscore``: keep an EMA of the mean and variance of ‖g‖; after ``zscore_warmup`` steps a norm above
        ``mean + z·std`` is clipped to that bound. The statistics are in ``state_dict``.

    The norm is the norm of the gradient the optimizer steps with: under DDP that of the averaged gradient; with
    DTensor shards (tensor parallel, FSDP2) reduced over the mesh; across pipeline stages reduced over the
    strategy's ``grad_norm_group`` when it has one, so every rank clips with the same global norm. The norms of
    all param groups cross the stages in one collective, each at the index of its group in the whole model's
    optimizer (:func:`global_group_norms`), so stages holding different numbers of groups clip alike and a
    per-group threshold applies to that group's norm over every stage.

    Non-finite norms: ``nonfinite="error"`` raises naming the first parameters with NaN/inf gradients; ``"skip"``
    drops the step (the gradients are set to None, so the optimizer changes neither parameters nor its state;
    skips are counted in ``skipped_steps`` and logged); ``"zero"`` replaces non-finite entries by 0.

    Logs ``grad_norm/pre_clip``, ``grad_norm/post_clip`` and ``grad_norm/clipped`` (1.0 when clipping changed the
    gradients), plus ``grad_norm/pg<i>`` with ``log_group_norms=True``, on the steps Lightning writes logs
    (``log_every_n_steps``). One host synchronisation per step.

    Example::

        >>> import lightning as L
        >>> from lightning_dl.callbacks import GradientClipping
        >>> trainer = L.Trainer(callbacks=[GradientClipping(max_norm=1.0)])
    """

    def __init__(
        self,
        max_norm: float | Sequence[float] | None = None,
        max_value: float | None = None,
        norm_type: float = 2.0,
        mode: str = "norm",
        nonfinite: str = "error",
        log_norm: bool = True,
        *,
        log_group_norms: bool = False,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        z: float = 3.0,
        ema_decay: float = 0.99,
        zscore_warmup: int = 20,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if nonfinite not in NONFINITE:
            raise ValueError(f"`nonfinite` must be one of {NONFINITE}, got {nonfinite!r}.")
        if not (norm_type > 0):
            raise ValueError(f"`norm_type` must be > 0 (2.0, 1.0 or inf), got {norm_type!r}.")
        _positive("max_norm", max_norm)
        _positive("max_value", max_value)
        if mode == "norm" and max_norm is None:
            raise ValueError("`mode='norm'` needs `max_norm` (> 0, or one per param group).")
        if mode == "value" and max_value is None:
            raise ValueError("`mode='value'` needs `max_value` (> 0).")
        if mode == "value" and isinstance(max_norm, Sequence):
            raise ValueError("per-group thresholds apply to `mode='norm'` only.")
        for name, value in (("clip_factor", clip_factor), ("eps", eps), ("z", z)):
            _positive(name, value)
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must lie in (0, 1), got {ema_decay!r}.")
        if zscore_warmup < 1:
            raise ValueError(f"`zscore_warmup` must be >= 1, got {zscore_warmup!r}.")
        self.max_norm = max_norm
        self.max_value = max_value
        self.norm_type = float(norm_type)
        self.mode = mode
        self.nonfinite = nonfinite
        self.log_norm = log_norm
        self.log_group_norms = log_group_norms
        self.clip_factor = clip_factor
        self.eps = eps
        self.z = z
        self.ema_decay = ema_decay
        self.zscore_warmup = zscore_warmup
        self.skipped_steps = 0
        self.zscore_state = {"count": 0, "mean": 0.0, "var": 0.0}
        self._slots: dict[int, tuple[list[int | None], int]] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.gradient_clip_val is not None:
            raise ValueError(
                f"GradientClipping clips the gradients itself, but the Trainer also has `gradient_clip_val="
                f"{trainer.gradient_clip_val}`: remove one of the two."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._slots = {}
        for optimizer in trainer.optimizers:
            _, count = self._group_slots(trainer, pl_module, optimizer)
            if isinstance(self.max_norm, Sequence) and len(self.max_norm) != count:
                raise ValueError(
                    f"`max_norm` has {len(self.max_norm)} thresholds but the optimizer has {count} param groups: "
                    "give one per group or a single number."
                )

    def _group_slots(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> tuple[list[int | None], int]:
        """For each local param group, the index of the whole model's group it belongs to, and how many groups the
        whole model has: the same numbering on every rank, worked out once per fit and optimizer.

        Pipeline stages hold different parameters, so their optimizers can have different numbers of groups (a
        group per block, a group left empty); a strategy that splits the model gives the whole model's groups as
        parameter names (``_optimizer_layout``, the names survive the split) and each local group is numbered by
        its first parameter's name. Elsewhere every rank holds the same groups; under a ``grad_norm_group`` the
        group counts are compared once (one small collective), and counts that differ leave one slot for all groups
        (the global norm stays right; per-group thresholds and norms are then refused)."""
        cached = self._slots.get(id(optimizer))
        if cached is not None and len(cached[0]) == len(optimizer.param_groups):
            return cached
        groups = optimizer.param_groups
        whole = _whole_model_groups(trainer, optimizer)
        slots: list[int | None]
        if whole:
            slot_of = {name: index for index, names in enumerate(whole) for name in names}
            names = {id(p): n for n, p in pl_module.named_parameters()}
            try:
                slots = [slot_of[names[id(g["params"][0])]] if g["params"] else None for g in groups]
            except KeyError as missing:
                raise ValueError(
                    f"the parameter {missing} of this rank's optimizer is in no param group of the whole model the "
                    "strategy gives: the optimizer must be the module's own `configure_optimizers()`."
                ) from None
            result = (slots, len(whole))
        else:
            slots, count = list(range(len(groups))), len(groups)
            handle = getattr(trainer.strategy, "grad_norm_group", None)
            if handle is not None and dist.get_world_size(handle) > 1:
                counts = torch.tensor([count, -count])
                dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=handle)
                if counts[0] != -counts[1]:
                    if isinstance(self.max_norm, Sequence) or self.log_group_norms:
                        raise ValueError(
                            f"the ranks' optimizers have between {-int(counts[1])} and {int(counts[0])} param groups "
                            "and the strategy does not say which are the same: per-group thresholds (`max_norm` as a "
                            "list) and `log_group_norms=True` need the same groups on every rank."
                        )
                    slots, count = [0] * len(groups), 1
            result = (slots, count)
        self._slots[id(optimizer)] = result
        return result

    def _group_norms(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> torch.Tensor:
        """The norm of each of the whole model's param groups, the same on every rank (one collective)."""
        slots, count = self._group_slots(trainer, pl_module, optimizer)
        handle = getattr(trainer.strategy, "grad_norm_group", None)
        grads = [_grads(g) for g in optimizer.param_groups]
        return global_group_norms(grads, slots, count, self.norm_type, group=handle)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        group_norms = self._group_norms(trainer, pl_module, optimizer)
        pre = _combine(group_norms, self.norm_type)
        # the one host synchronisation of the step: the total and per-group norms as floats
        pre_value, *group_values = torch.cat([pre.reshape(1), group_norms]).tolist()
        if not math.isfinite(pre_value):
            if self._handle_nonfinite(optimizer, pl_module):
                return
            group_norms = self._group_norms(trainer, pl_module, optimizer)
            pre = _combine(group_norms, self.norm_type)
            pre_value, *group_values = torch.cat([pre.reshape(1), group_norms]).tolist()
        slots, _ = self._group_slots(trainer, pl_module, optimizer)
        clipped, coefs = self._clip(optimizer, pre_value, group_values, slots)
        if self.log_norm and should_log(trainer):
            if coefs is None:  # value and agc clipping: measure again
                post_norms = self._group_norms(trainer, pl_module, optimizer)
            else:
                post_norms = group_norms * torch.tensor(coefs, device=group_norms.device)
            log_step(pl_module, "grad_norm/pre_clip", pre)
            log_step(pl_module, "grad_norm/post_clip", _combine(post_norms, self.norm_type))
            log_step(pl_module, "grad_norm/clipped", float(clipped))
            if self.log_group_norms:
                for index, norm in enumerate(group_values):
                    log_step(pl_module, f"grad_norm/pg{index}", norm)

    def _clip(
        self, optimizer: Optimizer, pre: float, group_norms: list[float], slots: list[int | None]
    ) -> tuple[bool, list[float] | None]:
        """Clip in place; returns whether clipping changed anything and, when the result follows from a coefficient
        per group of the whole model (``group_norms``; local group i is ``slots[i]``), those coefficients. Gradients
        that need no clipping are not touched."""
        groups = optimizer.param_groups
        if self.mode in ("norm", "zscore"):
            if self.mode == "zscore":
                coefs = [self._zscore_coefficient(pre)] * len(group_norms)
            elif isinstance(self.max_norm, Sequence):
                coefs = [
                    min(1.0, limit / (norm + 1e-6)) for limit, norm in zip(self.max_norm, group_norms, strict=True)
                ]
            else:
                coefs = [min(1.0, float(self.max_norm) / (pre + 1e-6))] * len(group_norms)  # type: ignore[arg-type]
            for group, slot in zip(groups, slots, strict=True):
                grads = _grads(group)
                if slot is not None and coefs[slot] < 1.0 and grads:
                    _scale(grads, coefs[slot])
            return any(c < 1.0 for c in coefs), coefs
        if self.mode == "value":
            grads = [g for group in groups for g in _grads(group)]
            bound = float(self.max_value)  # type: ignore[arg-type]
            changed = bool(torch.stack([g.abs().max() for g in grads]).max() > bound) if grads else False
            torch._foreach_clamp_min_(grads, -bound)
            torch._foreach_clamp_max_(grads, bound)
            return changed, None
        return self._clip_agc(groups), None

    def _clip_agc(self, groups: list[dict]) -> bool:
        changed = torch.tensor(False)
        for group in groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
                w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=p.ndim > 1).clamp(min=self.eps)
                g_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=p.ndim > 1)
                limit = self.clip_factor * w_norm
                scale = (limit / g_norm.clamp(min=1e-6)).clamp(max=1.0)
                p.grad.mul_(scale)
                changed = changed | (scale < 1.0).any().cpu()
        return bool(changed)

    def _zscore_coefficient(self, norm: float) -> float:
        """The coefficient that brings ``norm`` down to the z-score bound once the statistics have warmed up (1 when
        within it); updates the statistics with the norm actually applied, so one spike does not widen the bound."""
        state, coef = self.zscore_state, 1.0
        if state["count"] >= self.zscore_warmup:
            bound = state["mean"] + self.z * math.sqrt(state["var"])
            if norm > bound:
                coef = bound / norm
                norm = bound
        if state["count"] == 0:
            state["mean"], state["var"] = norm, 0.0
        else:
            delta = norm - state["mean"]
            state["mean"] += (1 - self.ema_decay) * delta
            state["var"] = self.ema_decay * (state["var"] + (1 - self.ema_decay) * delta * delta)
        state["count"] += 1
        return coef

    def _handle_nonfinite(self, optimizer: Optimizer, pl_module: L.LightningModule) -> bool:
        """Deal with NaN/inf gradients; True when the step is skipped."""
        if self.nonfinite == "error":
            names = {id(p): n for n, p in pl_module.named_parameters()}
            bad = [
                names.get(id(p), f"<param {i}>")
                for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])
                if p.grad is not None and not torch.isfinite(p.grad).all()
            ]
            raise FloatingPointError(
                f"Non-finite gradients in {len(bad)} parameter(s), first: {bad[:5]}. Set "
                "`GradientClipping(nonfinite='skip')` to drop such steps or 'zero' to zero the entries."
            )
        if self.nonfinite == "skip":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped_steps += 1
            log_step(pl_module, "grad_norm/skipped_steps", float(self.skipped_steps))
            return True
        for group in optimizer.param_groups:
            for g in _grads(group):
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        return False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "zscore": dict(self.zscore_state)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict["skipped_steps"]
        self.zscore_state = dict(state_dict["zscore"])
