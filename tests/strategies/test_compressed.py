"""``ddp_int8``, ``ddp_sign`` and ``ddp_powersgd`` on 2 gloo ranks: the int8 and sign runs equal a one-process
transcription (each rank's gradient plus residual through the rule, the mean applied by SGD), every compressor
resumes exactly from a checkpoint (residuals, PowerSGD's Q), torch's own TransformerEncoderLayer trains with every
rank in step, and a model with sparse gradients is refused."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_dl.strategies import CompressedDDPStrategy
from tests.helpers.distributed import run_distributed
from tests.helpers.models import tiny_net
from tests.strategies.test_local_sgd import BATCH, LR, WORLD, _data, fit, per_rank_batches

pytestmark = pytest.mark.distributed

COMPRESSORS = ("int8", "sign", "powersgd")


class SparseEmbedding(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 8, sparse=True)
        self.head = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.embedding(x.abs().long().clamp(max=9)).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class TorchEncoder(L.LightningModule):
    """torch's own ``nn.TransformerEncoderLayer`` (a model this project did not write): 3-D activations, a fused
    in-projection matrix, layer norms."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)

    def training_step(self, batch, batch_idx):
        x, _ = batch
        tokens = x.reshape(len(x), 2, 4).repeat(1, 1, 4)  # 8 features -> (batch, 2 tokens, 16 features)
        return self.layer(tokens).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _make(compressor: str) -> CompressedDDPStrategy:
    return CompressedDDPStrategy(compressor=compressor, rank=2)


def _run(rank: int, world_size: int, tmp: str) -> dict:
    from tests.helpers.trainer import quiet_trainer

    out: dict = {}
    for compressor in COMPRESSORS:
        out[compressor] = fit(_make(compressor))
        path = Path(tmp) / f"{compressor}.ckpt"
        fit(_make(compressor), epochs=1, save=path)
        out[f"{compressor}_resumed"] = fit(_make(compressor), epochs=2, ckpt_path=path)
        out[f"{compressor}_ckpt"] = torch.load(path, weights_only=False)["lightning_dl_comm"]
    for compressor in COMPRESSORS:
        module = TorchEncoder()
        trainer = quiet_trainer(devices=world_size, strategy=_make(compressor), max_steps=3)
        trainer.fit(module, DataLoader(_data(), batch_size=BATCH))
        out[f"{compressor}_encoder"] = [p.detach().clone() for p in module.parameters()]
    trainer = quiet_trainer(devices=world_size, strategy=_make("int8"), max_steps=1)
    try:
        trainer.fit(SparseEmbedding(), DataLoader(_data(), batch_size=BATCH))
        out["sparse"] = "no error"
    except ValueError as err:
        out["sparse"] = str(err)
    return out


@functools.cache
def runs() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="lightning_dl_compressed_") as tmp:
        return run_distributed(_run, WORLD, tmp, timeout=240)


def _int8(c: torch.Tensor) -> torch.Tensor:
    s = c.abs().max() / 127
    return torch.tensor([max(-127, min(127, round(v / s.item()))) for v in c.reshape(-1).tolist()]).view_as(c) * s


def _sign(c: torch.Tensor) -> torch.Tensor:
    s = c.abs().sum() / c.numel()
    return torch.where(c >= 0, s, -s)


def reference(rule, steps: list) -> list[list[torch.Tensor]]:
    """One process: each rank's gradient plus residual goes through ``rule``; SGD (momentum 0.9) applies the mean."""
    net = tiny_net(seed=0)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9)
    residuals = [[torch.zeros_like(p) for p in net.parameters()] for _ in range(WORLD)]
    history = []
    for batches in steps:
        sent = []
        for r, (x, y) in enumerate(batches):
            grads = torch.autograd.grad(F.mse_loss(net(x), y), list(net.parameters()))
            corrected = [g + e for g, e in zip(grads, residuals[r], strict=True)]
            sent.append([rule(c) for c in corrected])
            residuals[r] = [c - s for c, s in zip(corrected, sent[-1], strict=True)]
        for i, p in enumerate(net.parameters()):
            p.grad = sum(s[i] for s in sent) / WORLD
        optimizer.step()
        history.append([p.detach().clone() for p in net.parameters()])
    return history


