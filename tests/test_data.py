"""DataModules: deterministic splits, training-only statistics, task correctness, and clear errors."""

import pytest
import torch
from sklearn.datasets import load_digits

from lightning_dl.data import (
    BOS,
    IGNORE_INDEX,
    SEP,
    DigitsDataModule,
    SequenceDataModule,
    make_sequence_task,
    split_indices,
)


def _tensors(dm, split):
    return dm._splits[split].tensors


def test_split_indices_partition_and_determinism() -> None:
    train, val, test = split_indices(100, 0.2, 0.1, seed=3)
    assert (len(train), len(val), len(test)) == (70, 20, 10)
    assert sorted(train + val + test) == list(range(100))
    assert split_indices(100, 0.2, 0.1, seed=3) == (train, val, test)
    assert split_indices(100, 0.2, 0.1, seed=4) != (train, val, test)


def test_digits_sizes_shapes_and_all_samples_used() -> None:
    dm = DigitsDataModule(batch_size=32, val_fraction=0.15, test_fraction=0.15, seed=0)
    dm.setup("fit")
    sizes = {split: len(dm._splits[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 1797 - 2 * 269, "val": 269, "test": 269}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 64) and x.dtype == torch.float32 and y.dtype == torch.long
    labels = torch.cat([_tensors(dm, s)[1] for s in ("train", "val", "test")])
    assert torch.equal(labels.bincount(), torch.as_tensor(load_digits().target).bincount())


def test_digits_split_is_deterministic_by_seed() -> None:
    a, b, c = DigitsDataModule(seed=1), DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(_tensors(a, "test")[0], _tensors(b, "test")[0])
    assert not torch.equal(_tensors(a, "test")[1], _tensors(c, "test")[1])


def test_digits_standardised_with_training_statistics_only() -> None:
    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.1, seed=5)
    dm.setup()
    raw = torch.as_tensor(load_digits().data, dtype=torch.float32)
    train, val, test = split_indices(len(raw), 0.2, 0.1, seed=5)
    mean, std = raw[train].mean(dim=0), raw[train].std(dim=0)
    constant = std == 0
    assert constant.any()  # some border pixels never vary: they are centred, not divided by zero
    std[constant] = 1.0
    for split, idx in (("train", train), ("val", val), ("test", test)):
        torch.testing.assert_close(_tensors(dm, split)[0], (raw[idx] - mean) / std)
        assert torch.isfinite(_tensors(dm, split)[0]).all()
    x_train = _tensors(dm, "train")[0]
    torch.testing.assert_close(x_train.mean(dim=0), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x_train.std(dim=0)[~constant], torch.ones(int((~constant).sum())))


def test_digits_loaders_need_setup() -> None:
    with pytest.raises(RuntimeError, match="Call `setup\\(\\)`"):
        DigitsDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, r"`batch_size` must be a positive integer \(>= 1\), got 0"),
        ({"batch_size": -3}, r"`batch_size` must be a positive integer \(>= 1\), got -3"),
        ({"batch_size": 2.5}, r"`batch_size` must be a positive integer \(>= 1\), got 2.5"),
        ({"val_fraction": 0.0}, r"`val_fraction` must lie in the open interval \(0, 1\), got 0.0"),
        ({"test_fraction": 1.5}, r"`test_fraction` must lie in the open interval \(0, 1\), got 1.5"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"must be below 1 so that training data remains, got 0.6 \+ 0.5"),
        ({"num_workers": -1}, r"`num_workers` must be >= 0, got -1"),
    ],
)
def test_digits_rejects_invalid_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_split_indices_rejects_an_empty_split() -> None:
    with pytest.raises(ValueError, match="leaves an empty split"):
        split_indices(5, 0.1, 0.1, seed=0)


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_sequence_task_answers(task) -> None:
    inputs, targets = make_sequence_task(task, 50, 6, 10, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (50, 13)
    full = torch.cat([inputs, targets[:, -1:]], dim=1)  # the whole sequence [BOS] x [SEP] answer
    assert (full[:, 0] == BOS).all() and (full[:, 7] == SEP).all()
    x, answer = full[:, 1:7], full[:, 8:]
    expected = {"copy": x, "reverse": x.flip(1), "sort": x.sort(dim=1).values}[task]
    assert torch.equal(answer, expected)
    assert ((x >= 2) & (x < 10)).all()
    # next-token targets: the prompt is ignored, the answer is the sequence shifted by one
    assert (targets[:, :6] == IGNORE_INDEX).all()
    assert torch.equal(targets[:, 6:], full[:, 7:])


def test_sequence_datamodule_is_deterministic_and_splits_differ() -> None:
    a = SequenceDataModule(task="sort", seq_len=5, vocab_size=12, num_train=64, num_val=16, num_test=16, seed=7)
    b = SequenceDataModule(task="sort", seq_len=5, vocab_size=12, num_train=64, num_val=16, num_test=16, seed=7)
    a.setup()
    b.setup()
    assert torch.equal(_tensors(a, "train")[0], _tensors(b, "train")[0])
    assert not torch.equal(_tensors(a, "val")[0], _tensors(a, "test")[0])
    assert a.block_size == 11 and _tensors(a, "train")[0].shape == (64, 11)
    inputs, targets = next(iter(a.train_dataloader()))
    assert inputs.shape == targets.shape == (64, 11)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, r"`seq_len` must be a positive integer \(>= 1\), got 0"),
        ({"seq_len": -2}, r"`seq_len` must be a positive integer \(>= 1\), got -2"),
        ({"batch_size": 0}, r"`batch_size` must be a positive integer \(>= 1\), got 0"),
        ({"num_train": 0}, r"`num_train` must be a positive integer \(>= 1\), got 0"),
        ({"vocab_size": 3}, r"`vocab_size` must be >= 4 \(2 reserved tokens and at least 2 symbols\), got 3"),
        ({"task": "shuffle"}, r"`task` must be one of \('copy', 'reverse', 'sort'\), got 'shuffle'"),
    ],
)
def test_sequence_rejects_invalid_values(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        SequenceDataModule(**kwargs)
