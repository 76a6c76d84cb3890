"""LanguageModelModule: the loss scores only the answer, it learns the reverse task, it logs its accuracies."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_dl.data import IGNORE_INDEX, SequenceDataModule
from lightning_dl.modules import LanguageModelModule
from tests.helpers.trainer import quiet_trainer


def test_loss_scores_only_the_answer_positions() -> None:
    torch.manual_seed(0)
    module = LanguageModelModule(vocab_size=10, block_size=9, d_model=32, n_layers=1, n_heads=2)
    data = SequenceDataModule(task="copy", seq_len=4, vocab_size=10, num_train=8, batch_size=8)
    data.setup()
    inputs, targets = next(iter(data.train_dataloader()))
    logits = module(inputs)
    expected = F.cross_entropy(logits[:, 4:].flatten(0, 1), targets[:, 4:].flatten())
    assert (targets[:, :4] == IGNORE_INDEX).all()
    torch.testing.assert_close(module._shared_step((inputs, targets), "test"), expected)


def test_learns_to_reverse() -> None:
    L.seed_everything(0)
    data = SequenceDataModule(task="reverse", seq_len=4, vocab_size=8, num_train=1024, num_val=128, batch_size=64)
    module = LanguageModelModule(
        vocab_size=8,
        block_size=data.block_size,
        d_model=64,
        n_layers=2,
        n_heads=4,
        lr=3e-3,
        lr_schedule="cosine",
        schedule_kwargs={"warmup_steps": 10},
    )
    trainer = quiet_trainer(max_epochs=8)
    trainer.fit(module, datamodule=data)
    result = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert result["val_loss"] < 0.5
    assert result["val_token_acc"] > 0.8
    assert 0.0 <= result["val_seq_acc"] <= result["val_token_acc"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"norm": "batch"}, "for TransformerLM"), ({"optimizer": "adamax"}, "Unknown optimizer 'adamax'")],
)
def test_rejects_invalid_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LanguageModelModule(**kwargs)


def test_pipeline_blocks_compose_to_forward_and_loss_skips_ignored() -> None:
    module = LanguageModelModule(vocab_size=16, block_size=9, d_model=32, n_layers=2, n_heads=2).eval()
    idx = torch.randint(0, 16, (3, 9))
    targets = torch.randint(0, 16, (3, 9))
    targets[:, :4] = IGNORE_INDEX
    out = idx
    for block in module.pipeline_blocks():
        out = block(out)
    torch.testing.assert_close(out, module(idx))
    expected = F.cross_entropy(module(idx)[:, 4:].flatten(0, 1), targets[:, 4:].flatten())
    torch.testing.assert_close(module.pipeline_loss(out, targets), expected)
