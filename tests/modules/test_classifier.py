"""ClassifierModule: it learns, logs what it promises, and puts no weight decay on biases."""

import lightning as L
import pytest
import torch

from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule


def _trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**(defaults | kwargs))


def test_fit_logs_loss_and_accuracy_and_learns() -> None:
    L.seed_everything(0)
    module = ClassifierModule(hidden_sizes=[64], dropout=0.0, lr=3e-3)
    data = DigitsDataModule(batch_size=64, seed=0)
    trainer = _trainer(max_epochs=3)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    for key in ("train_loss_step", "train_loss_epoch", "train_acc", "val_loss", "val_acc"):
        assert key in metrics, key
    assert metrics["val_loss"] < before["val_loss"] / 2
    assert metrics["val_acc"] > 0.85
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    assert set(test) == {"test_loss", "test_acc"}
    assert 0.85 < test["test_acc"] <= 1.0


def test_logged_accuracy_matches_a_direct_count() -> None:
    module = ClassifierModule(hidden_sizes=[16])
    data = DigitsDataModule(batch_size=50, seed=1)
    result = _trainer().test(module, datamodule=data, verbose=False)[0]
    x, y = data._splits["test"].tensors
    module.eval()
    with torch.no_grad():
        expected = (module(x).argmax(dim=1) == y).float().mean().item()
    assert result["test_acc"] == pytest.approx(expected, abs=1e-6)


def test_no_weight_decay_on_biases() -> None:
    module = ClassifierModule(hidden_sizes=[16, 8], weight_decay=0.1)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 1}, "`num_classes` must be >= 2, got 1"),
        ({"lr": 0.0}, "`lr` must be > 0, got 0.0"),
        ({"weight_decay": -1e-4}, "`weight_decay` must be >= 0, got -0.0001"),
        ({"optimizer": "lbfgs"}, r"Unknown optimizer 'lbfgs'; valid names: sgd, momentum"),
        ({"optimizer": "simplified_adam", "weight_decay": 0.1}, r"'simplified_adam' has no weight decay"),
        ({"model": "resnet"}, r"`model` must be one of \('mlp', 'convnet'\), got 'resnet'"),
        ({"norm": "instance"}, r"`norm` must be one of"),
        ({"init": "lecun"}, r"`init` must be one of"),
        ({"lr_schedule": "cosine", "schedule_kwargs": {"min_lr_ratio": 3}}, r"`min_lr_ratio` must be in \[0, 1\]"),
    ],
)
def test_rejects_invalid_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ClassifierModule(**kwargs)


@pytest.mark.parametrize("name", ["momentum", "nesterov", "lamb", "lars", "simplified_adam", "adaptive_sgd"])
def test_every_optimizer_trains_a_step(name) -> None:
    weight_decay = 1e-4 if name in ("momentum", "nesterov", "lamb", "lars") else 0.0
    module = ClassifierModule(
        hidden_sizes=[16], optimizer=name, lr=0.01 if name != "adaptive_sgd" else 1.0, weight_decay=weight_decay
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer = _trainer(max_steps=12, log_every_n_steps=1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, seed=0))
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    if name == "adaptive_sgd":
        assert "adaptive_sgd/b_star" in trainer.callback_metrics and "adaptive_sgd/eta" in trainer.callback_metrics


def test_convnet_with_batch_norm_and_a_cosine_schedule() -> None:
    module = ClassifierModule(
        model="convnet",
        norm="batch",
        init="he_normal",
        optimizer="momentum",
        lr=0.05,
        weight_decay=0.0,
        lr_schedule="cosine",
        schedule_kwargs={"warmup_steps": 2},
    )
    trainer = _trainer(max_steps=6)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16, seed=0))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_optimizer_kwargs_reach_the_optimizer() -> None:
    module = ClassifierModule(optimizer="momentum", lr=0.05, weight_decay=0.01, optimizer_kwargs={"momentum": 0.8})
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.8 and optimizer.param_groups[0]["lr"] == 0.05
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


@pytest.mark.parametrize(("model", "norm"), [("mlp", "batch"), ("convnet", "batch"), ("mlp", "weight")])
def test_pipeline_blocks_compose_to_forward(model: str, norm: str) -> None:
    module = ClassifierModule(model=model, norm=norm, hidden_sizes=[16], dropout=0.0).eval()
    x, y = torch.randn(4, 64), torch.tensor([0, 1, 2, 3])
    out = x
    for block in module.pipeline_blocks():
        out = block(out)
    torch.testing.assert_close(out, module(x))
    torch.testing.assert_close(module.pipeline_loss(out, y), torch.nn.functional.cross_entropy(module(x), y))
    owned = {id(p) for block in module.pipeline_blocks() for p in block.parameters()}
    assert owned == {id(p) for p in module.parameters()}  # every parameter sits in one block
