"""Regenerate the figures the user guide shows (docs/images/): schedule shapes, clipped against unclipped gradient
norms on digits, the noise scale's error against a closed form, and the results of the large-batch, optimizers, init
and norms recipes.

    python docs/figures.py                 # all of them
    python docs/figures.py noise_scale     # only the named ones
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dl.callbacks import GradientClipping, GradientNoiseScale, LRSchedule
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


# y = w*·x + ε, d = 10, σ = 1, |w*| = 1, w held at 0: B_simple = ((d + 1)|δ|² + dσ²)/|δ|² = 21 exactly
NOISE_PAIRS = [(25, 0.9), (25, 0.99), (5, 0.9), (1, 0.9), (1, 0.99)]  # (every_n_steps, ema_decay); first: defaults
NOISE_D, NOISE_STEPS, NOISE_BATCH, NOISE_TRUTH, NOISE_SEEDS = 10, 400, 32, 21.0, 20


class _Regression(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(NOISE_D, 1, bias=False)
        nn.init.zeros_(self.net.weight)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the parameters stay where the truth holds


class _Trajectories(Callback):
    """Each estimator's B_simple and standard error after every optimizer step (placed after the estimators)."""

    def __init__(self, estimators: dict[str, GradientNoiseScale]) -> None:
        self.estimators = estimators
        self.values: dict[str, list[tuple[int, float, float | None]]] = {name: [] for name in estimators}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: object) -> None:
        for name, estimator in self.estimators.items():
            if estimator.b_simple is not None:
                self.values[name].append((trainer.global_step, estimator.b_simple, estimator.b_simple_stderr))


def _noise_scale_fit(seed: int) -> _Trajectories:
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(NOISE_D, generator=g)
    w_star /= w_star.norm()
    x = torch.randn(NOISE_STEPS * NOISE_BATCH, NOISE_D, generator=g)
    y = x @ w_star + torch.randn(len(x), generator=g)
    estimators = {
        f"every {n}, decay {d}": GradientNoiseScale(every_n_steps=n, ema_decay=d, per_coordinate=False)
        for n, d in NOISE_PAIRS
    }
    recorder = _Trajectories(estimators)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=NOISE_STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*estimators.values(), recorder],
    )
    L.seed_everything(seed, verbose=False)
    trainer.fit(_Regression(), DataLoader(TensorDataset(x, y.unsqueeze(1)), batch_size=NOISE_BATCH))
    return recorder


def noise_scale() -> None:
    """GradientNoiseScale on the closed form: final B_simple and its standard error over seeds, per setting; one
    seed's estimates over the run with a ±1 standard error band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load_start = os.getloadavg()
    runs = [_noise_scale_fit(seed) for seed in range(NOISE_SEEDS)]
    summary = {}
    for name in runs[0].values:
        finals = [run.values[name][-1][1:] for run in runs]
        estimates, errors = [e for e, _ in finals], [s for _, s in finals]
        summary[name] = {
            "estimates": estimates,
            "stderrs": errors,
            "mean_estimate": statistics.fmean(estimates),
            "rmse": statistics.fmean([(e - NOISE_TRUTH) ** 2 for e in estimates]) ** 0.5,
            "mean_stderr": statistics.fmean(errors),
            "within_2_stderr": statistics.fmean([abs(e - NOISE_TRUTH) <= 2 * s for e, s in finals]),
            "within_3_stderr": statistics.fmean([abs(e - NOISE_TRUTH) <= 3 * s for e, s in finals]),
        }
    payload = {
        "problem": {"d": NOISE_D, "sigma": 1.0, "delta_norm": 1.0, "batch": NOISE_BATCH, "steps": NOISE_STEPS},
        "truth": NOISE_TRUTH,
        "seeds": NOISE_SEEDS,
        "summary": summary,
        "seed0_trajectories": runs[0].values,
        "load": {"loadavg_start": load_start, "loadavg_end": os.getloadavg(), "cpu_count": os.cpu_count()},
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
    }
    (IMAGES / "noise_scale.json").write_text(json.dumps(payload, indent=1))
    fig, ax = plt.subplots(figsize=(8, 4.2), constrained_layout=True)
    for name in ("every 25, decay 0.9", "every 1, decay 0.9", "every 1, decay 0.99"):
        points = [(step, value, err) for step, value, err in runs[0].values[name] if err is not None]
        steps, values, errs = (list(column) for column in zip(*points, strict=True))
        label = name + (" (defaults)" if name.startswith("every 25") else "")
        line = ax.plot(steps, values, lw=1.3, drawstyle="steps-post", label=label)
        lower = [v - e for v, e in zip(values, errs, strict=True)]
        upper = [v + e for v, e in zip(values, errs, strict=True)]
        ax.fill_between(steps, lower, upper, color=line[0].get_color(), alpha=0.2, step="post")
    ax.axhline(NOISE_TRUTH, color="k", ls=":", lw=1, label="exact B_simple = 21")
    ax.set_ylim(0, 60)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("B_simple estimate ± 1 standard error")
    ax.set_title("GradientNoiseScale on y = w*·x + ε (d = 10, σ = 1, |w − w*| = 1, batch 32), seed 0")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(IMAGES / "noise_scale.png", dpi=120)
    plt.close(fig)


def recipe(script: str, outputs: dict[str, str]) -> None:
    """Run a comparison recipe into a temporary folder and copy its outputs (name there -> name under images/)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(__file__).parent.parent / "examples" / script
        subprocess.run([sys.executable, str(path), "--out", tmp], check=True)
        for source, target in outputs.items():
            shutil.copy(Path(tmp) / source, IMAGES / target)


def recipes() -> None:
    for name in ("large_batch", "optimizers", "init", "norms"):
        recipe(f"{name}.py", {f"{name}.png": f"{name}.png", f"{name}.json": f"{name}.json", f"{name}.md": f"{name}.md"})


if __name__ == "__main__":
    IMAGES.mkdir(parents=True, exist_ok=True)
    parts = {"schedules": schedules, "clipping": clipping, "noise_scale": noise_scale, "recipes": recipes}
    unknown = sorted(set(sys.argv[1:]) - set(parts))
    if unknown:
        sys.exit(f"unknown figure(s) {unknown}; valid: {sorted(parts)}")
    for name in sys.argv[1:] or parts:
        parts[name]()
    print(f"wrote the figures under {IMAGES}")
