"""``apply_tp(module, tp_mesh, plan)``: shard a module over a 1-D tensor-parallel mesh by an automatic plan, a dict
of module names to styles, or a callable; idempotent, tied weights re-tied afterwards."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from functools import partial
from typing import IO, Any, TypeAlias

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from lightning_dl.parallel.tensor.attention import check_mha
from lightning_dl.parallel.tensor.plan import PlanEntry, TPPlan, kind_of, to_parallel_style
from lightning_dl.parallel.tensor.planner import HEAD_ATTRIBUTES, KV_HEAD_ATTRIBUTES, auto_plan

Plan: TypeAlias = str | Mapping[str, str | ParallelStyle] | Callable[[nn.Module, DeviceMesh], None] | TPPlan
DICT_STYLES = ("colwise", "rowwise", "sequence", "heads", "vocab")
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.Dropout)
_APPLIED = "_lightning_dl_tp_plan"


def _valid_names(module: nn.Module) -> str:
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear | nn.Embedding | nn.MultiheadAttention)]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def _heads_of(module: nn.Module, name: str, tp: int) -> str:
    parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
    for attr in (*HEAD_ATTRIBUTES, *KV_HEAD_ATTRIBUTES):
        value = getattr(parent, attr, None)
        if isinstance(value, int) and value % tp:
            return f"{attr}={value} of {name.rpartition('.')[0] or 'the model'} is not divisible by tp={tp}"
    return ""


def _check_entry(module: nn.Module, name: str, style: str, tp: int) -> str:
    """Empty when ``style`` fits the submodule ``name``, else why not."""
    sub = module.get_submodule(name)
    if style in ("colwise", "rowwise"):
        if isinstance(sub, nn.Linear):
            size, what = (sub.out_features, "out_features") if style == "colwise" else (sub.in_features, "in_features")
            if size % tp:
                return f"{what}={size} is not divisible by tp={tp}"
            return _heads_of(module, name, tp)
        if isinstance(sub, nn.Embedding):
            size, what = (sub.embedding_dim, "embedding_dim") if style == "colwise" else (sub.num_embeddings, "vocab")
            return f"{what}={size} is not divisible by tp={tp}" if size % tp else ""
        return f"'{style}' splits an nn.Linear or nn.Embedding, not {kind_of(sub)}"
    if style == "vocab":
        if not isinstance(sub, nn.Embedding):
            return f"'vocab' splits an nn.Embedding, not {kind_of(sub)}"
        return f"num_embeddings={sub.num_embeddings} is not divisible by tp={tp}" if sub.num_embeddings % tp else ""
    if style == "heads":
        if not isinstance(sub, nn.MultiheadAttention):
            return f"'heads' splits an nn.MultiheadAttention, not {kind_of(sub)}"
        return check_mha(sub, tp)
    if style == "sequence" and not isinstance(sub, _NORMS):
        return f"'sequence' runs a LayerNorm, RMSNorm or Dropout on sequence shards, not {kind_of(sub)}"
    return ""


def plan_from_dict(module: nn.Module, plan: Mapping[str, str | ParallelStyle], tp: int) -> dict[str, ParallelStyle]:
    """Validate a dict plan (names that exist, styles that fit) and turn it into torch ``ParallelStyle`` objects."""
    styles: dict[str, ParallelStyle] = {}
    for name, style in plan.items():
        try:
            module.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"`plan` names {name!r}, which is not a submodule of {kind_of(module)}; "
                f"its shardable submodules are: {_valid_names(module)}."
            ) from None
        if isinstance(style, ParallelStyle):
            styles[name] = style
            continue
        if style not in DICT_STYLES:
            raise ValueError(f"`plan[{name!r}]={style!r}` is not a style; valid: {DICT_STYLES} or a ParallelStyle.")
        reason = _check_entry(module, name, style, tp)
        if reason:
            raise ValueError(f"`plan[{name!r}]={style!r}` does not fit: {reason}.")
        styles[name] = to_parallel_style(style, module.get_submodule(name))
    return styles


def _ties(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, parameter name) that share one Parameter object."""
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for sub in module.modules():
        for pname, param in sub.named_parameters(recurse=False):
            groups.setdefault(id(param), []).append((sub, pname))
    return [g for g in groups.values() if len(g) > 1]


