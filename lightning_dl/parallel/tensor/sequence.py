"""Megatron's sequence parallelism over a block list: between the Linear pairs, the residual stream (norms, dropout,
residual sums) runs on each rank's slice of the sequence; a pair gathers the sequence before its column-parallel
half and reduce-scatters after its row-parallel half (the all-reduce of plain TP split in two), so activations
outside the pairs take 1/tp of the memory.

Accepted only where that is exact: a list of blocks (``nn.ModuleList``/``nn.Sequential``) each of whose parameters
belong to a Linear pair or a LayerNorm/RMSNorm, and whose forward mixes tokens only inside a pair (attention);
everything else between the pairs must be token-wise (elementwise operations, sums, norms, dropout)."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from lightning_dl.parallel.tensor.trace import Level, classify, describe, is_size_node

NORMS = (nn.LayerNorm, nn.RMSNorm)
TOKENWISE = (*NORMS, nn.Dropout, nn.Identity)


def _block_lists(model: nn.Module, styles: dict[str, tuple[str, str]]) -> list[tuple[str, int]]:
    """Containers whose every element holds a Linear pair, the longest first."""
    paired = [n for n, (style, _) in styles.items() if style in ("colwise", "rowwise")]
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList | nn.Sequential) and len(module) > 0:
            prefixes = [f"{name}.{i}." if name else f"{i}." for i in range(len(module))]
            if all(any(p.startswith(prefix) for p in paired) for prefix in prefixes):
                found.append((name, len(module)))
    return sorted(found, key=lambda item: -item[1])


def _check_block(
    model: nn.Module, prefix: str, levels: list[Level], styles: dict[str, tuple[str, str]], cones: dict[str, set]
) -> str:
    """Empty when the block at ``prefix`` runs exactly on sequence slices between its pairs, else why not."""
    for name, module in model.named_modules():
        if not (name + ".").startswith(prefix):
            continue
        if isinstance(module, nn.MultiheadAttention):
            return f"{name} is a MultiheadAttention (split by heads; its inputs are not gathered along the sequence)"
        own = any(True for _ in module.parameters(recurse=False))
        paired = styles.get(name, ("replicate",))[0] in ("colwise", "rowwise")
        if own and not paired and not isinstance(module, NORMS):
            return f"{name} ({type(module).__name__}) holds parameters outside the pairs and norms"
    for level in levels:
        if not (level.name + ".").startswith(prefix):
            continue
        if level.graph is None:
            return f"{level.name}.forward could not be traced ({level.error})"
        cone = cones.get(level.name, set())
        for node in level.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr") or node in cone:
                continue
            if node.op == "call_module":
                sub = level.module.get_submodule(str(node.target))
                if isinstance(sub, TOKENWISE) or next(sub.children(), None) is not None:
                    continue
            elif not is_size_node(node) and classify(level, node) in ("elementwise", "product"):
                continue
            return f"{describe(level, node)} acts across tokens outside a pair"
    return ""


def plan_sequence_parallel(
    model: nn.Module, levels: list[Level], styles: dict[str, tuple[str, str]], cones: dict[str, set[fx.Node]]
) -> dict[str, tuple[str, str]]:
    """The entries that turn the tensor-parallel ``styles`` of the longest block list into sequence parallelism;
    raises ``ValueError`` naming the reason where that would not be exact."""
    candidates = _block_lists(model, styles)
    if not candidates:
        raise ValueError(
            "`sequence_parallel=True` needs a list of blocks (nn.ModuleList or nn.Sequential) each holding a Linear "
            "pair, and the automatic plan found none: set sequence_parallel=False."
        )
    name, count = candidates[0]
    for i in range(count):
        reason = _check_block(model, f"{name}.{i}." if name else f"{i}.", levels, styles, cones)
        if reason:
            raise ValueError(f"`sequence_parallel=True` cannot split the blocks of {name or 'the model'}: {reason}.")
    changes: dict[str, tuple[str, str]] = {}
    for entry, (style, reason) in styles.items():
        if not entry.startswith(f"{name}." if name else ""):
            continue
        if style in ("colwise", "rowwise"):
            changes[entry] = (f"{style}_seq", reason + ("; gathers the sequence" if style == "colwise" else ""))
    for sub_name, module in model.named_modules():
        if sub_name.startswith(f"{name}." if name else "") and isinstance(module, NORMS):
            changes[sub_name] = ("sequence", "norm on sequence slices")
    first, last = (f"{name}.{i}" if name else str(i) for i in (0, count - 1))
    if first == last:
        changes[first] = ("sequence_region", "enters split along the sequence, leaves whole")
    else:
        changes[first] = ("sequence_enter", "the sequence is split here")
        changes[last] = ("sequence_exit", "the sequence is gathered here")
    return changes
