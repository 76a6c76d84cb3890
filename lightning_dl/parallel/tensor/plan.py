"""A tensor-parallel plan as data: one entry per module (its style, the dimension it shards, the reason where it
stays replicated), printable as a table, and turned into torch ``ParallelStyle`` objects."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from lightning_dl.parallel.tensor.attention import HeadParallelAttention

STYLES = (
    "colwise", "rowwise", "sequence", "heads", "vocab", "vocab_head", "replicate",
    "colwise_seq", "rowwise_seq", "sequence_region", "sequence_enter", "sequence_exit",
)  # fmt: skip
"""Style names: ``colwise`` (``Y = XA``, A split along its output features), ``rowwise`` (A split along its input
features, the partial outputs all-reduced), ``sequence`` (a norm on sequence-sharded activations), ``heads`` (a
``nn.MultiheadAttention`` split by heads), ``vocab`` (an embedding split along the vocabulary), ``vocab_head`` (the
output projection split along the vocabulary, logits left sharded for ``loss_parallel``), ``replicate``; with
sequence parallelism ``colwise_seq`` (gathers a sequence-sharded input first), ``rowwise_seq`` (reduce-scatters its
output along the sequence) and ``sequence_region`` (the block list, entered split along the sequence, left whole)."""

SHARDED_DIM = {"colwise": "out (0)", "rowwise": "in (1)", "sequence": "seq (1)", "heads": "heads", "vocab": "vocab (0)"}
SHARDED_DIM |= {
    "vocab_head": "vocab (0)",
    "colwise_seq": "out (0)",
    "rowwise_seq": "in (1)",
    "sequence_region": "seq (1)",
}
SHARDED_DIM |= {"sequence_enter": "seq (1)", "sequence_exit": "seq (1)"}


@dataclass(frozen=True)
class PlanEntry:
    """How one module is split: ``style`` one of ``STYLES``; ``reason`` says why (or why it is not)."""

    name: str
    kind: str
    style: str
    reason: str = ""

    @property
    def sharded(self) -> bool:
        return self.style != "replicate"


@dataclass
class TPPlan:
    """An ordered plan (execution order where the planner traced it) over a module's Linear, Embedding and
    MultiheadAttention layers, for one tensor-parallel degree ``tp``."""

    tp: int
    entries: list[PlanEntry] = field(default_factory=list)
    loss_parallel: bool = False
    sequence_parallel: bool = False

    def styles(self, model: nn.Module) -> dict[str, ParallelStyle]:
        """The torch ``ParallelStyle`` of every sharded entry of ``model``, keyed by module name."""
        return {e.name: to_parallel_style(e.style, model.get_submodule(e.name)) for e in self.entries if e.sharded}

    def __getitem__(self, name: str) -> PlanEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    @property
    def sharded_names(self) -> list[str]:
        return [e.name for e in self.entries if e.sharded]

    def table(self) -> str:
        """The plan as a fixed-width table: module, type, style, sharded dimension, reason."""
        rows = [("module", "type", "style", "sharded dim", "reason")]
        rows += [(e.name or "(root)", e.kind, e.style, SHARDED_DIM.get(e.style, "-"), e.reason) for e in self.entries]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = []
        for row in rows:
            lines.append(("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]).rstrip())
        sharded = sum(e.sharded for e in self.entries)
        lines.append(f"tp={self.tp}: {sharded} of {len(self.entries)} layers sharded")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def to_parallel_style(style: str, module: nn.Module | None = None) -> ParallelStyle:
    """The torch ``ParallelStyle`` for a style name of ``STYLES`` (not ``replicate``) on ``module``."""
    if style == "colwise":
        return ColwiseParallel()
    if style == "vocab" or (style == "rowwise" and isinstance(module, nn.Embedding)):
        return RowwiseParallel(input_layouts=Replicate())  # token ids are whole on every rank
    if style == "rowwise":
        return RowwiseParallel()
    if style == "vocab_head":
        return ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    if style == "sequence":
        return SequenceParallel(use_local_output=True)  # the residual stream stays plain local sequence shards
    if style == "colwise_seq":
        return ColwiseParallel(input_layouts=Shard(1))
    if style == "rowwise_seq":
        return RowwiseParallel(output_layouts=Shard(1))
    if style == "sequence_enter":
        return PrepareModuleInput(input_layouts=Replicate(), desired_input_layouts=Shard(1), use_local_output=True)
    if style == "sequence_exit":
        return PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate())
    if style == "sequence_region":
        return PrepareModuleInputOutput(
            input_layouts=Replicate(), desired_input_layouts=Shard(1), use_local_input=True,
            output_layouts=Shard(1), desired_output_layouts=Replicate(),
        )  # fmt: skip
    if style == "heads":
        return HeadParallelAttention()
    raise ValueError(f"style {style!r} has no ParallelStyle; valid: {STYLES[:-1]}.")


def kind_of(module: nn.Module) -> str:
    return type(module).__name__
