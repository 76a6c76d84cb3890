"""Sharded checkpoints keyed by the plain module's names: :func:`save_sharded` (a collective) and
:func:`load_sharded` (each rank reads its part) under any layout. The format is described in
:mod:`lightning_dl.parallel.checkpoint`. Torch only."""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

FORMAT = "lightning_dl.sharded/1"
META_FILE = "meta.pt"
"""The file of the non-tensor rest (the name Lightning's ``ModelParallelStrategy`` uses)."""
NAMES_KEY = "optimizer_param_names"
"""Key of a one-file checkpoint holding, per optimizer, the parameter names of each param group."""
TENSOR_KEYS = ("state_dict", "optimizer_states", NAMES_KEY)
"""Keys of a one-file checkpoint that the sharded folder stores as DCP entries, not in ``meta.pt``."""
FORMATS = ("full", "sharded")
_ONE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"


def _dcp_save(state: dict[str, Any], path: Path, group: dist.ProcessGroup | None = None, *, one: bool = False) -> None:
    with warnings.catch_warnings():  # one process is meant: DCP's warning says so
        warnings.filterwarnings("ignore", message=_ONE_PROCESS)
        dcp.save(state, checkpoint_id=path, process_group=group, no_dist=one or not dist.is_initialized())


def _dcp_load(state: dict[str, Any], path: Path, group: dist.ProcessGroup | None = None, *, one: bool = False) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ONE_PROCESS)
        dcp.load(state, checkpoint_id=path, process_group=group, no_dist=one or not dist.is_initialized())


