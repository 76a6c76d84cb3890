"""Trainer-level checks of ``async_sgd`` and ``hogwild`` on CPU: one worker equals plain SGD, exact resume, digits
with 3 processes, a killed worker, a killed server, and every bad value."""

import time

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.testing import assert_close

import lightning_dl  # noqa: F401  (registers the strategy names)
from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule
from lightning_dl.strategies import AsyncSGDStrategy, HogwildStrategy
from lightning_dl.strategies._launcher import ProcessDiedError
from tests.helpers.async_tools import AwaitDeath, HogwildAudit, KillRank, ServerAudit
from tests.helpers.models import TinyRegressor, regression_dataset, tiny_net
from tests.helpers.trainer import loader, quiet_trainer

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(240)]


def _fit(strategy, model, *, devices=2, ckpt_path=None, callbacks=(), **kwargs):
    trainer = quiet_trainer(
        strategy=strategy, devices=devices, use_distributed_sampler=False, callbacks=list(callbacks), **kwargs
    )
    trainer.fit(model, train_dataloaders=loader(regression_dataset(), batch_size=8), ckpt_path=ckpt_path)
    return trainer


def test_one_worker_equals_plain_sgd_step_for_step():
    reference = TinyRegressor(tiny_net())
    quiet_trainer(max_epochs=2).fit(reference, loader(regression_dataset(), batch_size=8))
    model = TinyRegressor(tiny_net())
    trainer = _fit(AsyncSGDStrategy(timeout=60), model, max_epochs=2, callbacks=[ServerAudit()])
    assert_close(list(model.parameters()), list(reference.parameters()))  # SGD with momentum, 16 updates
    assert trainer.callback_metrics["audit/version"] == 16 == trainer.callback_metrics["audit/applied"]
    assert trainer.callback_metrics["audit/global_step"] == 16


def test_resume_restores_server_parameters_and_optimizer_state(tmp_path):
    reference = TinyRegressor(tiny_net())
    _fit(AsyncSGDStrategy(timeout=60), reference, max_epochs=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit(
        AsyncSGDStrategy(timeout=60),
        TinyRegressor(tiny_net()),
        max_epochs=1,
        callbacks=[checkpoint],
        enable_checkpointing=True,
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 8 and saved["optimizer_states"][0]["state"]  # momentum buffers were saved
    resumed = TinyRegressor(tiny_net(seed=1))  # different start: everything must come from the checkpoint
    _fit(AsyncSGDStrategy(timeout=60), resumed, max_epochs=2, ckpt_path=tmp_path / "last.ckpt")
    assert_close(list(resumed.parameters()), list(reference.parameters()))


def test_hogwild_resume_continues_the_global_step(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    _fit("hogwild", TinyRegressor(tiny_net()), max_steps=8, callbacks=[checkpoint], enable_checkpointing=True)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 8  # one shared counter: exact
    trainer = _fit(
        "hogwild",
        TinyRegressor(tiny_net()),
        max_steps=12,
        ckpt_path=tmp_path / "last.ckpt",
        callbacks=[HogwildAudit()],
    )
    assert trainer.callback_metrics["audit/global_step"] == 12 == trainer.global_step
    assert trainer.callback_metrics["audit/updates"] == 4  # only the remaining budget, across both processes


def _digits(strategy, devices=3, **kwargs):
    L.seed_everything(0)
    model = ClassifierModule(optimizer="sgd", lr=0.1)
    trainer = quiet_trainer(strategy=strategy, devices=devices, max_epochs=3, **kwargs)
    trainer.fit(model, DigitsDataModule(batch_size=32))
    return trainer


@pytest.mark.parametrize(
    "strategy",
    [AsyncSGDStrategy(num_servers=1), AsyncSGDStrategy(num_servers=2), "hogwild"],
    ids=["async_sgd-1-server", "async_sgd-2-servers", "hogwild"],
)
def test_three_processes_learn_digits(strategy):
    metrics = _digits(strategy, log_every_n_steps=5).callback_metrics
    assert metrics["val_loss"] < 0.8 and metrics["val_acc"] > 0.85


def test_a_killed_worker_does_not_stop_the_run(tmp_path):
    mark = str(tmp_path / "killed")
    trainer = _digits(
        AsyncSGDStrategy(timeout=60),
        devices=4,
        max_steps=60,
        callbacks=[KillRank(3, after=5, mark=mark), AwaitDeath(mark), ServerAudit()],
    )
    metrics = trainer.callback_metrics
    assert metrics["audit/dead"] == 1
    assert metrics["audit/version"] == 60 == metrics["audit/applied"]  # every acknowledged push was applied
    assert metrics["audit/global_step"] == 60


def test_a_killed_server_ends_the_run_with_a_clear_error_in_bounded_time():
    start = time.monotonic()
    with pytest.raises(ProcessDiedError, match=r"Rank 0 \(pid \d+\) was killed by SIGKILL"):
        _digits(AsyncSGDStrategy(timeout=20), callbacks=[KillRank(0, after=10)])
    assert time.monotonic() - start < 90


def test_manual_optimization_is_refused_naming_the_rule():
    with pytest.raises(ProcessDiedError, match="automatic optimization"):
        _fit(AsyncSGDStrategy(timeout=20), _Manual(tiny_net()), max_epochs=1)


class _Manual(TinyRegressor):
    def __init__(self, net):
        super().__init__(net)
        self.automatic_optimization = False


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(staleness_policy="adam"), r"`staleness_policy` must be one of \('none', 'inverse', 'dc'\), got 'adam'"),
        (dict(dc_lambda=-0.1), r"`dc_lambda` \(λ\) must be >= 0, got -0.1"),
        (dict(fetch_every=0), "`fetch_every` must be an integer >= 1, got 0"),
        (dict(push_every=0), "`push_every` must be an integer >= 1, got 0"),
        (dict(num_servers=0), "`num_servers` must be an integer >= 1, got 0"),
        (dict(max_staleness=-1), "`max_staleness` must be an integer >= 0, got -1"),
        (dict(timeout=0), "`timeout` must be > 0"),
        (dict(start_method="thread"), "`start_method` must be one of"),
    ],
)
def test_bad_values_are_refused_naming_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AsyncSGDStrategy(**kwargs)


