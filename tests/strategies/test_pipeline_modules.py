"""The suite's modules (ClassifierModule, LanguageModelModule) and a module no one here wrote the blocks of (torch's
nn.TransformerEncoderLayer) under PipelineStrategy on 2 processes, against one process on the same micro-batches.

Both sides run in float64 (the default dtype inside the test and its processes). The attention layers' key biases
have a gradient that is exactly zero (softmax ignores a shift shared by every key): what backward computes for them
is rounding residue, ~5e-10 in float32 (~1e-18 in float64) beside ~2e-2 for the query and value biases. Adam divides
by ``sqrt(v) + eps`` with ``eps = 1e-8``, so it turns that residue into steps of ~1e-4, and a one-ulp difference
anywhere upstream changes them by as much: the clipping norm, summed per stage and then over the ranks instead of in
one process's order, differs in its last float32 bit, and after 3 steps the key biases of the float32 language model
differed by 2.9e-5 while every other parameter differed by at most 6e-8 (gradients bit-equal while the parameters
were). In float64 the residue sits ten orders below ``eps``, and the two sides agree to 4e-9 in every case (what is
left comes from the pipeline's clipping norm, which is float32)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dl.data import IGNORE_INDEX
from lightning_dl.modules import ClassifierModule, LanguageModelModule
from lightning_dl.parallel.pipeline import materialize
from lightning_dl.strategies.pipeline import PipelineStrategy
from tests.helpers.distributed import run_distributed
from tests.helpers.trainer import quiet_trainer

BATCH, M, STEPS = 8, 4, 3
TOL = {"rtol": 1e-5, "atol": 1e-6}


class EncoderRegressor(L.LightningModule):
    """A Linear embedding, two torch ``nn.TransformerEncoderLayer`` blocks and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 16)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)

    def pipeline_blocks(self) -> list[nn.Module]:
        return [self.embed, *self.layers, self.head]

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def training_step(self, batch, batch_idx):
        return self.pipeline_loss(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class BuiltInConfigureModel(L.LightningModule):
    """Builds its blocks in ``configure_model()``: under the pipeline on the meta device, each rank materialising
    only its own blocks (block i from seed i)."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Sequential | None = None
        self.built_on_meta = False

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(*(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3)), nn.Linear(6, 1))
            self.built_on_meta = all(p.is_meta for p in self.net.parameters())

    def pipeline_blocks(self) -> list[nn.Module]:
        assert self.net is not None
        return list(self.net)

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def training_step(self, batch, batch_idx):
        assert self.net is not None
        return self.pipeline_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _case(name: str) -> tuple[L.LightningModule, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    if name == "classifier":
        torch.manual_seed(0)
        module = ClassifierModule(hidden_sizes=[32, 32], dropout=0.0, norm="layer", lr_schedule="cosine")
        return module, TensorDataset(torch.randn(32, 64, generator=generator), torch.randint(0, 10, (32,)))
    if name == "language_model":
        torch.manual_seed(0)
        module = LanguageModelModule(vocab_size=16, block_size=9, d_model=16, n_layers=2, n_heads=2)
        tokens = torch.randint(0, 16, (32, 9), generator=generator)
        targets = torch.randint(0, 16, (32, 9), generator=generator)
        targets[:, :4] = IGNORE_INDEX  # every sequence scores 5 positions
        return module, TensorDataset(tokens, targets)
    if name == "configure_model":
        data = TensorDataset(torch.randn(32, 6, generator=generator), torch.randn(32, 1, generator=generator))
        return BuiltInConfigureModel(), data
    data = TensorDataset(torch.randn(32, 5, 4, generator=generator), torch.randn(32, 5, 1, generator=generator))
    return EncoderRegressor(), data


CASES = ("classifier", "language_model", "torch_encoder", "configure_model")


def _trainer(*, pipeline: bool) -> L.Trainer:
    """Either side of every comparison: ``STEPS`` optimizer steps, gradients clipped at 0.5; on 2 processes under a
    GPipe schedule of ``M`` micro-batches (batches of ``BATCH``), or in one process accumulating ``M`` batches (of
    ``BATCH // M``)."""
    if pipeline:
        strategy = PipelineStrategy(schedule="gpipe", n_microbatches=M)
        return quiet_trainer(
            devices=2, strategy=strategy, use_distributed_sampler=False, max_steps=STEPS, gradient_clip_val=0.5
        )
    return quiet_trainer(max_steps=STEPS, accumulate_grad_batches=M, gradient_clip_val=0.5)


def _pipelined(rank: int, world_size: int) -> dict:
    torch.set_default_dtype(torch.float64)  # a process of its own: see the module docstring
    out = {}
    for name in CASES:
        module, data = _case(name)
        trainer = _trainer(pipeline=True)
        trainer.fit(module, DataLoader(data, batch_size=BATCH))
        out[name] = {k: v.clone() for k, v in module.state_dict().items()}
        out[f"{name}_built_on_meta"] = getattr(module, "built_on_meta", None)
        if name == "classifier":  # val_loss and val_acc (pipeline_metrics) from the forward-only schedule
            out["classifier_val"] = trainer.validate(module, DataLoader(data, batch_size=BATCH), verbose=False)[0]
    return out


@pytest.fixture
def float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.distributed
def test_modules_and_a_foreign_model_match_one_process(float64: None) -> None:
    results = run_distributed(_pipelined, 2, timeout=300)
    for name in CASES:
        module, data = _case(name)
        if name == "configure_model":  # one process, the same blocks: built on meta, then block i from seed i
            with torch.device("meta"):
                module.configure_model()
            materialize(module.pipeline_blocks(), range(4), device=torch.device("cpu"), seed=0)
            assert all(r["configure_model_built_on_meta"] for r in results)  # never whole on any rank
        _trainer(pipeline=False).fit(module, DataLoader(data, batch_size=BATCH // M))
        expected = module.state_dict()
        if name == "classifier":  # the module's own torchmetrics accuracy in one process
            metrics = quiet_trainer().validate(module, DataLoader(data, batch_size=BATCH), verbose=False)[0]
            for result in results:
                for key in ("val_loss", "val_acc"):
                    torch.testing.assert_close(result["classifier_val"][key], metrics[key], **TOL, msg=key)
        assert set(results[0][name]) | set(results[1][name]) == set(expected), name
        for result in results:
            for key, value in result[name].items():
                torch.testing.assert_close(value, expected[key], **TOL, msg=f"{name} {key}")


@pytest.mark.distributed
def test_spawned_fit_builds_configure_model_blocks_in_the_calling_process(capfd: pytest.CaptureFixture) -> None:
    """Lightning's own launcher (spawn) and a module that builds its blocks in ``configure_model()``: the calling
    process builds them too (meta, then storage) and holds every trained block; the processes leave together."""
    module, data = _case("configure_model")
    trainer = _trainer(pipeline=True)
    trainer.fit(module, DataLoader(data, batch_size=BATCH))
    reference, _ = _case("configure_model")
    with torch.device("meta"):
        reference.configure_model()
    materialize(reference.pipeline_blocks(), range(4), device=torch.device("cpu"), seed=0)
    _trainer(pipeline=False).fit(reference, DataLoader(data, batch_size=BATCH // M))
    assert module.net is not None and not any(p.is_meta for p in module.parameters())
    state = module.state_dict()
    assert set(state) == set(reference.state_dict())
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(state[key], value, **TOL, msg=key)
    assert "terminate called" not in capfd.readouterr().err
