"""Build a rank's pipeline stages from the whole model by deleting the blocks it does not own, so every kept
parameter keeps its name in the whole model; materialise meta blocks locally; infer each stage's static input and
output shapes on the meta device. Torch only."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call


class StageModule(nn.Module):
    """Blocks ``[start, stop)`` of the model, applied in order: the ``submodule`` of one ``PipelineStage``."""

    def __init__(self, blocks: Sequence[nn.Module], start: int) -> None:
        super().__init__()
        self.start = start
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def split_model(root: nn.Module, blocks: Sequence[nn.Module], keep: Iterable[int]) -> list[nn.Module]:
    """Delete from ``root`` every block whose index is not in ``keep`` (replaced by ``nn.Identity``, so the names
    of what stays are unchanged) and move those blocks to the meta device (they keep their shapes for shape
    inference but no memory). Returns the blocks, owned ones real, the others on meta.

    Raises when ``root`` has parameters that belong to no block (they would be owned by no stage).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> shadows = split_model(net, list(net), keep=[2])
        >>> [name for name, _ in net.named_parameters()]
        ['2.weight', '2.bias']
        >>> shadows[0].weight.device.type
        'meta'
    """
    keep = set(keep)
    names = {id(m): name for name, m in root.named_modules(remove_duplicate=False) if name}
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    outside = [name for name, p in root.named_parameters() if id(p) not in in_blocks]
    if outside:
        raise ValueError(
            f"parameters {outside[:5]} belong to no block of `pipeline_blocks()`: every parameter must sit in exactly "
            "one block so that one stage owns it."
        )
    for index, block in enumerate(blocks):
        if index in keep:
            continue
        name = names.get(id(block))
        if name is None:
            if _has_tensors(block):
                raise ValueError(
                    f"block {index} ({type(block).__name__}) of `pipeline_blocks()` holds parameters or buffers but "
                    "is not a submodule of the module: return the module's own submodules."
                )
            continue
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        parent._modules[child] = nn.Identity()
        block.to("meta")
    return list(blocks)


def materialize(blocks: Sequence[nn.Module], indices: Iterable[int], *, device: torch.device, seed: int) -> None:
    """Give the meta blocks among ``indices`` real storage on ``device`` and initialise them with their modules'
    ``reset_parameters()``, block ``i`` under ``torch.manual_seed(seed + i)``: the values depend on the block, not on
    the layout, so one process materialising every block gets the same model."""
    for index in indices:
        block = blocks[index]
        if not any(t.is_meta for t in (*block.parameters(), *block.buffers())):
            continue
        block.to_empty(device=device)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed + index)
            for module in block.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()


def _meta_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` on the meta device, never touching the block's real tensors (running statistics stay)."""
    state = {n: torch.empty_like(t, device="meta") for n, t in (*block.named_parameters(), *block.named_buffers())}
    with torch.no_grad():
        return functional_call(block, state, (x,))


def stage_shapes(
    blocks: Sequence[nn.Module], spans: Sequence[tuple[int, int]], example: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Meta tensors of each stage's input and output for an input shaped like ``example`` (dtype kept).

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> [(tuple(i.shape), tuple(o.shape)) for i, o in stage_shapes(list(net), [(0, 2), (2, 3)], torch.zeros(4, 2))]
        [((4, 2), (4, 3)), ((4, 3), (4, 1))]
    """
    x = torch.empty_like(example, device="meta")
    shapes = []
    for start, stop in spans:
        first = x
        for block in blocks[start:stop]:
            x = _meta_forward(block, x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"the blocks of a pipeline stage must return one tensor; blocks [{start}, {stop}) returned "
                f"{type(x).__name__}."
            )
        shapes.append((first, x))
    return shapes
