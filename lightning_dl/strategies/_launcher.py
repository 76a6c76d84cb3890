"""A process launcher for the asynchronous strategies: it starts the processes like Lightning's multiprocessing
launcher, but the run survives the death of an expendable process (an async worker), fails fast with the dead
process's traceback when an essential one dies (a parameter server), and runs test/validate/predict in the calling
process, on the parameters training left there. Under torchrun or SLURM the processes exist already: each runs
``fit`` as the rank the environment gave it."""

from __future__ import annotations

import io
import logging
import os
import pickle
import signal
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.strategies.launchers.multiprocessing import _GlobalStateSnapshot, _MultiProcessingLauncher
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

from lightning_dl.strategies._base import AsyncBase

log = logging.getLogger(__name__)
_RUN_STATE = "lightning_dl_run_state"


class ProcessDiedError(RuntimeError):
    """An essential process of an asynchronous run died."""


class TolerantLauncher(_Launcher):
    """Starts ``strategy.num_processes`` processes for ``fit``; runs everything else in the calling process. Ranks
    below ``essential`` are the ones the run cannot lose; after an essential failure the others get ``grace``
    seconds to exit before they are terminated. ``share_memory`` keeps tensors shared with the parent (Hogwild)
    instead of copying them."""

    def __init__(
        self,
        strategy: AsyncBase,
        start_method: str = "spawn",
        *,
        essential: int,
        share_memory: bool = False,
        grace: float = 30.0,
    ) -> None:
        self._async = strategy
        self._spawner = _Spawner(strategy, start_method, essential=essential, share_memory=share_memory, grace=grace)
        self._picked: list[Any] = []  # loggers whose version this launcher chose for the last fit

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return self._spawner.is_interactive_compatible

    @override
    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            _new_log_versions(self._picked)
            self._picked = []
            self._async.in_process = True
            return function(*args, **kwargs)
        # fix each version here, so the processes and this one share the directory
        self._picked = [logger for logger in trainer.loggers if getattr(logger, "_version", 0) is None]
        for logger in trainer.loggers:
            _ = logger.version
        self._async.in_process = False
        try:
            return self._spawner.launch(function, *args, trainer=trainer, **kwargs)
        finally:  # whatever happened, save/test/validate/predict now run here on this process's parameters
            self._async.in_process = True

    @override
    def kill(self, signum: Any) -> None:
        self._spawner.kill(signum)


class ExternalLauncher(_Launcher):
    """For processes that an outside launcher started (torchrun, SLURM): this process is one rank of ``fit``;
    test/validate/predict run here on the parameters it holds (rank 0 holds the whole trained model)."""

    def __init__(self, strategy: AsyncBase) -> None:
        self._async = strategy

    @property
    @override
    def is_interactive_compatible(self) -> bool:
        return False

    @override
    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        self._async.in_process = trainer is None or trainer.state.fn != TrainerFn.FITTING
        try:
            return function(*args, **kwargs)
        finally:
            self._async.in_process = True

    @override
    def kill(self, signum: Any) -> None:
        pass  # the outside launcher owns the processes


