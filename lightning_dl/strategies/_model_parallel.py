"""Lightning glue that every model-parallel strategy (pipeline, tensor, hybrid) shares: a spawn launcher that hands
the calling process the whole trained model, global-norm clipping for Lightning's ``gradient_clip_val``,
consolidated checkpoints with the plain module's names (model and optimizer state), and a DistributedSampler over the
data-parallel ranks only.

The names here are stable: strategies import them. Parameters keep their whole-model names on every rank (the
engines build stages and shards that way), so "plain" state is keyed by those names.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from lightning_dl.parallel.grad_norm import total_norm

OptimizerLayout = list[list[str]]
"""Parameter names of each param group of the whole model's optimizer, in order: the index of a parameter in a
single-process optimizer ``state_dict`` is its position in this list flattened."""


class FullStateLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, except that the weights sent back to the calling process after ``fit`` are the
    strategy's ``lightning_module_state_dict()`` (the whole model, gathered from every stage or shard: a collective
    all ranks join) instead of rank 0's local ``state_dict``, which Lightning loads with ``strict=False`` and so
    would silently leave every other stage untrained. ``strategy.check_before_launch(trainer)``, when defined, runs
    in the calling process first, so bad settings fail before any process starts; ``strategy.collect_results()``
    (a collective, when defined) returns what rank 0 sends back, given to ``strategy.receive_results(...)`` in the
    calling process (the pipeline strategy's timeline)."""

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        check = getattr(self._strategy, "check_before_launch", None)
        if trainer is not None and check is not None:
            check(trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)

    def _collect_rank_zero_results(self, trainer: L.Trainer, results: Any) -> _WorkerOutput | None:
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) if callback is not None else None
        state = self._strategy.lightning_module_state_dict()  # collective: every rank takes part
        collect = getattr(self._strategy, "collect_results", None)
        self._strategy_results = collect() if collect is not None else None  # collective too
        if self._strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            self._strategy.checkpoint_io.save_checkpoint(state, weights_path)
        return _WorkerOutput(best, weights_path, trainer.state, results, self.get_extra_results(trainer))

    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        results = getattr(self, "_strategy_results", None)
        if results is not None:  # through a file: Lightning joins the processes before it reads their pipe, so a
            # result larger than the pipe's buffer would block the sending process forever
            path = os.path.join(tempfile.mkdtemp(), "strategy_results.pt")
            torch.save(results, path)
            extra["strategy_results_path"] = path
        return extra

    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        path = extra.get("strategy_results_path")
        receive = getattr(self._strategy, "receive_results", None)
        if path is not None:
            results = torch.load(path, weights_only=False)
            os.remove(path)
            os.rmdir(os.path.dirname(path))
            if receive is not None:
                receive(results)

    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: L.Trainer) -> None:
        if worker_output.weights_path is not None:
            state = self._strategy.checkpoint_io.load_checkpoint(worker_output.weights_path)
            own = set(trainer.lightning_module.state_dict())
            absent = [k for k in state if k not in own]
            if absent:
                rank_zero_warn(
                    f"The calling process's module has no {absent[:3]}... (built in `configure_model()` inside the "
                    "processes?): those trained parameters stay in the checkpoints only."
                )
        super()._recover_results_in_main_process(worker_output, trainer)


def clip_grad_norm_global(
    parameters: Iterable[torch.Tensor], max_norm: float, *, group: dist.ProcessGroup | None, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale gradients so that their norm over every rank of ``group`` (stages hold different parameters) and every
    DTensor mesh is at most ``max_norm``; returns that global norm. The same on every rank of the group.

    Example::

        >>> w = nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> clip_grad_norm_global([w], 1.0, group=None).item(), w.grad.norm().item() < 1.0 + 1e-6
        (5.0, True)
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = total_norm(grads, norm_type, group=group)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm


def use_global_norm_clipping(precision: Precision, group_fn: Callable[[], dist.ProcessGroup | None]) -> None:
    """Make Lightning's ``gradient_clip_val`` (algorithm ``"norm"``) clip by the global norm over ``group_fn()``
    instead of this rank's local norm: Lightning's precision plugin clips with ``clip_grad_norm_`` over local
    parameters only, which under pipeline or tensor parallelism is a different norm on every rank. Any precision
    plugin keeps its other behaviour; only its ``clip_grad_by_norm`` is replaced on this instance."""

    def clip_grad_by_norm(optimizer: Optimizer, clip_val: int | float) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_grad_norm_global(params, float(clip_val), group=group_fn())

    precision.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]


