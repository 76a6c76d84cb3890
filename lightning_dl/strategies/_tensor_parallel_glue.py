"""Lightning glue of the tensor-parallel strategy: a spawn launcher that returns the whole model as plain tensors and
names a rank that died, global-norm clipping for ``gradient_clip_val`` over DTensor meshes, FSDP2 over dp, and the
optimizer state in the single-process format (parameters numbered in the optimizer's order)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from torch.optim import Optimizer

from lightning_dl.parallel.grad_norm import total_norm


class FullStateSpawnLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, except that after ``fit`` the calling process receives the whole model gathered
    from every shard (``strategy.full_state_dict()``, plain tensors) instead of rank 0's local ``state_dict`` of
    DTensors, and a rank that dies is named in the error."""

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        check = getattr(self._strategy, "check_before_launch", None)
        if trainer is not None and check is not None:
            check(trainer)
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            world = len(self._strategy.parallel_devices or [])
            raise RuntimeError(f"rank {err.error_index} of {world} failed in the parallel run: {err}") from err

    def _collect_rank_zero_results(self, trainer: L.Trainer, results: Any) -> _WorkerOutput | None:
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) if callback is not None else None
        state = self._strategy.full_state_dict()  # type: ignore[attr-defined]  # a collective: every rank joins
        if self._strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            self._strategy.checkpoint_io.save_checkpoint(state, weights_path)
        return _WorkerOutput(best, weights_path, trainer.state, results, self.get_extra_results(trainer))

    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: L.Trainer) -> None:
        if worker_output.weights_path is not None:
            state = self._strategy.checkpoint_io.load_checkpoint(worker_output.weights_path)
            absent = [k for k in state if k not in trainer.lightning_module.state_dict()]
            if absent:
                rank_zero_warn(
                    f"The calling process's module has no {absent[:3]} (built in `configure_model()` inside the "
                    "processes): those trained parameters are in the checkpoints only."
                )
        super()._recover_results_in_main_process(worker_output, trainer)


def clip_by_global_norm(precision: Precision) -> None:
    """Make ``gradient_clip_val`` (algorithm ``"norm"``) clip by the norm of the whole model's gradient: DTensor
    shards reduced over their meshes (torch's ``clip_grad_norm_`` fails on gradients on different meshes)."""

    def clip_grad_by_norm(optimizer: Optimizer, clip_val: int | float) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        norm = total_norm(grads, 2.0)
        coef = torch.clamp(float(clip_val) / (norm + 1e-6), max=1.0)
        for grad in grads:  # one mesh per DTensor: a foreach over mixed meshes is not supported
            grad.mul_(coef.to(grad.device))

    precision.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]


def fully_shard_over_dp(module: nn.Module, dp_mesh: DeviceMesh) -> None:
    """FSDP2 over the data-parallel mesh after TP: each element of a block list (``nn.ModuleList``/``nn.Sequential``
    of 2 or more modules with parameters) is one unit, then every other top-level child, then the module itself when
    parameters are left outside every unit."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import fully_shard as _fully_shard

    def has_params(m: nn.Module) -> bool:
        return any(True for _ in m.parameters())

    def placement(param: nn.Parameter) -> Shard | None:
        # a head-parallel in_proj (_StridedShard rows over tp) is split along its columns over dp: two strided
        # splits of one dimension do not gather back to the right layout
        if isinstance(param, DTensor) and any(isinstance(p, _StridedShard) for p in param.placements):
            return Shard(1)
        return None

    def fully_shard(m: nn.Module, mesh: DeviceMesh) -> None:
        _fully_shard(m, mesh=mesh, shard_placement_fn=placement)

    for container in list(module.modules()):
        if isinstance(container, nn.ModuleList | nn.Sequential) and len(container) > 1:
            for block in container:
                if has_params(block) and not isinstance(block, FSDPModule):
                    fully_shard(block, mesh=dp_mesh)
    for child in module.children():
        if has_params(child) and not isinstance(child, nn.ModuleList | nn.ModuleDict | FSDPModule):
            fully_shard(child, mesh=dp_mesh)
    managed = {id(p) for m in module.modules() if isinstance(m, FSDPModule) for p in m.parameters()}
    if any(id(p) not in managed for p in module.parameters()):
        fully_shard(module, mesh=dp_mesh)


def optimizer_state_by_ids(state: Mapping[str, Any]) -> dict[str, Any]:
    """A full optimizer state keyed by parameter names (torch.distributed.checkpoint) as a single-process
    ``Optimizer.state_dict()``: parameters numbered in the order of the param groups."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def optimizer_state_by_names(state: Mapping[str, Any], optimizer: Optimizer, module: nn.Module) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_by_ids` for ``optimizer`` over ``module``'s parameters."""
    names = {id(p): n for n, p in module.named_parameters()}
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint's optimizer has {len(state['param_groups'])} param groups, the module's optimizer "
            f"{len(optimizer.param_groups)}: they must be the same optimizer."
        )
    return {
        "state": {ordered[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [ordered[i] for i in g["params"]]} for g in state["param_groups"]],
    }