class _Spawner(_MultiProcessingLauncher):
    """Lightning's multiprocessing launcher, watching the processes instead of joining them, and handing rank 0's
    training state back with its parameters."""

    def __init__(
        self, strategy: AsyncBase, start_method: str, *, essential: int, share_memory: bool, grace: float
    ) -> None:
        super().__init__(strategy, start_method=start_method)  # type: ignore[arg-type]
        self._async = strategy
        self._essential = essential
        self._share_memory = share_memory
        self._grace = grace

    @override
    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        assert trainer is not None and self._strategy.cluster_environment is not None
        os.environ["MASTER_PORT"] = str(self._strategy.cluster_environment.main_port)
        context = mp.get_context(self._start_method)
        return_queue = context.SimpleQueue()
        states = _GlobalStateSnapshot.capture() if self._start_method == "spawn" else None
        process_context = mp.start_processes(
            self._wrapping_function,
            args=(trainer, function, args, kwargs, return_queue, states),
            nprocs=self._async.num_processes,
            start_method=self._start_method,
            join=False,
        )
        self.procs = process_context.processes
        self._watch(process_context.processes, process_context.error_files)
        output = return_queue.get()
        self._recover_results_in_main_process(output, trainer)
        return output.trainer_results

    @override
    def get_extra_results(self, trainer: L.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        buffer = io.BytesIO()
        torch.save(self._async.run_state(trainer), buffer)
        extra[_RUN_STATE] = buffer.getvalue()
        return extra

    @override
    def update_main_process_results(self, trainer: L.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        # written by rank 0 of this run (a process this one started), so unpickling it is as safe as the run itself
        state = torch.load(io.BytesIO(extra[_RUN_STATE]), weights_only=False)
        self._async.restore_run_state(trainer, state)

    def _watch(self, processes: list, error_files: list) -> None:
        reported: set[int] = set()
        deadline = None
        fatal = None
        while True:
            for rank, process in enumerate(processes):
                if process.exitcode is None or rank in reported:
                    continue
                reported.add(rank)
                if process.exitcode == 0:
                    if rank == 0:
                        deadline = deadline or time.monotonic() + self._grace
                    continue
                why = _describe(rank, process, error_files[rank])
                if rank < self._essential:
                    fatal = fatal or why
                    deadline = min(deadline or float("inf"), time.monotonic() + self._grace)
                else:
                    log.warning("%s The run goes on without it.", why)
            if len(reported) == len(processes):
                break
            if deadline is not None and time.monotonic() > deadline:
                for rank, process in enumerate(processes):
                    if process.exitcode is None:
                        log.warning("Terminating rank %d (pid %d): it did not exit in time.", rank, process.pid)
                        process.terminate()
                        process.join(5)
                        if process.exitcode is None:
                            process.kill()
                break
            time.sleep(0.1)
        for process in processes:
            process.join(5)
        if fatal is not None:
            raise ProcessDiedError(fatal)

    def _wrapping_function(
        self,
        process_idx: int,
        trainer: L.Trainer | None,
        function: Callable,
        args: Any,
        kwargs: Any,
        return_queue: Any,
        global_states: _GlobalStateSnapshot | None = None,
    ) -> None:
        if global_states is not None:
            global_states.restore()
        if not self._share_memory:
            args, kwargs = _unshare((args, kwargs))
        if "OMP_NUM_THREADS" not in os.environ:  # the processes share the cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self._async.num_processes))
        os.environ["LOCAL_RANK"] = str(process_idx)
        results = function(*args, **kwargs)
        if trainer is not None:
            results = self._collect_rank_zero_results(trainer, results)
        if process_idx == 0:
            return_queue.put(results)


def _new_log_versions(loggers: list[Any]) -> None:
    """Send what the calling process logs after a fit to a new version directory (as Lightning does after
    ``ddp_spawn``): the fit's processes wrote the version chosen for them, and a logger opened on it here would
    delete their metrics. Only versions the launcher chose are changed, never one the user gave."""
    for logger in loggers:
        # CSVLogger and TensorBoardLogger pick the next free version when theirs is unset and nothing is open yet
        if getattr(logger, "_experiment", True) is None:
            logger._version = None


def _unshare(obj: Any) -> Any:
    """Give this process its own copies of tensors the spawn pickler shared with the parent."""
    from lightning.fabric.strategies.launchers.multiprocessing import _disable_module_memory_sharing

    return _disable_module_memory_sharing(obj)


def _describe(rank: int, process: Any, error_file: str | None) -> str:
    code = process.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    text = f"Rank {rank} (pid {process.pid}) {how}."
    if error_file and os.path.exists(error_file) and os.path.getsize(error_file):
        with open(error_file, "rb") as handle:
            text += "\n" + str(pickle.load(handle))
    return text
