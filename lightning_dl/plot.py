"""Plots people look at: training curves from a metrics CSV (Lightning's ``CSVLogger`` format)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _save(fig: Any, png_path: str | Path) -> Path:
    """Write ``fig`` to ``png_path`` (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def read_metrics(csv_path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Read a ``CSVLogger`` ``metrics.csv`` into ``{metric: [(step, value), ...]}``, skipping empty cells.

    Epoch-level metrics keep the step at which Lightning logged them, so train and validation curves share the
    x axis.
    """
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step = float(row["step"])
            for key, cell in row.items():
                if key in ("step", "epoch") or cell in ("", None):
                    continue
                value = float(cell)
                if math.isfinite(value):
                    series[key].append((step, value))
    return dict(series)


def plot_metrics(csv_path: str | Path, png_path: str | Path, *, title: str | None = None) -> Path:
    """Draw the loss curves (left) and accuracy curves (right) of a run to ``png_path``; returns the path.

    Metrics are grouped by name: those containing ``loss`` on the left, ``acc`` on the right. Per-step training
    loss is drawn faintly under the epoch means.

    Example (after ``lightning-dl run digits``)::

        plot_metrics("runs/digits/version_0/metrics.csv", "runs/digits/version_0/curves.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_metrics(csv_path)
    panels = [("loss", "cross-entropy loss"), ("acc", "accuracy")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for name in sorted(n for n in series if key in n):
            steps, values = zip(*series[name], strict=True)
            faint = name.endswith("_step")
            marker = "*" if len(steps) == 1 else (None if faint or len(steps) > 30 else "o")
            ax.plot(
                steps,
                values,
                label=name,
                alpha=0.3 if faint else 1.0,
                lw=0.8 if faint else 1.8,
                marker=marker,
                ms=12 if len(steps) == 1 else 3,
            )
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, png_path)


def plot_schedule(
    schedules: Mapping[str, Any],
    png_path: str | Path,
    *,
    total_steps: int,
    base_lr: float = 1.0,
    title: str | None = None,
) -> Path:
    """Draw learning-rate schedules against the optimizer step to ``png_path``; returns the path.

    ``schedules`` maps a label to an ``LRSchedule`` (drawn over ``total_steps`` unless it has its own) or to any
    function of the step that returns the factor.

    Example::

        >>> import tempfile
        >>> from lightning_dl.callbacks import LRSchedule
        >>> path = plot_schedule(
        ...     {"cosine": LRSchedule("cosine", warmup_steps=10), "wsd": LRSchedule("wsd", warmup_steps=10)},
        ...     Path(tempfile.mkdtemp()) / "schedules.png", total_steps=100)
        >>> path.stat().st_size > 0
        True
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    steps = list(range(total_steps + 1))
    for label, schedule in schedules.items():
        if hasattr(schedule, "factor"):
            values = [base_lr * schedule.factor(s, schedule.total_steps or total_steps) for s in steps]
        else:
            values = [base_lr * schedule(s) for s in steps]
        ax.plot(steps, values, label=label, lw=1.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate" if base_lr != 1.0 else "LR factor")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, png_path)


def plot_pipeline_timeline(
    events: Any,
    png_path: str | Path,
    *,
    n_microbatches: int,
    step: int | None = None,
    title: str | None = None,
) -> tuple[Path, float, float]:
    """Draw one pipeline step as a Gantt chart (one row per rank; forward, backward and weight-gradient actions
    coloured, each labelled stage:micro-batch, idle time left blank) and return ``(path, measured bubble, theory)``,
    the measured idle fraction against ``(p - 1) / (m + p - 1)`` with p the number of ranks.

    ``events`` are :class:`lightning_dl.parallel.pipeline.Event` (``PipelineStrategy(record_timeline=True)``'s
    ``timeline`` after ``fit``); ``step`` picks the optimizer step drawn (default: the last recorded).

    Example (after a fit with ``record_timeline=True``)::

        path, measured, theory = plot_pipeline_timeline(trainer.strategy.timeline, "timeline.png", n_microbatches=4)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_dl.parallel.pipeline import bubble_fraction, bubble_theory

    events = list(events)
    if not events:
        raise ValueError("`events` is empty: train with `PipelineStrategy(record_timeline=True)` first.")
    step = max(e.step for e in events) if step is None else step
    chosen = [e for e in events if e.step == step]
    if not chosen:
        raise ValueError(f"`step={step}` has no events; recorded steps: {sorted({e.step for e in events})}.")
    ranks = sorted({e.rank for e in chosen})
    origin = min(e.start for e in chosen)
    measured = bubble_fraction(chosen, ranks)
    theory = bubble_theory(len(ranks), n_microbatches)
    colours = {"F": "#4c72b0", "B": "#dd8452", "W": "#55a868"}
    fig, ax = plt.subplots(figsize=(11, 0.8 + 0.7 * len(ranks)), constrained_layout=True)
    for event in chosen:
        row = ranks.index(event.rank)
        left, width = (event.start - origin) * 1e3, (event.end - event.start) * 1e3
        ax.barh(row, width, left=left, height=0.8, color=colours.get(event.kind, "grey"), edgecolor="white")
        ax.text(left + width / 2, row, f"{event.stage}:{event.microbatch}", ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("milliseconds since the step's first action")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    ax.legend(handles, ["forward", "backward", "weight grad"], loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(
        f"{title + ': ' if title else ''}bubble {measured:.1%} measured, "
        f"{theory:.1%} = (p-1)/(m+p-1) with p={len(ranks)}, m={n_microbatches}"
    )
    return _save(fig, png_path), measured, theory
