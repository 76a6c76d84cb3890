"""The ``lightning-dl`` console entry (``list`` and ``run`` the recipes in ``examples/``) and ``RecipeCLI``, the
LightningCLI the recipes share: after ``fit`` it tests the model, plots the curves and prints where they are."""

from __future__ import annotations

import argparse
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override


@dataclass(frozen=True)
class Recipe:
    """One runnable recipe: ``python examples/<script> fit --config examples/<config>`` for a LightningCLI recipe,
    ``python examples/<script>`` for one that compares several runs (``config=None``)."""

    name: str
    script: str
    config: str | None
    description: str
    quick: tuple[str, ...] = ()
    """Arguments that make a short run of the recipe (seconds, not for results): the test suite runs every
    recipe with them, so a change that breaks a recipe fails the tests."""


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "digits",
        "digits.py",
        "configs/digits.yaml",
        "MLP classifier on scikit-learn's 8x8 digits (CPU, under a minute, >= 0.95 test accuracy)",
        quick=("--trainer.max_epochs=1",),
    ),
    Recipe(
        "large-batch",
        "large_batch.py",
        None,
        "the linear scaling rule on digits: batch 32 vs 256 without scaling, scaled, scaled with warmup",
        quick=("--epochs=1", "--warmup-epochs=1", "--seeds=1"),
    ),
    Recipe(
        "optimizers",
        "optimizers.py",
        None,
        "every optimizer on the same digits MLP: loss curves, accuracy, time",
        quick=("--epochs=1",),
    ),
    Recipe(
        "init",
        "init.py",
        None,
        "activation scale through 10 tanh and ReLU layers under four initialisations",
        quick=("--depth=10", "--width=64"),  # the 10 layers described, 64 units wide: start-up dominates
    ),
    Recipe(
        "norms",
        "norms.py",
        None,
        "the digits ConvNet with each normalization: curves and table",
        quick=("--epochs=1",),
    ),
    Recipe(
        "async",
        "async_sgd.py",
        None,
        "digits with a parameter server and 2 async workers: staleness, accuracy",
        quick=("--epochs=1",),
    ),
    Recipe(
        "charlm",
        "charlm.py",
        "configs/charlm.yaml",
        "a causal Transformer learns to reverse symbol strings",
        quick=("--trainer.max_epochs=1",),
    ),
    Recipe(
        "tensor-parallel",
        "tensor_parallel.py",
        None,
        "charlm at tp2 with the automatic plan: the plan table, losses next to one process",
        quick=("--epochs=1", "--num-train=128"),
    ),
    Recipe(
        "pipeline",
        "pipeline.py",
        None,
        "charlm over 2 pipeline stages: schedule, measured bubble against theory, losses next to one process",
        quick=("--epochs=1", "--num-train=128"),
    ),
    Recipe(
        "comm",
        "comm.py",
        None,
        "digits on 2 processes: time to target and final accuracy, ddp vs local SGD, DiLoCo, compression, ZeRO",
        quick=("--epochs=1", "--seeds=1", "--strategies=ddp,local_sgd,ddp_int8"),
    ),
    Recipe(
        "scaling",
        "scaling.py",
        None,
        "one model and global batch under 1 process, dp2, tp2, pp2, dp2xpp2, dp2xtp2, dp4: T_N, samples/s, E_N, memory",
        quick=("--layouts=1;pp2", "--epochs=1", "--hidden=64,64", "--skip-contention"),
    ),
    Recipe(
        "too-big",
        "too_big.py",
        None,
        "a model too big for one capped process (RLIMIT_AS) fails there and trains over 2 pipeline stages",
        quick=("--width=512", "--layers=2", "--steps=1"),
    ),
)


def examples_dir() -> Path:
    """The ``examples/`` folder of the source checkout this package was installed from (editable install)."""
    path = Path(__file__).resolve().parent.parent / "examples"
    if not path.is_dir():
        raise FileNotFoundError(
            f"The recipes live in the repository's examples/ folder, which was not found at {path}. "
            "Install lightning_dl from a clone with `pip install -e .` (the Makefile does) to run them."
        )
    return path


