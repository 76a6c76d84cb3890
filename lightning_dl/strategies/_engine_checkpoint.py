"""Full checkpoints of the model-parallel engine under any layout: the whole model's plain ``state_dict`` and the
optimizer state in the single-process format (parameters numbered as one process's optimizer numbers them), gathered
on rank 0 from every stage and shard, and loaded back into a rank's stages and shards. The sharded format is
:mod:`lightning_dl.parallel.checkpoint`'s DCP folder with the same plain names. :class:`CheckpointingStrategy` holds
the engine's Lightning checkpoint hooks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_dl.parallel.checkpoint import NAMES_KEY, is_sharded, load_sharded, save_sharded
from lightning_dl.parallel.layout import ParallelLayout

OptimizerLayout = list[list[str]]
"""Parameter names of each param group of the whole model's optimizer, in order: the index of a parameter in a
single-process optimizer ``state_dict`` is its position in this list flattened."""


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's storage of ``t`` (a view for a DTensor): in-place changes write through."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective over a DTensor's mesh)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` cut as ``like`` is (this rank's shard, no communication), or ``whole`` when ``like`` is plain."""
    if not isinstance(like, DTensor):
        return whole
    return distribute_tensor(whole.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def _merge_on_rank_zero(part: Any, group: dist.ProcessGroup | None) -> list[Any] | None:
    """Every rank's ``part`` on rank 0 of ``group`` (None elsewhere); ``[part]`` without a group."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [part]
    parts: list[Any] | None = [None] * dist.get_world_size(group) if dist.get_rank(group) == 0 else None
    dist.gather_object(part, parts, group_dst=0, group=group)
    return parts


def gather_state_dict(
    module: nn.Module, order: list[str], *, contribute: bool = True, group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """The whole model's plain ``state_dict`` on rank 0 of ``group`` ({} elsewhere), ordered as ``order`` (the unsplit
    module's keys). Every DTensor is gathered whole over its mesh (every rank takes part, one tensor at a time), then
    the ranks with ``contribute`` (one per distinct part: dp and tp coordinate 0) send their entries, on CPU."""
    entries = {}
    for key, value in module.state_dict().items():
        whole = full(value).detach()
        if contribute:
            entries[key] = whole.cpu()
    parts = _merge_on_rank_zero(entries, group)
    if parts is None:
        return {}
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return {k: merged[k] for k in order if k in merged}


def load_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load a whole-model plain ``state_dict`` into a rank's part of the model: the entries it holds (all of them
    required under ``strict``), each cut to this rank's shard where the entry is a DTensor. No communication."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    if strict and missing:
        raise KeyError(f"the checkpoint lacks {missing[:5]} (of {len(missing)} entries this rank holds).")
    with torch.no_grad():
        for key, value in own.items():
            if key in state:
                local(value).copy_(local(shard_like(state[key], value)))


def optimizer_layout(optimizer: Optimizer, module: nn.Module) -> OptimizerLayout:
    """Names of each param group's parameters, in the optimizer's order."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def _group_index(layout: OptimizerLayout, names: list[str]) -> int:
    for index, whole in enumerate(layout):
        if names and names[0] in whole:
            return index
    raise KeyError(f"param group starting with {names[:1]} is in no group of the whole model's optimizer.")


def gather_optimizer_state(
    optimizer: Optimizer,
    module: nn.Module,
    layout: OptimizerLayout,
    *,
    contribute: bool = True,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """The whole model's optimizer ``state_dict`` in the single-process format (parameters numbered by ``layout``) on
    rank 0 of ``group`` ({} elsewhere): it loads into one process training the plain module, and back into any layout
    with :func:`load_optimizer_state`. DTensor states are gathered whole (every rank takes part); ranks with
    ``contribute`` send theirs."""
    raw = optimizer.state_dict()
    by_name: dict[str, Any] = {}
    hyper: dict[int, dict[str, Any]] = {}
    flat = 0
    for names, group_state in zip(optimizer_layout(optimizer, module), raw["param_groups"], strict=True):
        hyper[_group_index(layout, names)] = {k: v for k, v in group_state.items() if k != "params"}
        for name in names:
            if flat in raw["state"]:
                state = {k: full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in raw["state"][flat].items()}
                if contribute:
                    by_name[name] = state
            flat += 1
    parts = _merge_on_rank_zero((by_name, hyper), group)
    if parts is None:
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
    """Load a single-process-format optimizer ``state_dict`` (numbered by ``layout``) into a rank's optimizer over its
    part of the model; states shaped like a DTensor parameter are cut to this rank's shard."""
    if len(state["param_groups"]) != len(layout):
        raise ValueError(
            f"the checkpoint's optimizer has {len(state['param_groups'])} param groups, the module's "
            f"configure_optimizers() makes {len(layout)}: they must be the same optimizer."
        )
    index_of = {name: i for i, name in enumerate(n for names in layout for n in names)}
    local_state: dict[int, Any] = {}
    local_groups = []
    flat = 0
    for names in optimizer_layout(optimizer, module):
        whole = state["param_groups"][_group_index(layout, names)]
        local_groups.append({**{k: v for k, v in whole.items() if k != "params"}, "params": []})
        for name in names:
            if index_of[name] in state["state"]:
                local_state[flat] = state["state"][index_of[name]]
            local_groups[-1]["params"].append(flat)
            flat += 1
    optimizer.load_state_dict({"state": local_state, "param_groups": local_groups})
    for group in optimizer.param_groups:
        for p in group["params"]:
            values = optimizer.state.get(p, {})
            for key, value in values.items():
                if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                    values[key] = shard_like(value, p)


def optimizer_state_by_ids(state: Mapping[str, Any]) -> dict[str, Any]:
    """A full optimizer state keyed by parameter names (torch.distributed.checkpoint's) as a single-process
    ``Optimizer.state_dict()``: parameters numbered in the order of the param groups.

    Example::

        >>> optimizer_state_by_ids({"state": {"b": {"m": 1}}, "param_groups": [{"lr": 0.1, "params": ["a", "b"]}]})
        {'state': {1: {'m': 1}}, 'param_groups': [{'lr': 0.1, 'params': [0, 1]}]}
    """
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


class CheckpointingStrategy(ModelParallelStrategy):
    """The checkpoint hooks of the model-parallel engine (``HybridStrategy`` derives from it): ``checkpoint_format``
    ``"full"`` gathers and loads with the functions above; ``"sharded"`` writes and reads the DCP folder of
    :mod:`lightning_dl.parallel.checkpoint`. Either format loads under any layout."""

    parallel_layout: ParallelLayout | None
    checkpoint_format: str
    _state_keys: list[str]
    _optimizer_layouts: list[OptimizerLayout] | None

    @property
    def _coordinates(self) -> dict[str, int]:
        assert self.parallel_layout is not None
        return self.parallel_layout.coordinates(self.global_rank)

    @property
    def _contributes(self) -> bool:
        """Whether this rank sends its part of the whole state: one rank per distinct part (dp and tp index 0)."""
        coordinates = self._coordinates
        return coordinates["dp"] == 0 and coordinates["tp"] == 0

    def full_state_dict(self) -> dict[str, Any]:
        """The whole module's plain ``state_dict`` on rank 0 ({} elsewhere): shards joined, stages merged. A
        collective over every rank."""
        assert self.lightning_module is not None
        return gather_state_dict(self.lightning_module, self._state_keys, contribute=self._contributes)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full: the whole module's plain ``state_dict`` on rank 0. Sharded: nothing here, :meth:`save_checkpoint`
        writes each rank's part."""
        return self.full_state_dict() if self.checkpoint_format == "full" else {}

    def _optimizer_layout(self, index: int, optimizer: Optimizer) -> list[list[str]]:
        assert self.lightning_module is not None
        if self._optimizer_layouts is not None:
            return self._optimizer_layouts[index]
        return optimizer_layout(optimizer, self.lightning_module)  # pp = 1: every rank holds every name

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """Full: the whole model's optimizer state in the single-process format on rank 0 (a collective)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        if self.checkpoint_format != "full":
            return {}  # sharded: save_checkpoint writes each rank's part
        assert self.lightning_module is not None
        index = next(i for i, o in enumerate(self.optimizers) if o is optimizer)
        layout = self._optimizer_layout(index, optimizer)
        return gather_optimizer_state(optimizer, self.lightning_module, layout, contribute=self._contributes)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Full: one file from rank 0. Sharded: a folder of every rank's part, keyed by the plain names
        (:func:`lightning_dl.parallel.checkpoint.save_sharded`, a collective)."""
        if self.checkpoint_format != "sharded":
            if "optimizer_states" in checkpoint:  # the names of the single-process numbering: a converted folder
                # then keys optimizer state by name and loads into any layout without the whole model's order
                checkpoint[NAMES_KEY] = [self._optimizer_layout(i, o) for i, o in enumerate(self.optimizers)]
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"`{type(self).__name__}.save_checkpoint(..., storage_options=...)` is not supported.")
        assert self.lightning_module is not None
        save_sharded(
            Path(self.broadcast(filepath)),
            self.lightning_module,
            self.optimizers if "optimizer_states" in checkpoint else (),
            checkpoint,
            optimizer_names=self._optimizer_layouts,
            state_dict_keys=self._state_keys,
        )

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """A sharded folder (:func:`lightning_dl.parallel.checkpoint.load_sharded`: each rank reads its part) or a
        full file (each rank cuts its part from the whole state), into the model and the optimizers."""
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        assert module is not None
        if is_sharded(path):
            return load_sharded(
                path,
                module,
                self.optimizers,
                optimizer_names=self._optimizer_layouts,
                strict=module.strict_loading,
                weights_only=weights_only or False,
            )
        if path.is_dir():  # a folder of Lightning's own ModelParallelStrategy
            return super().load_checkpoint(path, weights_only=weights_only)
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only or False)
        load_state_dict(module, checkpoint["state_dict"], strict=module.strict_loading)
        states = checkpoint.get("optimizer_states", [])
        for index, (optimizer, state) in enumerate(zip(self.optimizers, states, strict=False)):
            load_optimizer_state(optimizer, module, self._optimizer_layout(index, optimizer), state)
        return checkpoint
