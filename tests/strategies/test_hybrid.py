"""HybridStrategy against one process: tp2 × pp2 (the layout chosen for 4 devices), dp2 × pp2 and dp2 × pp2 with
FSDP2 of each stage over dp (``dp_shard=True``) on 4 processes, dp2 × tp2 × pp2 on 8 (slow). Each rank runs
``Trainer(devices=N, strategy=HybridStrategy(...))`` as torchrun would start it; Lightning's DistributedSampler spans
the dp ranks only. The reference is one process on the same global batches in micro-batches of ``B / m``
(accumulating ``dp · m`` of them per optimizer step), with the same gradient clipping (global norm) and LR
schedule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Subset, TensorDataset

import lightning_dl  # noqa: F401  (registers the names)
from lightning_dl.callbacks import LRSchedule
from lightning_dl.modules.language_model import LanguageModelModule
from lightning_dl.parallel.checkpoint import to_full
from lightning_dl.parallel.layout import ParallelLayout
from lightning_dl.strategies.hybrid import HybridStrategy, choose_layout
from tests.helpers.distributed import run_distributed
from tests.helpers.trainer import quiet_trainer
from tests.strategies.test_pipeline import PipeNet

BATCH, M, STEPS = 8, 4, 3
TOL = {"rtol": 1e-5, "atol": 1e-6}
CLIP = 0.5


def _module() -> LanguageModelModule:
    """SGD with momentum, not Adam: attention is invariant to the key bias, whose gradient is rounding noise that
    Adam's normalisation turns into updates of size ``lr`` (they differ between any two summation orders)."""
    torch.manual_seed(0)
    return LanguageModelModule(
        vocab_size=16, block_size=8, d_model=16, n_layers=4, n_heads=2, optimizer="momentum", lr=0.1
    )


def _data(dp: int) -> TensorDataset:
    """One epoch is ``STEPS`` optimizer steps."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 16, (STEPS * BATCH * dp, 9), generator=g)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class Record(Callback):
    """Each batch's loss and, as the optimizer is about to step (after clipping), the whole gradients by name."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: _full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None})