GroupNames = list[list[Any]]
"""Parameter names (or flat indices) of each param group of one optimizer, in order."""


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (DCP's ``.metadata`` and ``meta.pt``)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / META_FILE).is_file()


def optimizer_names(optimizer: Optimizer, module: nn.Module) -> GroupNames:
    """Names in ``module`` of each param group's parameters, in the optimizer's order.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> optimizer_names(torch.optim.SGD([{"params": net[1].parameters()}, {"params": net[0].parameters()}]), net)
        [['1.weight', '1.bias'], ['0.weight', '0.bias']]
    """
    names = {id(p): n for n, p in module.named_parameters()}
    missing = [i for group in optimizer.param_groups for i, p in enumerate(group["params"]) if id(p) not in names]
    if missing:
        raise ValueError(f"the optimizer holds {len(missing)} parameters that are not parameters of the module.")
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


# --- save ---------------------------------------------------------------------------------------------------------
def save_sharded(
    path: str | os.PathLike,
    module: nn.Module,
    optimizers: Sequence[Optimizer] = (),
    extra: Mapping[str, Any] | None = None,
    *,
    optimizer_names: Sequence[GroupNames] | None = None,
    state_dict_keys: Sequence[str] | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Write this rank's part of ``module`` and ``optimizers`` into the folder ``path``; every rank of ``group``
    (default: the world) calls it with its own part, the same ``path``, and its optimizers in the same order.

    Args:
        path: the folder (created; a file or an earlier checkpoint folder there is replaced; any other folder
            that is not empty is an error).
        module: the rank's module: a pipeline stage with whole-model names, DTensor shards, FSDP2, or the whole model.
        optimizers: the rank's optimizers over ``module``'s parameters (Lightning's wrappers are unwrapped).
        extra: the non-tensor rest of Lightning's checkpoint dict; rank 0's is saved (``state_dict`` and
            ``optimizer_states`` in it are ignored: the tensors come from ``module`` and ``optimizers``).
        optimizer_names: per optimizer, the whole model's parameter names per param group in the single-process
            order; default: every rank's names concatenated in rank order (right when stages follow rank order).
        state_dict_keys: the whole model's ``state_dict`` keys in order; default: gathered in rank order.
    """
    path = Path(path)
    optimizers = [_unwrap(o) for o in optimizers]
    distributed = dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    local_keys = list(module.state_dict())
    local_groups = [_local_groups(o, module) for o in optimizers]
    mine = (local_keys, local_groups)
    parts: list[Any] = [mine]
    if distributed and dist.get_world_size(group) > 1:
        parts = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, mine, group=group)
    keys = list(state_dict_keys) if state_dict_keys is not None else _merge_names(p[0] for p in parts)
    whole = [_merge_groups([p[1][i] for p in parts], optimizer_names, i) for i in range(len(optimizers))]
    if path.is_dir() and not (path / ".metadata").is_file() and any(path.iterdir()):
        raise FileExistsError(
            f"`path='{path}'` is a folder that holds no checkpoint: give a new path or a checkpoint's."
        )
    if distributed:
        dist.barrier(group=group)  # every rank looked before rank 0 clears the way
    if rank == 0:
        if path.is_dir():  # an earlier checkpoint at this path: its files go, so none of them outlives this save
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        path.mkdir(parents=True)
    if distributed:
        dist.barrier(group=group)
    state: dict[str, Any] = {"state_dict": module.state_dict()}
    for index, (optimizer, groups) in enumerate(zip(optimizers, whole, strict=True)):
        state[f"optimizer_{index}"] = {"state": _state_by_name(optimizer, module), "param_groups": groups}
    _dcp_save(state, path, group)
    if rank == 0:
        rest = {k: v for k, v in (extra or {}).items() if k not in TENSOR_KEYS}
        _write_meta(path, rest, keys)
    if distributed:
        dist.barrier(group=group)


def _unwrap(optimizer: Any) -> Optimizer:
    """The torch optimizer inside Lightning's ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "_optimizer", optimizer)


def _local_groups(optimizer: Optimizer, module: nn.Module) -> list[dict[str, Any]]:
    names = optimizer_names(optimizer, module)
    return [
        {**{k: v for k, v in g.items() if k != "params"}, "params": n}
        for g, n in zip(optimizer.param_groups, names, strict=True)
    ]


def _merge_names(lists: Any) -> list[Any]:
    seen: dict[Any, None] = {}
    for names in lists:
        seen.update(dict.fromkeys(names))
    return list(seen)


def _merge_groups(per_rank: list[list[dict]], given: Sequence[GroupNames] | None, index: int) -> list[dict]:
    """One optimizer's whole-model param groups from every rank's local ones: matched by index, or, with the whole
    model's names (``given``), by the group that holds a local group's parameters (a stage may lack a group)."""
    if given is None:
        counts = {len(groups) for groups in per_rank}
        if len(counts) != 1:
            raise ValueError(
                f"optimizer {index} has {sorted(counts)} param groups on different ranks: pass `optimizer_names` "
                "(the whole model's names per group) or make every rank's configure_optimizers() give the same groups."
            )
        whole = [_merge_names(groups[g]["params"] for groups in per_rank) for g in range(counts.pop())]
    else:
        whole = [list(names) for names in given[index]]
    owner = {name: g for g, names in enumerate(whole) for name in names}
    hyper: dict[int, dict[str, Any]] = {}
    for groups in per_rank:
        for g, group in enumerate(groups):
            values = {k: v for k, v in group.items() if k != "params"}
            if not group["params"]:
                if given is None:
                    hyper.setdefault(g, values)
                continue
            target = owner.get(group["params"][0])
            if target is None:
                raise ValueError(f"optimizer {index}: {group['params'][:3]} are in no group of `optimizer_names`.")
            hyper.setdefault(target, values)
    return [{**hyper.get(g, {}), "params": names} for g, names in enumerate(whole)]


def _state_by_name(optimizer: Optimizer, module: nn.Module) -> dict[str, dict[str, Any]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: dict(s) for p, s in optimizer.state.items() if s}


def _write_meta(path: Path, rest: Mapping[str, Any], keys: Sequence[str]) -> None:
    """``meta.pt`` through a temporary name, so that it exists only complete."""
    temporary = path / f".{META_FILE}.{uuid.uuid4().hex}"
    torch.save({**rest, "lightning_dl": {"format": FORMAT, "state_dict_keys": list(keys)}}, temporary)
    os.replace(temporary, path / META_FILE)


# --- load ---------------------------------------------------------------------------------------------------------
def read_extra(path: str | os.PathLike, *, weights_only: bool = False) -> dict[str, Any]:
    """The non-tensor rest of a sharded checkpoint (``meta.pt`` without this module's own entry). It is a pickle
    (hyper-parameters, callback states): read only checkpoints you trust, or pass ``weights_only=True``."""
    path = Path(path)
    if not is_sharded(path):
        raise ValueError(f"`path='{path}'` is not a sharded checkpoint folder (it needs .metadata and {META_FILE}).")
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=weights_only)
    meta.pop("lightning_dl", None)
    return meta


def load_sharded(
    path: str | os.PathLike,
    module: nn.Module,
    optimizers: Sequence[Optimizer] = (),
    *,
    optimizer_names: Sequence[GroupNames] | None = None,
    strict: bool = True,
    group: dist.ProcessGroup | None = None,
    weights_only: bool = False,
) -> dict[str, Any]:
    """Load into this rank's ``module`` and ``optimizers`` the entries it holds, cut to its own layout (every rank
    of ``group`` calls it); returns the non-tensor rest (epoch, loops, lr_schedulers...).

    ``strict``: every ``state_dict`` entry the rank holds must be in the checkpoint. ``optimizer_names`` is needed
    only for a folder whose optimizer state is keyed by flat index, on a rank whose optimizer holds part of the
    model's parameters (a pipeline stage); a rank that holds them all uses its own optimizer's order. Optimizers must
    be the ones the checkpoint was saved with (same number of param groups); a parameter without saved state starts
    fresh.
    """
    path = Path(path)
    extra = read_extra(path, weights_only=weights_only)
    optimizers = [_unwrap(o) for o in optimizers]
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    own = module.state_dict()
    missing = [k for k in own if f"state_dict.{k}" not in metadata]
    absent = [i for i in range(len(optimizers)) if not any(k.startswith(f"optimizer_{i}.") for k in metadata)]
    problem = None
    if strict and missing:
        problem = f"the checkpoint {path} lacks {missing[:5]} (of {len(missing)} entries this rank holds)."
    elif absent:
        problem = f"the checkpoint {path} holds no state of optimizer {absent[0]} (saved with weights only?)."
    _raise_together(problem, group)
    params = dict(module.named_parameters())
    state: dict[str, Any] = {f"state_dict.{k}": v for k, v in own.items() if k not in missing}
    saved_groups: dict[str, Any] = {}
    for index in range(len(optimizers)):
        saved_groups.update({k: None for k in metadata if k.startswith(f"optimizer_{index}.param_groups.")})
    if saved_groups:  # first the param groups (small objects): they say which names the optimizer state is under
        _dcp_load(saved_groups, path, group)
    groups_by_optimizer = [
        _read_groups(_select(saved_groups, f"optimizer_{i}.param_groups.")) for i in range(len(optimizers))
    ]
    targets: list[dict[str, str]] = []
    for index, (optimizer, groups) in enumerate(zip(optimizers, groups_by_optimizer, strict=True)):
        keys = _state_keys(optimizer, module, groups, optimizer_names, index)
        targets.append(keys)
        for name, saved in keys.items():
            prefix = f"optimizer_{index}.state.{saved}."
            for key, md in metadata.items():
                if key.startswith(prefix) and "." not in key[len(prefix) :]:
                    state[key] = _template(md, params[name])
    _dcp_load(state, path, group)
    module.load_state_dict({k: state[f"state_dict.{k}"] for k in own if k not in missing}, strict=False)
    for index, (optimizer, groups, keys) in enumerate(zip(optimizers, groups_by_optimizer, targets, strict=True)):
        _load_optimizer(optimizer, module, groups, keys, _select(state, f"optimizer_{index}.state."))
    return extra


def _raise_together(problem: str | None, group: dist.ProcessGroup | None) -> None:
    """Raise ``KeyError(problem)`` on every rank when any rank has one: a rank that raised alone would leave the
    others waiting in DCP's collectives until the timeout."""
    problems = [problem]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        problems = [None] * dist.get_world_size(group)
        dist.all_gather_object(problems, problem, group=group)
    first = next(((rank, p) for rank, p in enumerate(problems) if p), None)
    if first is not None:
        rank, message = first
        raise KeyError(message if len(problems) == 1 else f"rank {rank}: {message}")


def _select(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _read_groups(flat: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Param groups from their flattened entries ``<g>.<hyper-parameter>``."""
    groups: dict[int, dict[str, Any]] = {}
    for key, value in flat.items():
        g, _, name = key.partition(".")
        groups.setdefault(int(g), {})[name] = value
    return [groups[g] for g in sorted(groups)]


def _state_keys(
    optimizer: Optimizer, module: nn.Module, groups: list[dict], given: Sequence[GroupNames] | None, index: int
) -> dict[str, str]:
    """For each of this rank's parameters in ``optimizer``: the name its state is saved under."""
    local = [name for names in optimizer_names(optimizer, module) for name in names]
    saved = [p for g in groups for p in g["params"]]
    if not saved or isinstance(saved[0], str):
        return {name: name for name in local}
    # keyed by the whole model's flat index: map names to indices
    if given is not None:
        order = [name for names in given[index] for name in names]
    elif len(local) == len(saved):  # this rank's optimizer holds every parameter: its order is the whole model's
        order = local
    else:
        raise ValueError(
            f"optimizer {index}'s state in this checkpoint is keyed by flat index (converted from a file without "
            "parameter names): pass `optimizer_names`, the whole model's parameter names per param group."
        )
    if len(order) != len(saved):
        raise ValueError(
            f"optimizer {index} of the checkpoint has {len(saved)} parameters, `optimizer_names` gives {len(order)}."
        )
    position = {name: i for i, name in enumerate(order)}
    return {name: str(position[name]) for name in local}


def _template(md: Any, param: torch.Tensor) -> Any:
    """An empty tensor DCP can load an optimizer state entry into: laid out as ``param`` where it has its shape."""
    if not isinstance(md, TensorStorageMetadata):
        return None
    if isinstance(param, DTensor) and tuple(md.size) == tuple(param.shape):
        return torch.empty_like(param, dtype=md.properties.dtype)
    return torch.empty(tuple(md.size), dtype=md.properties.dtype)


def _load_optimizer(
    optimizer: Optimizer, module: nn.Module, groups: list[dict], keys: Mapping[str, str], flat: Mapping[str, Any]
) -> None:
    """Each local param group takes the hyper-parameters of the saved group that holds its parameters (a pipeline
    stage may hold fewer groups than the whole model), and each parameter its saved state."""
    saved_group = {str(p): g for g, group in enumerate(groups) for p in group["params"]}
    state: dict[int, dict[str, Any]] = {}
    param_groups = []
    flat_index = 0
    for g, names in enumerate(optimizer_names(optimizer, module)):
        found = {saved_group.get(keys[name], -1) for name in names}
        if len(found) > 1 or -1 in found:
            raise ValueError(
                f"param group {g} of the optimizer holds parameters of the checkpoint's param groups "
                f"{sorted(found)} (-1: none of its {len(groups)}): they must be the same optimizer "
                "(configure_optimizers() unchanged)."
            )
        source = groups[found.pop()] if names else (groups[g] if g < len(groups) else {})
        param_groups.append({**{k: v for k, v in source.items() if k != "params"}, "params": []})
        for name in names:
            entry = _select(flat, keys[name] + ".")
            if entry:
                state[flat_index] = entry
            param_groups[-1]["params"].append(flat_index)
            flat_index += 1
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


# --- one-process conversion ---------------------------------------------------------------------------------------