def test_devices_and_num_servers_are_checked_when_the_trainer_is_built():
    with pytest.raises(ValueError, match=r"needs `devices` × `num_nodes` >= 2 .* got devices=1 and num_nodes=1"):
        L.Trainer(strategy="async_sgd", accelerator="cpu", devices=1)
    with pytest.raises(
        ValueError, match=r"`num_servers=3` must be less than the 3 processes \(devices=3 × num_nodes=1"
    ):
        L.Trainer(strategy=AsyncSGDStrategy(num_servers=3), accelerator="cpu", devices=3)
    with pytest.raises(ValueError, match=r"`strategy='async_sgd'` with `num_nodes=2` needs .* torchrun or"):
        L.Trainer(strategy="async_sgd", accelerator="cpu", devices=2, num_nodes=2)
    with pytest.raises(ValueError, match=r"`strategy='hogwild'` needs `devices` >= 2"):
        L.Trainer(strategy="hogwild", accelerator="cpu", devices=1)
    with pytest.raises(ValueError, match="`grace` must be > 0"):
        HogwildStrategy(grace=0)
    with pytest.raises(ValueError, match=r"`strategy='hogwild'` runs on one machine: .* `num_nodes=2` asks for"):
        L.Trainer(strategy="hogwild", accelerator="cpu", devices=2, num_nodes=2)
    with pytest.raises(ValueError, match=r"`address='192.0.2.1'` \(192.0.2.1\) is not an address of this machine"):
        L.Trainer(strategy=AsyncSGDStrategy(address="192.0.2.1"), accelerator="cpu", devices=2)


def _torchrun_env(monkeypatch, *, rank: int, node: int) -> None:
    """The environment torchrun gives rank ``rank`` of 2 nodes × 2 processes (no process is started here)."""
    env = {"TORCHELASTIC_RUN_ID": "test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "WORLD_SIZE": "4"}
    env |= {"RANK": str(rank), "LOCAL_RANK": str(rank % 2), "GROUP_RANK": str(node), "LOCAL_WORLD_SIZE": "2"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_under_torchrun_async_sgd_takes_the_given_ranks_and_hogwild_refuses(monkeypatch):
    _torchrun_env(monkeypatch, rank=2, node=1)
    trainer = L.Trainer(strategy="async_sgd", accelerator="cpu", devices=2, num_nodes=2, logger=False)
    strategy = trainer.strategy
    assert type(strategy.launcher).__name__ == "ExternalLauncher"  # nothing spawned: the ranks are given
    assert (strategy.num_ranks, strategy.num_workers, strategy.global_rank) == (4, 3, 2)
    with pytest.raises(ValueError, match=r"does not match the world size \(4\)"):
        L.Trainer(strategy="async_sgd", accelerator="cpu", devices=2, num_nodes=1)
    with pytest.raises(
        ValueError, match=r"`strategy='hogwild'` runs on one machine: .* TorchElasticEnvironment \(torch"
    ):
        L.Trainer(strategy="hogwild", accelerator="cpu", devices=2, num_nodes=2)
