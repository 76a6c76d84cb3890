"""What every ``benchmarks/bench_*.py`` shares: the ``--quick`` and ``--out`` flags, the record of the machine a
figure was measured on (CPU count, load average at start and end, versions), and the writing of JSON and PNG files.

A benchmark script uses it like this (``benchmarks/`` is on ``sys.path`` when a script runs)::

    from _common import Bench, bench_parser

    parser = bench_parser(__doc__)                  # adds --quick and --out
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    bench = Bench("pipeline", args)                 # notes the load average now
    steps = 3 if bench.quick else args.steps        # quick: tiny sizes, a few steps, seconds; not for timings
    ...
    bench.write_json({"step_ms": ...})              # -> <out>/pipeline.json with "quick", "args", "environment"
    bench.save_figure(fig, "pipeline.png")          # -> <out>/pipeline.png, figure closed

``--quick`` runs in seconds and its JSON says ``"quick": true``; without ``--out`` a quick run writes under
``runs/bench_quick/`` (ignored by git), so that it never overwrites measured figures. The test suite runs every
``bench_*.py`` with ``--quick --out <tmp>`` and checks that it exits 0 and writes a JSON and a PNG file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
"""Where measured figures live (``--out`` default)."""
QUICK_RESULTS = Path(__file__).resolve().parent.parent / "runs" / "bench_quick"
"""Where a quick run without ``--out`` writes (ignored by git, like every ``runs/`` folder)."""


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` described by the first paragraph of ``doc`` (the script's docstring), with the flags
    every benchmark takes: ``--quick`` and ``--out DIR``."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and a few steps, done in seconds: checks that the script runs; its figures mean nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder for the JSON and PNG files (default {RESULTS}; {QUICK_RESULTS} with --quick)",
    )
    return parser


def machine(load_start: tuple[float, float, float] | None = None) -> dict[str, Any]:
    """The machine and software a figure was measured on. ``load_average_end`` is the 1, 5 and 15-minute load
    average now; pass the one read at the start (``os.getloadavg()``) to record it as ``load_average_start``. On a
    shared machine the load says how contended the timings were."""
    import lightning as L
    import torch

    import lightning_dl

    record: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "lightning_dl": lightning_dl.__version__,
        "cuda": torch.cuda.is_available(),
    }
    if load_start is not None:
        record["load_average_start"] = list(load_start)
    record["load_average_end"] = list(os.getloadavg())
    return record


class Bench:
    """One benchmark run: where it writes, whether it is quick, and the load average when it started.

    Args:
        name: the benchmark's name; its JSON file is ``<out>/<name>.json``.
        args: the parsed arguments of a ``bench_parser`` (``quick`` and ``out`` are read, all are recorded).
    """

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        self.quick: bool = bool(args.quick)
        self.out: Path = args.out if args.out is not None else (QUICK_RESULTS if self.quick else RESULTS)
        self.load_start = os.getloadavg()
        self.started = time.perf_counter()
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        if self.quick:
            print(f"{name}: quick run (tiny sizes, a few steps): its figures are not timings", flush=True)

    def write_json(self, payload: dict[str, Any], filename: str | None = None) -> Path:
        """Write ``payload`` with ``benchmark``, ``quick``, ``args``, ``wall_s`` and ``environment`` (see
        :func:`machine`) added, to ``<out>/<filename>`` (default ``<name>.json``); returns the path."""
        record = {
            "benchmark": self.name,
            "quick": self.quick,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()}
            | {"out": str(self.out)},
            **payload,
            "wall_s": time.perf_counter() - self.started,
            "environment": machine(self.load_start),
        }
        path = self.out / (filename or f"{self.name}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}", flush=True)
        return path

    def save_figure(self, figure: Any, filename: str, *, dpi: int = 120) -> Path:
        """Save a matplotlib ``figure`` as ``<out>/<filename>`` and close it; returns the path."""
        import matplotlib.pyplot as plt

        path = self.out / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)
        plt.close(figure)
        print(f"wrote {path}", flush=True)
        return path
