"""Gradient norms that are the same on every rank and equal to the single-process norm of the whole model, whatever
the layout: DTensor (tensor parallel, FSDP2) shards are reduced over their mesh, and stages that hold different
parameters (pipeline) are reduced over a process group. Also collects the squared norms of each local micro-batch
gradient, which AdaScale and the gradient-noise scale compare with the norm of the averaged gradient. Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle


def _local_norms(tensors: Sequence[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """One multi-tensor kernel per device and dtype: the p-norm of each tensor (DTensors give partial norms)."""
    return list(torch._foreach_norm(list(tensors), norm_type))


def combine_norms(norms: Iterable[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The p-norm of a concatenation from the p-norms of its parts (max for p = inf)."""
    stacked = torch.stack([n.float() for n in norms])
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


def _group_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a tensor for ``group``'s collectives lives: the current CUDA device under NCCL, else the CPU."""
    if group is not None and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def total_norm(
    tensors: Sequence[torch.Tensor],
    norm_type: float = 2.0,
    *,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The p-norm of all ``tensors`` taken together, as one float32 scalar on their device.

    DTensors (sharded or replicated) count each element once: their norm is reduced over their device mesh by
    DTensor itself. Plain tensors are local; pass ``group`` when different ranks of it hold different parameters
    (pipeline stages), and their contributions are summed (p-th powers) or maxed (p = inf) over it. Under plain data
    parallelism the gradients are already averaged and identical on every rank: leave ``group`` as None.

    Example::

        >>> g = [torch.tensor([3.0]), torch.tensor([[4.0]])]
        >>> total_norm(g).item(), total_norm(g, norm_type=float("inf")).item()
        (5.0, 4.0)
    """
    if norm_type <= 0:
        raise ValueError(f"`norm_type` must be > 0 (2.0, 1.0 or inf), got {norm_type!r}.")
    dtensors = [t for t in tensors if isinstance(t, DTensor)]
    plain = [t for t in tensors if not isinstance(t, DTensor)]
    first = tensors[0].to_local() if tensors and isinstance(tensors[0], DTensor) else (tensors[0] if tensors else None)
    # a zero part: a rank without gradients (a stage whose parameters got none) still joins the reduction below
    parts = [torch.zeros((), device=first.device if first is not None else _group_device(group))]
    if plain:
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in plain:
            by_device.setdefault(t.device, []).append(t)
        device = plain[0].device
        parts += [combine_norms(_local_norms(ts, norm_type), norm_type).to(device) for ts in by_device.values()]
    if dtensors:
        device = dtensors[0].to_local().device
        # torch.linalg.vector_norm of a DTensor is a DTensor whose full_tensor() reduces shards over the mesh
        parts += [torch.linalg.vector_norm(t, norm_type).full_tensor().float().to(device) for t in dtensors]
    local = combine_norms(parts, norm_type)
    if group is not None and dist.get_world_size(group) > 1:
        if math.isinf(norm_type):
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        else:
            local = local.pow(norm_type)
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
            local = local.pow(1.0 / norm_type)
    return local


class MicroBatchGradSquares:
    """Sum of ``‖∂loss/∂p‖²`` over every backward pass and every parameter of each group, taken by tensor hooks:
    each gradient as one backward produces it, on this rank, before it is added into ``.grad`` and before a data-
    parallel reduction. Over ``c`` accumulation micro-batches on ``N`` ranks the all-reduced sum is therefore
    ``Σ_i ‖g_i‖²`` over the ``c·N`` small gradients whose mean is the gradient the optimizer steps with.

    Example::

        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> squares = MicroBatchGradSquares([[w]])
        >>> for x in (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])):
        ...     (w * x).sum().backward()
        >>> squares.pop().tolist(), w.grad.tolist()  # 1² + 2², while .grad holds the sum [1, 2]
        ([5.0], [1.0, 2.0])
        >>> squares.remove()
    """

    def __init__(
        self,
        param_groups: Sequence[Sequence[torch.Tensor]],
        *,
        coordinates: Mapping[int, torch.Tensor] | None = None,
    ) -> None:
        self._num_groups = len(param_groups)
        self._sums: torch.Tensor | None = None
        self.coordinates = coordinates
        self._elementwise: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = [
            p.register_hook(partial(self._hook, index, id(p)))
            for index, params in enumerate(param_groups)
            for p in params
            if p.requires_grad
        ]

    def _hook(self, index: int, key: int, grad: torch.Tensor) -> None:
        square = grad.detach().float().pow(2)
        if self._sums is None:
            self._sums = torch.zeros(self._num_groups, device=grad.device)
        self._sums[index] += square.sum()
        if self.coordinates is not None and key in self.coordinates:
            picked = square.flatten()[self.coordinates[key]]
            if key in self._elementwise:
                self._elementwise[key] += picked
            else:
                self._elementwise[key] = picked

    def pop(self) -> torch.Tensor | None:
        """The sums since the last ``pop`` (one entry per group), or None when no backward ran; then reset."""
        sums, self._sums = self._sums, None
        return sums

    def pop_elementwise(self, params: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """With ``coordinates`` (flat indices per ``id(param)``): ``Σ_i g_i²`` at those coordinates, concatenated in
        the order of ``params`` (zeros for a parameter that got no gradient), or None when no backward ran; then
        reset."""
        if not self._elementwise or self.coordinates is None:
            return None
        device = next(iter(self._elementwise.values())).device
        parts = [
            self._elementwise.get(id(p), torch.zeros(len(self.coordinates[id(p)]), device=device))
            for p in params
            if id(p) in self.coordinates
        ]
        self._elementwise = {}
        return torch.cat(parts)

    def remove(self) -> None:
        """Unregister the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sums = None
        self._elementwise = {}
