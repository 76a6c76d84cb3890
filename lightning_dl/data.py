"""DataModules on data that ships with the install: scikit-learn's bundled digits and synthetic sequence tasks.

Nothing here downloads anything; every split is a deterministic function of its seed.
"""

from __future__ import annotations

from typing import Literal, get_args

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

SequenceTask = Literal["copy", "reverse", "sort"]

BOS, SEP = 0, 1
"""Reserved token ids of the sequence tasks; symbols are ``2 .. vocab_size - 1``."""
IGNORE_INDEX = -100
"""Target value that ``torch.nn.functional.cross_entropy`` skips (the prompt half of a sequence)."""


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer (>= 1), got {value!r}.")


def _check_splits(val_fraction: float, test_fraction: float) -> None:
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"`{name}` must lie in the open interval (0, 1), got {value!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"`val_fraction` + `test_fraction` must be below 1 so that training data remains, got "
            f"{val_fraction!r} + {test_fraction!r} = {val_fraction + test_fraction!r}."
        )


def split_indices(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into train, val and test index lists (sizes rounded down for
    val and test, the rest to train)."""
    _check_splits(val_fraction, test_fraction)
    n_val, n_test = int(n * val_fraction), int(n * test_fraction)
    if min(n_val, n_test, n - n_val - n_test) < 1:
        raise ValueError(
            f"Splitting {n} samples with `val_fraction={val_fraction}` and `test_fraction={test_fraction}` leaves an "
            "empty split; every split needs at least one sample."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes) as flat 64-feature vectors.

    The split into train/val/test is a deterministic function of ``seed``; features are standardised with the mean
    and standard deviation of the training split only (pixels constant in training are centred, not scaled).

    Args:
        batch_size: samples per batch for every split.
        val_fraction: share of the samples held out for validation, in (0, 1).
        test_fraction: share held out for testing, in (0, 1); ``val_fraction + test_fraction < 1``.
        seed: seed of the split.
        num_workers: DataLoader worker processes.

    Example::

        >>> dm = DigitsDataModule(batch_size=32, seed=0)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape), dm.num_features, dm.num_classes
        ((32, 64), (32,), 64, 10)
    """

    num_features = 64
    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_positive_int("batch_size", batch_size)
        _check_splits(val_fraction, test_fraction)
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers!r}.")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        self._splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32)
        y = torch.as_tensor(digits.target, dtype=torch.long)
        train, val, test = split_indices(len(y), self.val_fraction, self.test_fraction, self.seed)
        mean = x[train].mean(dim=0)
        std = x[train].std(dim=0)
        std = torch.where(std > 0, std, torch.ones_like(std))
        x = (x - mean) / std
        self._splits = {
            name: TensorDataset(x[idx], y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))
        }

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self._splits:
            raise RuntimeError("Call `setup()` (the Trainer does) before asking for a dataloader.")
        return DataLoader(
            self._splits[split], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def make_sequence_task(
    task: SequenceTask, num_samples: int, seq_len: int, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``num_samples`` sequences ``[BOS] x [SEP] f(x)`` with ``x`` of ``seq_len`` random symbols and ``f`` the
    identity (``copy``), reversal (``reverse``) or sorting (``sort``).

    Returns ``(inputs, targets)`` for next-token prediction, both of shape ``(num_samples, 2 * seq_len + 1)``:
    ``inputs`` is the sequence without its last token, ``targets`` the sequence shifted by one with the prompt
    positions set to ``IGNORE_INDEX``, so a loss only scores the answer half.
    """
    if task not in get_args(SequenceTask):
        raise ValueError(f"`task` must be one of {get_args(SequenceTask)}, got {task!r}.")
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("seq_len", seq_len)
    if vocab_size < 4:
        raise ValueError(f"`vocab_size` must be >= 4 (2 reserved tokens and at least 2 symbols), got {vocab_size!r}.")
    x = torch.randint(2, vocab_size, (num_samples, seq_len), generator=generator)
    if task == "copy":
        answer = x
    elif task == "reverse":
        answer = x.flip(1)
    else:
        answer = x.sort(dim=1).values
    bos, sep = torch.full((num_samples, 1), BOS), torch.full((num_samples, 1), SEP)
    seq = torch.cat([bos, x, sep, answer], dim=1)
    inputs, targets = seq[:, :-1].clone(), seq[:, 1:].clone()
    targets[:, :seq_len] = IGNORE_INDEX  # the prompt symbols and the separator are given, not predicted
    return inputs, targets


class SequenceDataModule(L.LightningDataModule):
    """Synthetic next-token tasks for language-model recipes: copy, reverse or sort a random string of symbols.

    Each split is drawn from its own generator seeded from ``seed``, so the data is identical on every run and
    every rank. Targets of the prompt half are ``IGNORE_INDEX``.

    Args:
        task: ``"copy"``, ``"reverse"`` or ``"sort"``.
        seq_len: symbols in the prompt (the full sequence has ``2 * seq_len + 2`` tokens).
        vocab_size: token ids ``0 .. vocab_size - 1``, of which ``BOS`` and ``SEP`` are reserved.
        num_train, num_val, num_test: samples per split.
        batch_size: samples per batch.
        seed: seed of the data.

    Example::

        >>> dm = SequenceDataModule(task="reverse", seq_len=4, vocab_size=8, num_train=16, batch_size=4)
        >>> dm.setup("fit")
        >>> inputs, targets = next(iter(dm.train_dataloader()))
        >>> tuple(inputs.shape), dm.block_size
        ((4, 9), 9)
    """

    def __init__(
        self,
        task: SequenceTask = "reverse",
        seq_len: int = 8,
        vocab_size: int = 16,
        num_train: int = 4096,
        num_val: int = 512,
        num_test: int = 512,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("seq_len", seq_len),
            ("num_train", num_train),
            ("num_val", num_val),
            ("num_test", num_test),
            ("batch_size", batch_size),
        ):
            _check_positive_int(name, value)
        # validates task and vocab_size before any Trainer is built
        make_sequence_task(task, 1, seq_len, vocab_size, torch.Generator().manual_seed(seed))
        self.save_hyperparameters()
        self.task: SequenceTask = task
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.batch_size = batch_size
        self.seed = seed
        self._splits: dict[str, TensorDataset] = {}

    @property
    def block_size(self) -> int:
        """Length of the model's input (and target) sequences."""
        return 2 * self.seq_len + 1

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        for offset, (split, size) in enumerate(self.sizes.items()):
            generator = torch.Generator().manual_seed(self.seed * 3 + offset)
            self._splits[split] = TensorDataset(
                *make_sequence_task(self.task, size, self.seq_len, self.vocab_size, generator)
            )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self._splits:
            raise RuntimeError("Call `setup()` (the Trainer does) before asking for a dataloader.")
        return DataLoader(self._splits[split], batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
