"""``GradientClipping``: clip by global norm, by value, adaptively (AGC, z-score), with the norm logged and
non-finite gradients handled; shard-aware through :mod:`lightning_dl.parallel.grad_norm`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.callbacks._logging import log_step, should_log
from lightning_dl.parallel.grad_norm import combine_norms, total_norm

MODES = ("norm", "value", "agc", "zscore")
NONFINITE = ("error", "skip", "zero")


def _positive(name: str, value: float | Sequence[float] | None) -> None:
    values = value if isinstance(value, Sequence) else [value]
    if value is not None and not all(v is not None and v > 0 for v in values):
        raise ValueError(f"`{name}` must be > 0 (a number, or one per param group), got {value!r}.")


def _grads(group: dict) -> list[torch.Tensor]:
    return [p.grad for p in group["params"] if p.grad is not None]


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
    strategy's ``grad_norm_group`` when it has one, so every rank clips with the same global norm.

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

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.gradient_clip_val is not None:
            raise ValueError(
                f"GradientClipping clips the gradients itself, but the Trainer also has `gradient_clip_val="
                f"{trainer.gradient_clip_val}`: remove one of the two."
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(self.max_norm, Sequence):
            for optimizer in trainer.optimizers:
                if len(self.max_norm) != len(optimizer.param_groups):
                    raise ValueError(
                        f"`max_norm` has {len(self.max_norm)} thresholds but the optimizer has "
                        f"{len(optimizer.param_groups)} param groups: give one per group or a single number."
                    )

    def _group_norms(self, optimizer: Optimizer, group_handle: Any) -> torch.Tensor:
        return torch.stack([total_norm(_grads(g), self.norm_type, group=group_handle) for g in optimizer.param_groups])

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        group_handle = getattr(trainer.strategy, "grad_norm_group", None)
        group_norms = self._group_norms(optimizer, group_handle)
        pre = combine_norms(group_norms, self.norm_type)
        # the one host synchronisation of the step: the total and per-group norms as floats
        pre_value, *group_values = torch.cat([pre.reshape(1), group_norms]).tolist()
        if not math.isfinite(pre_value):
            if self._handle_nonfinite(optimizer, pl_module):
                return
            group_norms = self._group_norms(optimizer, group_handle)
            pre = combine_norms(group_norms, self.norm_type)
            pre_value, *group_values = torch.cat([pre.reshape(1), group_norms]).tolist()
        clipped, coefs = self._clip(optimizer, pre_value, group_values)
        if self.log_norm and should_log(trainer):
            if coefs is None:  # value and agc clipping: measure again
                post_norms = self._group_norms(optimizer, group_handle)
            else:
                post_norms = group_norms * torch.tensor(coefs, device=group_norms.device)
            log_step(pl_module, "grad_norm/pre_clip", pre)
            log_step(pl_module, "grad_norm/post_clip", combine_norms(post_norms, self.norm_type))
            log_step(pl_module, "grad_norm/clipped", float(clipped))
            if self.log_group_norms:
                for index, norm in enumerate(group_values):
                    log_step(pl_module, f"grad_norm/pg{index}", norm)

    def _clip(self, optimizer: Optimizer, pre: float, group_norms: list[float]) -> tuple[bool, list[float] | None]:
        """Clip in place; returns whether clipping changed anything and, when the result follows from a coefficient
        per group, those coefficients. Gradients that need no clipping are not touched."""
        groups = optimizer.param_groups
        if self.mode in ("norm", "zscore"):
            if self.mode == "zscore":
                coefs = [self._zscore_coefficient(pre)] * len(groups)
            elif isinstance(self.max_norm, Sequence):
                coefs = [
                    min(1.0, limit / (norm + 1e-6)) for limit, norm in zip(self.max_norm, group_norms, strict=True)
                ]
            else:
                coefs = [min(1.0, float(self.max_norm) / (pre + 1e-6))] * len(groups)  # type: ignore[arg-type]
            for group, coef in zip(groups, coefs, strict=True):
                grads = _grads(group)
                if coef < 1.0 and grads:
                    torch._foreach_mul_(grads, coef)
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
