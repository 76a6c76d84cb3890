"""Regenerate the figures the user guide shows (docs/images/): schedule shapes, clipped against unclipped gradient
norms on digits, and the results of the large-batch, optimizers, init and norms recipes.

    python docs/figures.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger

from lightning_dl.callbacks import GradientClipping, LRSchedule
from lightning_dl.data import DigitsDataModule
from lightning_dl.modules import ClassifierModule
from lightning_dl.plot import plot_schedule, read_metrics

IMAGES = Path(__file__).parent / "images"


def schedules() -> None:
    warm = {"warmup_steps": 100}
    shapes = {
        "cosine (min 0.1)": LRSchedule("cosine", min_lr_ratio=0.1, **warm),
        "linear": LRSchedule("linear", **warm),
        "wsd (1-sqrt, last 20%)": LRSchedule("wsd", decay_type="1-sqrt", **warm),
        "cosine_restarts (3, x2, decay 0.6)": LRSchedule("cosine_restarts", cycle_mul=2.0, cycle_decay=0.6, **warm),
        "polynomial (power 2)": LRSchedule("polynomial", power=2.0, **warm),
        "inverse_sqrt": LRSchedule("inverse_sqrt", **warm),
        "step (x0.3 at 400, 700)": LRSchedule("step", milestones=[400, 700], gamma=0.3, **warm),
    }
    plot_schedule(shapes, IMAGES / "schedules.png", total_steps=1000, title="LRSchedule shapes, 100 warmup steps")


def clipping() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with tempfile.TemporaryDirectory() as tmp:
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=5,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=CSVLogger(tmp, name="clip"),
            callbacks=[GradientClipping(max_norm=0.5)],
        )
        trainer.fit(ClassifierModule(optimizer="momentum", lr=0.1), datamodule=DigitsDataModule(batch_size=32))
        series = read_metrics(Path(trainer.logger.log_dir) / "metrics.csv")  # type: ignore[union-attr]
    fig, ax = plt.subplots(figsize=(7, 3.8), constrained_layout=True)
    for name, label in (("grad_norm/pre_clip", "before clipping"), ("grad_norm/post_clip", "after clipping")):
        steps, values = zip(*series[name], strict=True)
        ax.plot(steps, values, label=label, lw=1.2)
    ax.axhline(0.5, color="k", ls=":", lw=1, label="max_norm = 0.5")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("global gradient 2-norm")
    ax.set_title("GradientClipping(max_norm=0.5): MLP on digits, SGD momentum 0.9, lr 0.1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(IMAGES / "clipping.png", dpi=120)
    plt.close(fig)


def recipe(script: str, outputs: dict[str, str]) -> None:
    """Run a comparison recipe into a temporary folder and copy its outputs (name there -> name under images/)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(__file__).parent.parent / "examples" / script
        subprocess.run([sys.executable, str(path), "--out", tmp], check=True)
        for source, target in outputs.items():
            shutil.copy(Path(tmp) / source, IMAGES / target)


if __name__ == "__main__":
    IMAGES.mkdir(parents=True, exist_ok=True)
    schedules()
    clipping()
    for name in ("large_batch", "optimizers", "init", "norms"):
        recipe(f"{name}.py", {f"{name}.png": f"{name}.png", f"{name}.json": f"{name}.json", f"{name}.md": f"{name}.md"})
    print(f"wrote the figures under {IMAGES}")
