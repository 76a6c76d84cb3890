"""``TensorParallelStrategy`` from the calling process: the registered name and LightningCLI select it, bad sizes,
plans, heads, heads of the loss and precisions fail before any process starts, the spawn launcher leaves the whole
trained model as plain tensors in the calling process, and a rank that dies is named."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

import lightning_dl  # noqa: F401  (registers the strategy names)
from lightning_dl.nn import TransformerLM
from lightning_dl.strategies.tensor_parallel import TensorParallelStrategy
from tests.helpers.trainer import quiet_trainer
from tests.parallel.tensor.task import Task, global_batches, loader, reference


def test_registered_name_and_cli_select_the_strategy() -> None:
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="tensor_parallel", logger=False)
    assert isinstance(trainer.strategy, TensorParallelStrategy)
    cli = LightningCLI(
        Task,
        run=False,
        args=[
            "--model.name=mlp",
            "--trainer.strategy=tensor_parallel",
            "--trainer.devices=2",
            "--trainer.logger=false",
        ],
    )
    assert isinstance(cli.trainer.strategy, TensorParallelStrategy)
    assert cli.trainer.strategy.layout(2).tp == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tensor_parallel_size": 0}, r"`tensor_parallel_size=0` must be a positive integer or 'auto'"),
        ({"checkpoint_format": "zip"}, r"`checkpoint_format='zip'` must be one of \('auto', 'full', 'sharded'\)"),
        ({"start_method": "thread"}, r"`start_method='thread'` must be one of \('spawn', 'fork', 'forkserver'\)"),
        ({"plan": "greedy"}, r"`plan='greedy'` must be 'auto', a dict of module name to style, or a callable"),
        ({"plan": {"net.0": "colwise"}, "sequence_parallel": True}, r"`sequence_parallel=True` applies to plan='auto'"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TensorParallelStrategy(**kwargs)


def test_sizes_must_multiply_to_the_devices() -> None:
    with pytest.raises(
        ValueError, match=r"`data_parallel_size=2` and `tensor_parallel_size=2` multiplied should equal"
    ):
        quiet_trainer(devices=3, strategy=TensorParallelStrategy(tensor_parallel_size=2, data_parallel_size=2))


def test_precision_that_cannot_run_on_cpu() -> None:
    message = r"`precision='16-true'` is not supported by TensorParallelStrategy on CPU; valid: \('32-true', 'bf16"
    with pytest.raises(ValueError, match=message):
        quiet_trainer(devices=2, strategy="tensor_parallel", precision="16-true")


class LM(L.LightningModule):
    def __init__(self, n_heads: int = 4) -> None:
        super().__init__()
        self.net = TransformerLM(16, 8, d_model=24, n_layers=1, n_heads=n_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize(
    ("strategy", "match"),
    [
        ({"plan": {"net.blocks.0.mlp.fc3": "colwise"}}, r"`plan` names 'net.blocks.0.mlp.fc3', which is not a"),
        ({"plan": {"net.blocks.0.norm1": "rowwise"}}, r"'rowwise' splits an nn.Linear or nn.Embedding, not LayerNorm"),
        ({"plan": {"net.blocks.0.attn.qkv": "colwise"}}, r"n_heads=3 of net.blocks.0.attn is not divisible by tp=2"),
    ],
)
def test_bad_plans_fail_before_processes_start(strategy: dict, match: str) -> None:
    trainer = quiet_trainer(devices=2, strategy=TensorParallelStrategy(**strategy), max_steps=1)
    with pytest.raises(ValueError, match=match):
        trainer.fit(LM(n_heads=3), loader("transformer_lm"))


def test_loss_parallel_without_an_output_head() -> None:
    trainer = quiet_trainer(devices=2, strategy=TensorParallelStrategy(loss_parallel=True), max_steps=1)
    with pytest.raises(ValueError, match=r"`loss_parallel=True` needs an output head .* no Linear returns"):
        trainer.fit(Task("lightning_demo"), loader("lightning_demo"))


@pytest.mark.distributed
def test_spawned_fit_leaves_plain_trained_parameters_in_the_calling_process() -> None:
    task = Task("swiglu")
    trainer = quiet_trainer(devices=2, strategy="tensor_parallel", max_epochs=1)
    trainer.fit(task, loader("swiglu"))
    want = reference("swiglu", global_batches("swiglu", 1, 1), clip=None)["params"]
    for key, value in task.state_dict().items():
        assert type(value) is torch.Tensor, key
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=key)


class DiesOnRankOne(Task):
    def training_step(self, data, batch_idx):
        if self.global_rank == 1 and batch_idx == 1:
            os._exit(3)
        return super().training_step(data, batch_idx)


@pytest.mark.distributed
def test_a_dead_rank_is_named() -> None:
    trainer = quiet_trainer(devices=2, strategy="tensor_parallel", max_epochs=1)
    with pytest.raises(RuntimeError, match=r"rank 1 of 2 failed in the parallel run"):
        trainer.fit(DiesOnRankOne("swiglu"), loader("swiglu"))
