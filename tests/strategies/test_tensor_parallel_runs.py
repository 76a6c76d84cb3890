"""``TensorParallelStrategy`` at tp2 and dp2 × tp2 (torch's TransformerEncoder, Lightning's demo Transformer,
TransformerLM with loss and sequence parallelism, SwiGLU, MLP) equals one process (losses, gradients, parameters;
clipping by the global norm through ``gradient_clip_val`` and ``GradientClipping``); fit then validate/test/predict
in one script; full and sharded checkpoints load across tp2, dp2 × tp2 and one process with optimizer state; resume
is exact. The processes are started by the harness, as torchrun would, and Lightning joins them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lightning_dl.callbacks import GradientClipping
from lightning_dl.strategies._engine_checkpoint import optimizer_state_by_ids
from lightning_dl.strategies.tensor_parallel import TensorParallelStrategy, plain_state_dict
from tests.helpers.distributed import run_distributed
from tests.helpers.trainer import quiet_trainer
from tests.parallel.tensor.models import build
from tests.parallel.tensor.task import CLIP, GradRecorder, Task, assert_matches, global_batches, loader, reference

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
EPOCHS = 2


class SaveBothFormats(Callback):
    """After the first epoch: a full checkpoint and a sharded one of the same state."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch != 0:
            return
        strategy = trainer.strategy
        trainer.save_checkpoint(self.directory / "full.ckpt")
        strategy.checkpoint_format, strategy._save_distributed_checkpoint = "sharded", True
        trainer.save_checkpoint(self.directory / "sharded")
        strategy.checkpoint_format, strategy._save_distributed_checkpoint = "full", False


def _fit(name: str, strategy: TensorParallelStrategy, world: int, **kwargs) -> tuple[Task, GradRecorder, object]:
    task, recorder = Task(name, seed=kwargs.pop("seed", 0)), GradRecorder()
    callbacks, ckpt_path = [recorder, *kwargs.pop("callbacks", [])], kwargs.pop("ckpt_path", None)
    trainer = quiet_trainer(devices=world, strategy=strategy, max_epochs=EPOCHS, callbacks=callbacks, **kwargs)
    trainer.fit(task, loader(name), ckpt_path=ckpt_path)
    return task, recorder, trainer


def _run(task: Task, recorder: GradRecorder) -> dict:
    return {"losses": task.losses, "grads": recorder.grads, "params": plain_state_dict(task)}


def _optimizer_state(trainer, task) -> dict:
    options = StateDictOptions(full_state_dict=True)
    return optimizer_state_by_ids(get_optimizer_state_dict(task, trainer.optimizers[0], options=options))


class BuiltInConfigureModel(Task):
    """Creates its network in ``configure_model()``: on the meta device, materialised sharded."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.name, self.net, self.losses = "transformer_lm", None, []

    def configure_model(self) -> None:
        if self.net is None:
            self.net = build("transformer_lm")


def _memory(rank: int, world: int) -> dict:
    """Per-rank sizes of a module built in configure_model(): parameters, gradients and optimizer state."""
    task = BuiltInConfigureModel()
    trainer = quiet_trainer(devices=world, strategy=TensorParallelStrategy(loss_parallel=True), max_steps=2)
    trainer.fit(task, loader("transformer_lm"))
    state = trainer.optimizers[0].state
    return {
        name: (p.numel(), local(p).numel(), local(p.grad).numel(), local(state[p]["momentum_buffer"]).numel())
        for name, p in task.named_parameters()
    } | {"losses": task.losses, "meta": any(local(p).is_meta for p in task.parameters())}


class OwnPlan(Task):
    """Shards itself in configure_model(): only the MLP pairs; the strategy must leave its attention whole."""

    def configure_model(self) -> None:
        plan = {
            f"blocks.{i}.mlp.{n}": s
            for i in range(2)
            for n, s in (("fc1", ColwiseParallel()), ("fc2", RowwiseParallel()))
        }
        parallelize_module(self.net, self.device_mesh["tp"], plan)


def _short_runs(world: int) -> dict:
    """A module's own plan is kept; bf16-mixed runs."""
    own = OwnPlan("transformer_lm")
    quiet_trainer(devices=world, strategy=TensorParallelStrategy(), max_steps=1).fit(own, loader("transformer_lm"))
    bf16 = Task("transformer_lm")
    trainer = quiet_trainer(devices=world, strategy=TensorParallelStrategy(), max_steps=2, precision="bf16-mixed")
    trainer.fit(bf16, loader("transformer_lm"))
    return {
        "own_qkv": isinstance(own.net.blocks[0].attn.qkv.weight, DTensor),
        "own_fc1": isinstance(own.net.blocks[0].mlp.fc1.weight, DTensor),
        "bf16_losses": bf16.losses,
    }