def gather_state_dict(
    module: nn.Module, order: list[str], group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """The whole model's plain ``state_dict`` on rank 0 of ``group`` (empty elsewhere), ordered as ``order`` (the
    unsplit module's keys): each rank contributes its local entries, on CPU. A collective over ``group``."""
    local = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return {k: local[k] for k in order if k in local}
    parts: list[Any] | None = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(local, parts, group_dst=0, group=group)
    if parts is None:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return {k: merged[k] for k in order if k in merged}


def load_local_state_dict(module: nn.Module, state: Mapping[str, Any], *, strict: bool = True) -> None:
    """Load a whole-model plain ``state_dict`` into a rank's part of the model: the entries it holds, all of them
    required under ``strict``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if strict and missing:
        raise KeyError(f"the checkpoint lacks {missing[:5]} (of {len(missing)} entries this rank holds).")
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=strict)


def optimizer_layout(optimizer: Optimizer, module: nn.Module) -> OptimizerLayout:
    """Names of each param group's parameters, in the optimizer's order."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _group_index(layout: OptimizerLayout, names: list[str]) -> int:
    for index, full in enumerate(layout):
        if names and names[0] in full:
            return index
    raise KeyError(f"param group starting with {names[:1]} is in no group of the whole model's optimizer.")


def gather_optimizer_state(
    optimizer: Optimizer, module: nn.Module, layout: OptimizerLayout, group: dist.ProcessGroup | None = None
) -> dict[str, Any]:
    """The whole model's optimizer ``state_dict`` in the single-process format (parameters numbered by ``layout``),
    on rank 0 of ``group`` ({} elsewhere): it loads into one process training the plain module, and back into any
    layout with :func:`load_optimizer_state`. A collective over ``group``."""
    local_layout = optimizer_layout(optimizer, module)
    raw = optimizer.state_dict()
    by_name: dict[str, Any] = {}
    hyper: dict[int, dict[str, Any]] = {}
    flat = 0
    for names, group_state in zip(local_layout, raw["param_groups"], strict=True):
        hyper[_group_index(layout, names)] = {k: v for k, v in group_state.items() if k != "params"}
        for name in names:
            if flat in raw["state"]:
                by_name[name] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in raw["state"][flat].items()}
            flat += 1
    parts: list[Any] = [(by_name, hyper)]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else []
        dist.gather_object((by_name, hyper), parts if parts else None, group_dst=0, group=group)
        if not parts:
            return {}
    states: dict[str, Any] = {}
    groups: dict[int, dict[str, Any]] = {}
    for part_states, part_hyper in parts:
        states.update(part_states)
        for index, values in part_hyper.items():
            groups.setdefault(index, values)
    index_of = {name: i for i, name in enumerate(n for names in layout for n in names)}
    param_groups, start = [], 0
    for index, names in enumerate(layout):
        param_groups.append({**groups.get(index, {}), "params": list(range(start, start + len(names)))})
        start += len(names)
    return {"state": {index_of[n]: s for n, s in states.items()}, "param_groups": param_groups}


def load_optimizer_state(optimizer: Optimizer, module: nn.Module, layout: OptimizerLayout, state: Mapping) -> None:
    """Load a single-process-format optimizer ``state_dict`` (numbered by ``layout``) into a rank's optimizer over
    its part of the model."""
    if len(state["param_groups"]) != len(layout):
        raise ValueError(
            f"the checkpoint's optimizer has {len(state['param_groups'])} param groups, the module's "
            f"configure_optimizers() makes {len(layout)}: they must be the same optimizer."
        )
    index_of = {name: i for i, name in enumerate(n for names in layout for n in names)}
    local_layout = optimizer_layout(optimizer, module)
    local_state: dict[int, Any] = {}
    local_groups = []
    flat = 0
    for names in local_layout:
        full = state["param_groups"][_group_index(layout, names)]
        local_groups.append({**{k: v for k, v in full.items() if k != "params"}, "params": []})
        for name in names:
            if index_of[name] in state["state"]:
                local_state[flat] = state["state"][index_of[name]]
            local_groups[-1]["params"].append(flat)
            flat += 1
    optimizer.load_state_dict({"state": local_state, "param_groups": local_groups})


def first_optimizer(configured: Any) -> Optimizer:
    """The optimizer in whatever ``configure_optimizers()`` returned; raises when it holds several."""
    found: list[Optimizer] = []

    def visit(item: Any) -> None:
        if isinstance(item, Optimizer):
            found.append(item)
        elif isinstance(item, Mapping):
            visit(item.get("optimizer"))
        elif isinstance(item, list | tuple):
            for element in item:
                if isinstance(element, Optimizer | Mapping) or (isinstance(element, list | tuple) and element):
                    visit(element)

    visit(configured)
    if len(found) != 1:
        raise ValueError(
            f"model-parallel strategies train with exactly one optimizer; `configure_optimizers()` returned "
            f"{len(found)}."
        )
    return found[0]


def data_parallel_sampler_kwargs(dp_size: int, dp_rank: int) -> dict[str, int]:
    """DistributedSampler arguments over the data-parallel ranks only: all pipeline and tensor ranks of one replica
    read the same batch.

    Example::

        >>> data_parallel_sampler_kwargs(2, 1)
        {'num_replicas': 2, 'rank': 1}
    """
    return {"num_replicas": dp_size, "rank": dp_rank}