class Restored(Callback):
    """The whole model and optimizer state as the first batch after a restore starts (gathered: a collective)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not hasattr(self, "state"):
            self.state = {k: _full(v) for k, v in pl_module.state_dict().items()}
            self.optimizer = trainer.strategy.optimizer_state(trainer.optimizers[0])


def _trainer(record: Record, max_steps: int = STEPS, **kwargs):
    return quiet_trainer(
        max_steps=max_steps,
        gradient_clip_val=CLIP,
        callbacks=[LRSchedule("cosine", warmup_steps=1, total_steps=STEPS + 2, log=False), record],
        **kwargs,
    )


def _reference(dp: int) -> dict:
    """One process: the global batch of step k is batch k of every dp replica's DistributedSampler shard (Lightning
    shuffles training data with seed 0)."""
    order = torch.randperm(STEPS * BATCH * dp, generator=torch.Generator().manual_seed(0)).tolist()
    shards = [order[r::dp] for r in range(dp)]
    indices = [i for k in range(STEPS) for r in range(dp) for i in shards[r][k * BATCH : (k + 1) * BATCH]]
    if dp == 1:  # no DistributedSampler: the loader's own order
        indices = list(range(STEPS * BATCH))
    module, record = _module(), Record()
    trainer = _trainer(record, accumulate_grad_batches=dp * M)
    loader = DataLoader(Subset(_data(dp), indices), batch_size=BATCH // M)
    trainer.fit(module, loader)
    k = dp * M
    losses = torch.stack(record.losses).view(-1, k).mean(dim=1) * k
    return {"losses": losses, "grads": record.grads, "state": module.state_dict(), "optimizer": trainer.optimizers}


def _hybrid(rank: int, world_size: int, tmp: str, layout: str | None, dp_shard: bool = False) -> dict:
    module, record = _module(), Record()
    strategy = HybridStrategy(layout=layout, n_microbatches=M, dp_shard=dp_shard)
    dp = ParallelLayout.parse(layout).dp if layout else 1
    trainer = _trainer(record, devices=world_size, strategy=strategy, use_distributed_sampler=dp > 1)
    loader = DataLoader(_data(dp), batch_size=BATCH, drop_last=True)
    trainer.fit(module, loader)
    trainer.save_checkpoint(str(Path(tmp) / "hybrid.ckpt"))  # collective: the whole model on rank 0
    resumed_state = None
    if layout is None:  # the checkpoint loads back into the shards and stages of the same layout
        resumed_state = _restore(world_size, HybridStrategy(n_microbatches=M), str(Path(tmp) / "hybrid.ckpt"), loader)
    if dp_shard:  # a sharded folder of the same state, read back under another layout (no FSDP2: tp2 x pp2 on 4)
        strategy.checkpoint_format = "sharded"
        trainer.save_checkpoint(str(Path(tmp) / "sharded"))
        other = HybridStrategy(layout="tp2,pp2" if world_size == 4 else "dp2,tp2,pp2", n_microbatches=M)
        resumed_state = _restore(world_size, other, str(Path(tmp) / "sharded"), loader)
    return {
        "resumed": resumed_state,
        "layout": str(strategy.layout),
        "losses": torch.stack(record.losses),
        "grads": record.grads,
        "state": {k: _full(v) for k, v in module.state_dict().items()},
        "dtensors": sum(isinstance(p, DTensor) for p in module.parameters()),
    }


def _restore(world_size: int, strategy: HybridStrategy, path: str, loader: DataLoader) -> dict:
    """The whole model and optimizer state as the first batch after restoring ``path`` under ``strategy``."""
    peek = Restored()
    again = _trainer(peek, STEPS + 1, devices=world_size, strategy=strategy, use_distributed_sampler=False)
    again.fit(_module(), loader, ckpt_path=path)
    return {"state": peek.state, "optimizer": peek.optimizer}


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"{what}: {m}")


def _check(results: list[dict], expected: dict, layout: str, tp: int, dtensors: bool | None = None) -> None:
    keys = set().union(*(r["state"] for r in results))
    assert keys == set(expected["state"])
    for rank, got in enumerate(results):
        assert got["layout"] == layout
        assert (got["dtensors"] > 0) == (tp > 1 if dtensors is None else dtensors), rank
        _close(got["losses"].float(), expected["losses"], f"rank {rank} losses")
        assert len(got["grads"]) == STEPS
        for step, (grads, want) in enumerate(zip(got["grads"], expected["grads"], strict=True)):
            assert grads, rank
            for key, grad in grads.items():
                _close(grad, want[key], f"rank {rank} step {step} {key}")
        for key, value in got["state"].items():
            _close(value, expected["state"][key], f"rank {rank} {key}")


def _check_checkpoint(path: Path, expected: dict) -> None:
    """The checkpoint written under the hybrid layout loads strict=True into one process, optimizer included."""
    checkpoint = torch.load(path, weights_only=False)
    one = _module()
    one.load_state_dict(checkpoint["state_dict"], strict=True)
    for key, value in one.state_dict().items():
        _close(value, expected["state"][key], key)
    optimizer = one.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    optimizer = optimizer[0][0] if isinstance(optimizer, tuple) else optimizer
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    want = expected["optimizer"][0].state_dict()["state"]
    got = optimizer.state_dict()["state"]
    assert set(got) == set(want)
    for index, state in want.items():
        for name, value in state.items():
            _close(got[index][name], value, f"{index} {name}")


@pytest.mark.distributed
def test_tp2_pp2_chosen_for_four_devices_matches_one_process(tmp_path: Path) -> None:
    results = run_distributed(_hybrid, 4, str(tmp_path), None, timeout=300)
    expected = _reference(dp=1)
    _check(results, expected, "dp1,tp2,pp2", tp=2)
    _check_checkpoint(tmp_path / "hybrid.ckpt", expected)
    _check_restored(results, tmp_path / "hybrid.ckpt")


def _check_restored(results: list[dict], path: Path) -> None:
    """Restored: every shard and stage holds the full checkpoint's entries, and the optimizer's momentum."""
    checkpoint = torch.load(path, weights_only=False)
    for rank, got in enumerate(results):
        for key, value in got["resumed"]["state"].items():
            assert torch.equal(value, checkpoint["state_dict"][key]), f"rank {rank} {key}"
    saved, restored = checkpoint["optimizer_states"][0]["state"], results[0]["resumed"]["optimizer"]["state"]
    assert set(restored) == set(saved)
    for index, state in saved.items():
        assert torch.equal(restored[index]["momentum_buffer"], state["momentum_buffer"]), index


@pytest.mark.distributed
def test_dp2_pp2_matches_one_process(tmp_path: Path) -> None:
    results = run_distributed(_hybrid, 4, str(tmp_path), "dp2,pp2", timeout=300)
    _check(results, _reference(dp=2), "dp2,tp1,pp2", tp=1)


@pytest.mark.distributed
def test_dp2_pp2_with_fsdp_matches_one_process_and_its_sharded_checkpoint_loads_under_tp2_pp2(tmp_path: Path) -> None:
    """``dp_shard=True``: FSDP2 of each stage over dp after the split. The full and the sharded checkpoint of the
    same state agree, and the sharded one restores under another layout (tp2 x pp2) exactly."""
    results = run_distributed(_hybrid, 4, str(tmp_path), "dp2,pp2", True, timeout=400)
    expected = _reference(dp=2)
    _check(results, expected, "dp2,tp1,pp2", tp=1, dtensors=True)
    _check_checkpoint(tmp_path / "hybrid.ckpt", expected)
    _check_restored(results, tmp_path / "hybrid.ckpt")
    full, sharded = torch.load(tmp_path / "hybrid.ckpt", weights_only=False), to_full(tmp_path / "sharded")
    for key, value in full["state_dict"].items():
        assert torch.equal(sharded["state_dict"][key], value), key


@pytest.mark.slow
@pytest.mark.distributed
def test_dp2_tp2_pp2_matches_one_process(tmp_path: Path) -> None:
    results = run_distributed(_hybrid, 8, str(tmp_path), "dp2,tp2,pp2", timeout=600)
    _check(results, _reference(dp=2), "dp2,tp2,pp2", tp=2)


class OddNet(PipeNet):
    """Four Linear blocks of odd widths: no pair divides by tp=2."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 7), nn.Linear(7, 5), nn.Linear(5, 3), nn.Linear(3, 1))