def find_recipe(name: str) -> Recipe:
    """Look a recipe up by name; an unknown name is an error that lists the known ones."""
    for recipe in RECIPES:
        if recipe.name == name:
            return recipe
    known = ", ".join(r.name for r in RECIPES)
    raise KeyError(f"Unknown recipe {name!r}; known recipes: {known}. `lightning-dl list` describes them.")


def recipe_command(recipe: Recipe, extra_args: list[str]) -> list[str]:
    """The command line that runs ``recipe``: the example script's LightningCLI ``fit`` with its config."""
    root = examples_dir()
    if recipe.config is None:
        return [sys.executable, str(root / recipe.script), *extra_args]
    return [sys.executable, str(root / recipe.script), "fit", "--config", str(root / recipe.config), *extra_args]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-dl`` command."""
    parser = argparse.ArgumentParser(prog="lightning-dl", description="List and run the lightning_dl recipes.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="list the recipes, one line each")
    # no -h of its own: everything after the recipe name, --help included, goes to the recipe's LightningCLI
    run = commands.add_parser(
        "run",
        add_help=False,
        help="run a recipe; further arguments go to its LightningCLI (e.g. --trainer.max_epochs=5, --help)",
        usage="lightning-dl run RECIPE [LightningCLI arguments ...]",
    )
    run.add_argument("recipe", nargs="?", help="recipe name, see `lightning-dl list`")
    run.add_argument("recipe_args", nargs=argparse.REMAINDER, help="arguments for the recipe's LightningCLI")
    from lightning_dl.parallel.checkpoint import add_cli, cli_convert

    convert = add_cli(commands)  # lightning-dl checkpoint convert IN OUT --to full|sharded
    args = parser.parse_args(argv)
    if args.command == "checkpoint":
        return cli_convert(args, convert)
    if args.command == "list":
        width = max(len(r.name) for r in RECIPES)
        for recipe in RECIPES:
            print(f"{recipe.name:<{width}}  {recipe.description}")
        return 0
    if args.recipe in (None, "-h", "--help"):
        run.print_help()
        return 0 if args.recipe else 2
    try:
        command = recipe_command(find_recipe(args.recipe), args.recipe_args)
    except (KeyError, FileNotFoundError) as err:
        run.error(err.args[0])
    return run_script(command)


def run_script(command: list[str]) -> int:
    """Run ``command`` (``python SCRIPT ARGS...``, from ``recipe_command``) in this interpreter, as ``python`` would
    run it: ``SCRIPT`` as ``__main__`` with its folder first on ``sys.path`` and ``sys.argv`` set; returns its exit
    status. One interpreter start and one import of torch and Lightning instead of two (about 5 s on 2 cores);
    processes the script spawns load it by path, as they would from ``python SCRIPT``. ``sys.argv`` and
    ``sys.path`` are restored afterwards, so that a caller of ``main`` from Python keeps its own."""
    script = command[1]
    argv, path = sys.argv, list(sys.path)
    sys.argv = command[1:]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = argv, path
    return 0


class RecipeCLI(LightningCLI):
    """LightningCLI for the recipes.

    Invalid constructor arguments (a ``ValueError`` from a module or DataModule) end the run with the parser's
    usage and the message, exit code 2, instead of a traceback. After ``fit`` the model is tested and, on rank zero,
    the test metrics, the metrics CSV and a PNG of the training curves are printed.
    """

    @override
    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            self.parser.error(str(err))

    def after_fit(self) -> None:
        """Test the trained model, draw its curves, and report where everything is."""
        results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        if not self.trainer.is_global_zero:
            return
        report: list[tuple[str, Any]] = [(key, f"{value:.4f}") for key, value in sorted(results[0].items())]
        logger = self.trainer.logger
        if isinstance(logger, CSVLogger):
            logger.save()
            from lightning_dl.plot import plot_metrics

            csv_path = Path(logger.log_dir) / "metrics.csv"
            png_path = plot_metrics(
                csv_path, Path(logger.log_dir) / "curves.png", title=Path(logger.log_dir).parent.name
            )
            report += [("metrics CSV", csv_path), ("curves PNG", png_path)]
        width = max(len(key) for key, _ in report)
        print()
        for key, value in report:
            print(f"{key.replace('_', ' '):<{width}}  {value}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
