"""Lightning glue of the model-parallel engine (``HybridStrategy`` and its presets): the one spawn launcher (checks
before any process starts, names a rank that died, hands the calling process the whole trained model, leaves the
process group together), global-norm clipping for Lightning's ``gradient_clip_val``, and small helpers.

Parameters keep their whole-model names on every rank (stages are built by deleting blocks, shards are DTensors under
the same names), so "plain" state is keyed by those names.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from lightning_dl.parallel.comm import leave_together
from lightning_dl.parallel.grad_norm import total_norm


class FullStateLauncher(_MultiProcessingLauncher):
    """Lightning's spawn launcher, except that:

    - ``strategy.check_before_launch(trainer)`` runs in the calling process first, so bad settings fail before any
      process starts; a rank that dies is named in the error;
    - the weights sent back after ``fit`` are ``strategy.full_state_dict()`` (the whole model gathered from every
      stage and shard, plain tensors: a collective) instead of rank 0's local ``state_dict``, which Lightning loads
      with ``strict=False`` and so would leave other stages untrained or fail on DTensors. A module that builds its
      blocks in ``configure_model()`` gets them built in the calling process (on meta, then materialised) and loads
      every trained entry ``strict=True``;
    - ``strategy.collect_results()`` (a collective, when defined) goes to ``strategy.receive_results(...)`` in the
      calling process (the pipeline timeline);
    - every rank waits for the others before leaving the process group (:func:`leave_together`).
    """

    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        check = getattr(self._strategy, "check_before_launch", None)
        if trainer is not None and check is not None:
            check(trainer)
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            world = len(self._strategy.parallel_devices or [])
            raise RuntimeError(f"rank {err.error_index} of {world} failed in the parallel run: {err}") from err

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        leave_together()  # only after a rank's work succeeded: a failure propagates without waiting

    def _collect_rank_zero_results(self, trainer: L.Trainer, results: Any) -> _WorkerOutput | None:
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None) if callback is not None else None
        state = self._strategy.full_state_dict()  # type: ignore[attr-defined]  # a collective: every rank joins
        collect = getattr(self._strategy, "collect_results", None)
        self._strategy_results = collect() if collect is not None else None  # a collective too
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
            load_whole_model(trainer.lightning_module, state)
            self._strategy.checkpoint_io.remove_checkpoint(worker_output.weights_path)
            worker_output = worker_output._replace(weights_path=None)
        super()._recover_results_in_main_process(worker_output, trainer)


def load_whole_model(module: L.LightningModule, state: Mapping[str, torch.Tensor]) -> None:
    """Load the whole trained model into the calling process's ``module``. When the state holds entries the module
    lacks (blocks built in ``configure_model()`` inside the processes), build them here first: ``configure_model()``
    on the meta device, then storage on CPU for every meta tensor, then every entry loaded ``strict=True``."""
    own = module.state_dict()
    if all(k in own for k in state):
        module.load_state_dict(state, strict=False)  # plain modules: the entries it has (Lightning's own behaviour)
        return
    try:
        with torch.device("meta"):
            module.configure_model()
        materialize_meta(module, torch.device("cpu"))
        module.load_state_dict(state, strict=True)
    except Exception as err:  # a configure_model that needs the processes (a device mesh) cannot run here
        absent = [k for k in state if k not in module.state_dict()]
        rank_zero_warn(
            f"The calling process's module has no {absent[:3]}... (built in `configure_model()` inside the processes) "
            f"and building it here failed ({type(err).__name__}: {err}): those trained parameters stay in the "
            "checkpoints only."
        )


def materialize_meta(module: nn.Module, device: torch.device) -> None:
    """Give every module with meta parameters or buffers storage on ``device`` (values are loaded afterwards; modules
    with a ``reset_parameters()`` are initialised by it, so non-persistent buffers get their values)."""
    for sub in module.modules():
        tensors = [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]
        if any(t.is_meta for t in tensors):
            sub.to_empty(device=device, recurse=False)
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                with torch.no_grad():
                    reset()


def clip_grad_norm_global(
    parameters: Iterable[torch.Tensor], max_norm: float, *, group: dist.ProcessGroup | None, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale gradients so that their norm over every rank of ``group`` (pipeline stages hold different parameters)
    and every DTensor mesh (tensor and FSDP shards) is at most ``max_norm``; returns that global norm, the same on
    every rank of the group.

    Example::

        >>> w = nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> clip_grad_norm_global([w], 1.0, group=None).item(), w.grad.norm().item() < 1.0 + 1e-6
        (5.0, True)
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = total_norm(grads, norm_type, group=group)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    if any(isinstance(g, DTensor) for g in grads):
        for grad in grads:  # one mesh per DTensor: a foreach kernel does not take gradients on different meshes
            grad.mul_(coef.to(norm.device))
    elif grads:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm


def use_global_norm_clipping(precision: Precision, group_fn: Callable[[], dist.ProcessGroup | None]) -> None:
    """Make Lightning's ``gradient_clip_val`` (algorithm ``"norm"``) clip by the global norm over ``group_fn()`` and
    every DTensor mesh instead of this rank's local norm (Lightning's ``clip_grad_norm_`` over local parameters is a
    different norm on every rank under pipeline or tensor parallelism, and fails on gradients on several meshes).
    Only this precision plugin instance's ``clip_grad_by_norm`` is replaced."""

    def clip_grad_by_norm(optimizer: Optimizer, clip_val: int | float) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_grad_norm_global(params, float(clip_val), group=group_fn())

    precision.clip_grad_by_norm = clip_grad_by_norm  # type: ignore[method-assign]


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