def test_choose_layout_and_registered_name() -> None:
    assert StrategyRegistry["hybrid"]["strategy"] is HybridStrategy
    assert choose_layout(4, _module().pipeline_blocks())[0] == ParallelLayout(tp=2, pp=2)
    layout, reason = choose_layout(4, OddNet().pipeline_blocks())
    assert layout == ParallelLayout(dp=2, pp=2) and "tp1: the plan finds no Linear pairs" in reason
    assert choose_layout(2, _module().pipeline_blocks()[:3])[0] == ParallelLayout(tp=2)  # 3 blocks: no pp
    assert choose_layout(4, [])[0] == ParallelLayout(dp=4)  # a module without pipeline_blocks(): data parallel


@pytest.mark.parametrize(
    ("module", "layout", "devices", "match"),
    [
        (PipeNet(), "dp2,pp2", 3, r"The layout dp2,tp1,pp2 needs dp·tp·pp = 2·1·2 = 4 processes, but `devices=3`"),
        (OddNet(), "tp2,pp2", 4, r"`layout='dp1,tp2,pp2'` asks for tp2, but the tensor-parallel plan finds no"),
        (PipeNet(), "pp8", 8, r"`layout='dp1,tp1,pp8'` asks for pp8 stages, but `pipeline_blocks\(\)` returns 4"),
    ],
)
def test_errors_before_any_process_starts(module, layout: str, devices: int, match: str) -> None:
    trainer = quiet_trainer(devices=devices, strategy=HybridStrategy(layout=layout), max_steps=1)
    with pytest.raises(ValueError, match=match):
        trainer.fit(module, DataLoader(TensorDataset(torch.zeros(8, 8), torch.zeros(8, 1)), batch_size=8))


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"`layout='dp2,xx3'`: cannot read 'xx3'; write each dimension as dp<N>"):
        HybridStrategy(layout="dp2,xx3")
    with pytest.raises(ValueError, match=r"`checkpoint_format='zip'` must be one of \('auto', 'full', 'sharded'\)"):
        HybridStrategy(layout="dp2,pp2", checkpoint_format="zip")


@pytest.mark.slow
@pytest.mark.distributed
def test_spawned_fit_hands_the_whole_trained_model_to_the_calling_process() -> None:
    module = _module()
    strategy = HybridStrategy(layout="tp2,pp2", n_microbatches=M)
    trainer = _trainer(Record(), devices=4, strategy=strategy, use_distributed_sampler=False)
    trainer.fit(module, DataLoader(_data(1), batch_size=BATCH, drop_last=True))
    expected = _reference(dp=1)["state"]
    assert not any(isinstance(v, DTensor) for v in module.state_dict().values())
    for key, value in module.state_dict().items():
        _close(value, expected[key], key)
