"""Training-curve plots from a CSVLogger metrics file."""

import csv

from lightning_dl.plot import plot_metrics, read_metrics


def _write_metrics(path) -> None:
    rows = [
        {"epoch": 0, "step": 4, "train_loss_step": 2.0},
        {"epoch": 0, "step": 9, "train_loss_epoch": 1.5, "train_acc": 0.5, "val_loss": 1.4, "val_acc": 0.6},
        {"epoch": 1, "step": 19, "train_loss_epoch": 0.5, "train_acc": 0.9, "val_loss": "nan", "val_acc": 0.9},
    ]
    fields = ["epoch", "step", "train_loss_step", "train_loss_epoch", "train_acc", "val_loss", "val_acc"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_read_metrics_skips_empty_and_non_finite_cells(tmp_path) -> None:
    _write_metrics(tmp_path / "metrics.csv")
    series = read_metrics(tmp_path / "metrics.csv")
    assert series["train_loss_step"] == [(4.0, 2.0)]
    assert series["train_loss_epoch"] == [(9.0, 1.5), (19.0, 0.5)]
    assert series["val_loss"] == [(9.0, 1.4)]
    assert "epoch" not in series and "step" not in series


def test_plot_metrics_writes_a_png(tmp_path) -> None:
    _write_metrics(tmp_path / "metrics.csv")
    png = plot_metrics(tmp_path / "metrics.csv", tmp_path / "out" / "curves.png", title="run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