def _tp2(rank: int, world: int, directory: str) -> dict:
    strategy = TensorParallelStrategy(loss_parallel=True, checkpoint_format="full")
    task, recorder, trainer = _fit(
        "transformer_lm", strategy, world, gradient_clip_val=CLIP, callbacks=[SaveBothFormats(directory)]
    )
    out = {"lm": _run(task, recorder), "plan": strategy.applied_plan.sharded_names}
    # the same script goes on: validate, test and predict apply the plan again (a no-op) and use the trained shards
    out["val"] = trainer.validate(task, loader("transformer_lm"), verbose=False)[0]["val_loss"]
    out["test"] = trainer.test(task, loader("transformer_lm"), verbose=False)[0]["test_loss"]
    out["predict"] = torch.cat(trainer.predict(task, loader("transformer_lm")))
    out["plan_again"] = strategy.applied_plan.sharded_names
    out["memory"] = _memory(rank, world)
    out |= _short_runs(world)
    # resume from either checkpoint after epoch 1 with a model that starts elsewhere
    for fmt in ("full.ckpt", "sharded"):
        strategy = TensorParallelStrategy(loss_parallel=True, checkpoint_format="full")
        resumed, _, _ = _fit(
            "transformer_lm", strategy, world, gradient_clip_val=CLIP, seed=1, ckpt_path=f"{directory}/{fmt}"
        )
        out[f"resumed_{fmt}"] = plain_state_dict(resumed)
    return out


def _load_only(name: str, world: int, ckpt: str, **strategy_kwargs) -> dict:
    strategy = TensorParallelStrategy(checkpoint_format="full", **strategy_kwargs)
    task = Task(name, seed=1)
    trainer = quiet_trainer(devices=world, strategy=strategy, max_epochs=1)
    trainer.fit(task, loader(name), ckpt_path=ckpt)  # epoch 1 is complete in the checkpoint: nothing to train
    return {"params": plain_state_dict(task), "optimizer": _optimizer_state(trainer, task)}


def _dp2_tp2(rank: int, world: int, directory: str) -> dict:
    out = {}
    strategy = TensorParallelStrategy(tensor_parallel_size=2, data_parallel_size=2)
    task, recorder, _ = _fit("torch_encoder", strategy, world, callbacks=[GradientClipping(max_norm=CLIP)])
    out["encoder"] = _run(task, recorder)
    strategy = TensorParallelStrategy(
        tensor_parallel_size=2, data_parallel_size=2, loss_parallel=True, sequence_parallel=True
    )
    task, recorder, _ = _fit("transformer_lm", strategy, world, gradient_clip_val=CLIP)
    out["lm"] = _run(task, recorder)
    for name in ("lightning_demo", "swiglu", "mlp"):
        strategy = TensorParallelStrategy(tensor_parallel_size=2, data_parallel_size=2)
        task, recorder, _ = _fit(name, strategy, world, gradient_clip_val=CLIP)
        out[name] = _run(task, recorder)
    for fmt in ("full.ckpt", "sharded"):
        out[fmt] = _load_only("transformer_lm", world, f"{directory}/{fmt}", data_parallel_size=2, loss_parallel=True)
    return out