@pytest.mark.parametrize(("compressor", "rule"), [("int8", _int8), ("sign", _sign)])
def test_quantized_ddp_equals_transcription(compressor, rule) -> None:
    ranks = runs()
    expected = reference(rule, per_rank_batches(2))
    for result in ranks:
        assert len(result[compressor]["steps"]) == len(expected) == 10
        for step, (got, want) in enumerate(zip(result[compressor]["steps"], expected, strict=True)):
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, msg=lambda m, s=step: f"{compressor} step {s + 1}: {m}")
    shapes = [p.shape for p in tiny_net().parameters()]
    per_step = sum(s.numel() if compressor == "int8" else -(-s.numel() // 8) for s in shapes) + 4 * len(shapes)
    assert ranks[0][compressor]["bytes"] == 10 * per_step


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_resume_is_exact_with_residuals(compressor) -> None:
    ranks = runs()
    for result in ranks:
        assert result[f"{compressor}_resumed"]["global_step"] == 10
        for got, want in zip(result[f"{compressor}_resumed"]["final"], result[compressor]["final"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    saved = ranks[0][f"{compressor}_ckpt"]
    assert saved["world_size"] == 2 and saved["ranks"][0]["iter"] == 5
    first, second = (s["residuals"]["net.0.weight"] for s in saved["ranks"])
    assert first.abs().sum() > 0 and not torch.equal(first, second)  # each rank's own residual was saved
    if compressor == "powersgd":
        assert set(saved["ranks"][0]["qs"]) == {"net.0.weight"}  # the 16x8 weight; 1x16 and biases go plain


def test_powersgd_ranks_agree_and_learn() -> None:
    ranks = runs()
    for g0, g1 in zip(ranks[0]["powersgd"]["final"], ranks[1]["powersgd"]["final"], strict=True):
        torch.testing.assert_close(g0, g1, rtol=0, atol=0)
    initial = list(tiny_net(seed=0).parameters())
    assert any(not torch.allclose(p, q) for p, q in zip(ranks[0]["powersgd"]["final"], initial, strict=True))


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_torch_transformer_layer_trains_with_every_rank_in_step(compressor) -> None:
    ranks = runs()
    initial = list(TorchEncoder().parameters())
    final = [r[f"{compressor}_encoder"] for r in ranks]
    for p0, p1 in zip(*final, strict=True):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)  # every rank applied the same averaged gradient
    assert all(torch.isfinite(p).all() for p in final[0])
    assert any(not torch.allclose(p, q) for p, q in zip(final[0], initial, strict=True))


def test_sparse_gradients_are_refused() -> None:
    message = runs()[0]["sparse"]
    assert "strategy='ddp_int8' compresses dense gradients, but module 'embedding' (Embedding) has sparse=True" in (
        message
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compressor": "powersgd", "rank": 0}, r"`rank` \(PowerSGD's approximation rank\) must be an integer >= 1"),
        ({"compressor": "fp4"}, r"`compressor` must be one of \('powersgd', 'int8', 'sign'\), got 'fp4'"),
        ({"start_iter": -1}, r"`start_iter` must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        CompressedDDPStrategy(**kwargs)


def test_registered_names() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    for name in ("ddp_powersgd", "ddp_int8", "ddp_sign"):
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, CompressedDDPStrategy) and strategy.strategy_name == name
    assert StrategyRegistry.get("ddp_powersgd").rank == 4


def test_buckets_of_25_mib_from_the_first_unless_asked_otherwise() -> None:
    assert CompressedDDPStrategy(compressor="sign")._ddp_kwargs["bucket_cap_mb"] == 25
    assert CompressedDDPStrategy(compressor="sign", bucket_cap_mb=None)._ddp_kwargs["bucket_cap_mb"] is None
    assert CompressedDDPStrategy(compressor="int8", bucket_cap_mb=4)._ddp_kwargs["bucket_cap_mb"] == 4