def apply_tp(
    module: nn.Module,
    tp_mesh: DeviceMesh,
    plan: Plan = "auto",
    *,
    loss_parallel: bool = False,
    sequence_parallel: bool = False,
) -> TPPlan:
    """Shard ``module`` in place over the 1-D mesh ``tp_mesh`` and return the plan applied.

    ``plan`` is ``"auto"`` (:func:`auto_plan`), a dict of submodule name to ``"colwise"``, ``"rowwise"``,
    ``"sequence"``, ``"heads"``, ``"vocab"`` or a torch ``ParallelStyle``, a :class:`TPPlan`, or a callable
    ``(module, tp_mesh) -> None`` that shards the module itself. Applying to a module already sharded is a no-op that
    returns the first plan (Lightning calls ``configure_model`` again for validate/test/predict). Parameters shared
    by several modules before are shared again after.
    """
    if getattr(module, _APPLIED, None) is not None:
        return getattr(module, _APPLIED)
    tp = tp_mesh.size()
    if isinstance(plan, str) and plan != "auto":
        raise ValueError(f"`plan={plan!r}` must be 'auto', a dict of module name to style, or a callable.")
    if any(isinstance(p, DTensor) for p in module.parameters()):
        applied = TPPlan(tp, [PlanEntry("", kind_of(module), "replicate", "already sharded by its own plan")])
        object.__setattr__(module, _APPLIED, applied)
        return applied
    ties = _ties(module)
    if callable(plan) and not isinstance(plan, TPPlan | Mapping):
        plan(module, tp_mesh)
        applied = TPPlan(tp, [PlanEntry("", kind_of(module), "replicate", "sharded by the plan callable")])
    else:
        if isinstance(plan, str):
            plan = auto_plan(module, tp, loss_parallel=loss_parallel, sequence_parallel=sequence_parallel)
        if isinstance(plan, TPPlan):
            applied, styles = plan, plan.styles(module)
        else:
            styles = plan_from_dict(module, plan, tp)
            entries = [
                PlanEntry(name, kind_of(module.get_submodule(name)), s if isinstance(s, str) else type(s).__name__)
                for name, s in plan.items()
            ]
            applied = TPPlan(tp, entries, loss_parallel=loss_parallel)
        if styles:
            parallelize_module(module, tp_mesh, styles)
        for entry in applied.entries:
            if entry.style in ("sequence_enter", "sequence_region"):
                # runs before the split: a sequence tp does not divide would be cut unevenly
                module.get_submodule(entry.name).register_forward_pre_hook(partial(_check_length, tp), prepend=True)
    for group in ties:
        owner, pname = group[0]
        for sub, name in group[1:]:
            setattr(sub, name, getattr(owner, pname))
    object.__setattr__(module, _APPLIED, applied)
    return applied


def _check_length(tp: int, module: nn.Module, args: tuple[Any, ...]) -> None:
    length = args[0].shape[1]
    if length % tp:
        raise ValueError(
            f"sequence parallelism splits the sequence over tp={tp} ranks; a length of {length} does not divide."
        )


def explain_plan(
    module: nn.Module,
    tp: int = 2,
    *,
    loss_parallel: bool = False,
    sequence_parallel: bool = False,
    plan: Plan = "auto",
    file: IO[str] | None = None,
) -> TPPlan:
    """Print the plan ``apply_tp`` would apply for ``tp`` ranks (module, style, sharded dimension, reason), without
    processes, and return it.

    Example::

        >>> from torch import nn
        >>> _ = explain_plan(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4)), tp=2)
        module  type    style    sharded dim  reason
        0       Linear  colwise  out (0)      pair with 2
        2       Linear  rowwise  in (1)       pair with 0
        tp=2: 2 of 2 layers sharded
    """
    if isinstance(plan, str):
        result = auto_plan(module, tp, loss_parallel=loss_parallel, sequence_parallel=sequence_parallel)
    elif isinstance(plan, TPPlan):
        result = plan
    elif isinstance(plan, Mapping):
        plan_from_dict(module, plan, tp)
        result = TPPlan(tp, [PlanEntry(n, kind_of(module.get_submodule(n)), _name(s)) for n, s in plan.items()])
    else:
        raise ValueError("`plan` given as a callable shards the module itself; explain_plan cannot show it.")
    print(result.table(), file=file or sys.stdout)
    return result


def _name(style: Any) -> str:
    return style if isinstance(style, str) else type(style).__name__