def _one_process(rank: int, world: int, directory: str) -> dict:
    return {fmt: _load_only("transformer_lm", 1, f"{directory}/{fmt}") for fmt in ("full.ckpt", "sharded")}


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _assert_loaded(loaded: dict, saved: dict) -> None:
    for key, value in saved["state_dict"].items():
        torch.testing.assert_close(loaded["params"][key], value, rtol=0, atol=0, msg=key)
    want = saved["optimizer_states"][0]
    assert loaded["optimizer"]["state"].keys() == want["state"].keys()
    for index, state in want["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(loaded["optimizer"]["state"][index][key], value, rtol=0, atol=0)


def test_tp2_and_dp2_tp2_equal_one_process_and_checkpoints_cross_layouts(tmp_path: Path) -> None:
    tp2 = run_distributed(_tp2, 2, str(tmp_path), timeout=300)[0]
    lm_ref_tp2 = reference("transformer_lm", global_batches("transformer_lm", 1, EPOCHS))
    assert_matches(tp2["lm"], lm_ref_tp2)
    assert {"net.blocks.0.attn.qkv", "net.head.1", "net.embed.token"} <= set(tp2["plan"])
    assert tp2["plan_again"] == tp2["plan"]
    model = Task("transformer_lm")
    model.load_state_dict(lm_ref_tp2["params"])
    with torch.no_grad():
        x, y = loader("transformer_lm").dataset.tensors
        logits = model(x)
        torch.testing.assert_close(tp2["predict"], logits, rtol=1e-5, atol=1e-5)
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert tp2["val"] == pytest.approx(want, rel=1e-5) and tp2["test"] == pytest.approx(want, rel=1e-5)
    for fmt in ("full.ckpt", "sharded"):  # resume is exact
        for key, value in lm_ref_tp2["params"].items():
            torch.testing.assert_close(tp2[f"resumed_{fmt}"][key], value, rtol=1e-5, atol=1e-6, msg=key)

    # the full checkpoint is plain: it loads strict into the plain module, its optimizer state into plain SGD
    saved = torch.load(tmp_path / "full.ckpt", weights_only=False)
    plain = Task("transformer_lm", seed=1)
    plain.load_state_dict(saved["state_dict"], strict=True)
    torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9).load_state_dict(saved["optimizer_states"][0])
    assert all(type(v) is torch.Tensor for v in saved["state_dict"].values())

    assert (tp2["own_qkv"], tp2["own_fc1"]) == (False, True)  # the module's own plan, not the automatic one
    torch.testing.assert_close(tp2["bf16_losses"][0], tp2["lm"]["losses"][0], rtol=2e-2, atol=0)

    # a module built in configure_model() is created on meta and materialised sharded: 1/tp per rank
    memory = tp2["memory"]
    assert not memory.pop("meta") and len(memory.pop("losses")) == 2
    for name in (
        "net.blocks.0.attn.qkv.weight",
        "net.blocks.0.mlp.fc2.weight",
        "net.head.1.weight",
        "net.embed.token.weight",
    ):
        full_size, *per_rank = memory[name]
        assert per_rank == [full_size // 2] * 3, name  # parameter, gradient, momentum
    assert memory["net.blocks.0.norm1.weight"][1] == memory["net.blocks.0.norm1.weight"][0]  # replicated

    dp2 = run_distributed(_dp2_tp2, 4, str(tmp_path), timeout=300)
    assert_matches(
        {**dp2[0]["encoder"], "losses": dp2[0]["encoder"]["losses"] + dp2[2]["encoder"]["losses"]},
        reference("torch_encoder", global_batches("torch_encoder", 2, EPOCHS)),
        dp=2,
    )
    assert_matches(
        {**dp2[0]["lm"], "losses": dp2[0]["lm"]["losses"] + dp2[2]["lm"]["losses"]},
        reference("transformer_lm", global_batches("transformer_lm", 2, EPOCHS)),
        dp=2,
    )
    for name in ("lightning_demo", "swiglu", "mlp"):
        assert_matches(
            {**dp2[0][name], "losses": dp2[0][name]["losses"] + dp2[2][name]["losses"]},
            reference(name, global_batches(name, 2, EPOCHS)),
            dp=2,
        )
    one = run_distributed(_one_process, 1, str(tmp_path), timeout=120)[0]
    for fmt in ("full.ckpt", "sharded"):
        _assert_loaded(dp2[0][fmt], saved)
        _assert_loaded(one[fmt], saved)
