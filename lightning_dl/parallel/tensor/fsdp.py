"""``apply_fsdp(module, dp_mesh)``: FSDP2 (``fully_shard``) over the data-parallel mesh, applied after tensor
parallelism (TP first, then FSDP: torchtitan's order, and the one DTensor composes). Torch only."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _placement(param: nn.Parameter) -> Shard | None:
    # a head-parallel in_proj (_StridedShard rows over tp) is split along its columns over dp: two strided splits of
    # one dimension do not gather back to the right layout
    if isinstance(param, DTensor) and any(isinstance(p, _StridedShard) for p in param.placements):
        return Shard(1)
    return None


def apply_fsdp(module: nn.Module, dp_mesh: DeviceMesh, *, root: bool = False) -> None:
    """Shard ``module``'s parameters, gradients and optimizer state over ``dp_mesh``, in units: each element of a
    block list (``nn.ModuleList``/``nn.Sequential`` of 2 or more modules with parameters), then every other top-level
    child, then ``module`` itself when parameters are left outside every unit, or always with ``root=True`` (a
    pipeline stage: torch's ``PipelineStage`` drives the gradient sync of an FSDP root module). A module whose
    parameters an outer unit already holds is left to it."""

    managed: set[int] = set()

    def shard(m: nn.Module) -> None:
        fully_shard(m, mesh=dp_mesh, shard_placement_fn=_placement)
        managed.update(id(p) for p in m.parameters())

    def free(m: nn.Module) -> bool:  # holds a parameter no unit holds yet (an outer block may hold them all)
        return not isinstance(m, FSDPModule) and any(id(p) not in managed for p in m.parameters())

    for container in list(module.modules()):
        if isinstance(container, nn.ModuleList | nn.Sequential) and len(container) > 1:
            for block in container:
                if free(block):
                    shard(block)
    for child in module.children():  # the modules whose forward runs: each is a unit even when its blocks are
        if _has_params(child) and not isinstance(child, nn.ModuleList | nn.ModuleDict | FSDPModule):
            shard(child)
    if root or any(id(p) not in managed for p in module.parameters()):
        shard(module)
