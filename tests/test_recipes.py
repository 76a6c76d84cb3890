"""Every recipe of ``lightning-dl list`` runs with its ``quick`` arguments, as a user would start it
(``python -m lightning_dl.cli run NAME *quick`` from another working directory), and writes what it promises.

A recipe added to ``lightning_dl.cli.RECIPES`` is run here without further ado; ``CHECKS`` holds what each known
recipe's quick run must show beyond exit code 0, and ``EXTRA_ARGS`` the arguments a check needs on top of the
quick ones (they never override a quick argument). ``tests/test_cli.py`` runs the default recipe in full.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_dl import cli

PNG = b"\x89PNG"


def run_recipe(name: str, *args: str, cwd: Path, timeout: float = 280) -> subprocess.CompletedProcess:
    """``lightning-dl run name *args`` in ``cwd``, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "lightning_dl.cli", "run", name, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _report(stdout: str, *keys: str) -> dict[str, str]:
    """The ``key  value`` lines that RecipeCLI prints after a run, for the given keys."""
    found = dict(re.findall(rf"^({'|'.join(keys)}) +(\S+)$", stdout, re.MULTILINE))
    assert set(found) == set(keys), stdout[-2000:]
    return found


def check_digits(cwd: Path, result: subprocess.CompletedProcess) -> None:
    """The optimizer, norm and initialisation are taken by name, and one epoch with them learns digits."""
    report = _report(result.stdout, "test acc", "test loss", "metrics CSV", "curves PNG")
    assert float(report["test acc"]) > 0.9
    assert "test_acc" in (cwd / report["metrics CSV"]).read_text().splitlines()[0]
    assert (cwd / report["curves PNG"]).read_bytes()[:4] == PNG
    hparams = next(cwd.glob("runs/digits/version_*/hparams.yaml")).read_text()
    assert "optimizer: lamb" in hparams and "norm: layer" in hparams and "init: he_normal" in hparams


def check_large_batch(cwd: Path, result: subprocess.CompletedProcess) -> None:
    """One epoch of each run: 40 batches of 32, 5 of 256; the linear rule scales the learning rate by 256/32."""
    out = cwd / "runs" / "large_batch"
    table = (out / "large_batch.md").read_text().splitlines()
    assert len(table) == 6 and table[2].startswith("| baseline B=32")
    assert (out / "large_batch.png").read_bytes()[:4] == PNG
    runs = json.loads((out / "large_batch.json").read_text())["runs"]
    assert [r["steps"] for r in runs] == [40, 5, 5, 5]
    assert runs[2]["final_lr"] == pytest.approx(8 * 0.03)  # linear scaling applied
    assert [len(r["val_acc"]) for r in runs] == [1, 1, 1, 1]  # one validation per epoch


def _check_table(name: str, rows: int) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(cwd: Path, result: subprocess.CompletedProcess) -> None:
        out = cwd / "runs" / name
        assert len((out / f"{name}.md").read_text().splitlines()) == 2 + rows  # header, rule, a row per contender
        assert (out / f"{name}.png").read_bytes()[:4] == PNG
        assert json.loads((out / f"{name}.json").read_text())["environment"]["torch"]

    check.__doc__ = f"{name}.md has a row per contender ({rows}); the plot and JSON are written."
    return check


def check_init(cwd: Path, result: subprocess.CompletedProcess) -> None:
    """Over 10 layers small weights collapse the signal, N(0, 1) saturates tanh, He keeps ReLU's scale."""
    out = cwd / "runs" / "init"
    stds = json.loads((out / "init.json").read_text())["stds"]
    assert stds["tanh"]["N(0, 0.01²)"][-1] < 1e-6 and stds["relu"]["N(0, 0.01²)"][-1] < 1e-6  # collapse
    assert stds["tanh"]["N(0, 1)"][-1] > 0.9  # saturated tanh: activations pinned near ±1
    assert 0.3 < stds["relu"]["He (normal)"][-1] < 3.0  # He keeps ReLU's scale over 10 layers
    assert stds["relu"]["Xavier (normal)"][-1] < 0.1 * stds["relu"]["He (normal)"][-1]
    assert (out / "init.png").read_bytes()[:4] == PNG


def check_async(cwd: Path, result: subprocess.CompletedProcess) -> None:
    """The server's parameters learn digits in one epoch; the table, plot and JSON are written."""
    out = cwd / "runs" / "async"
    record = json.loads((out / "async_sgd.json").read_text())
    assert record["test"]["test_acc"] > 0.5
    assert record["max_staleness"] >= 0
    assert len((out / "async_sgd.md").read_text().splitlines()) == 3
    assert (out / "async_sgd.png").read_bytes()[:4] == PNG


def check_comm(cwd: Path, result: subprocess.CompletedProcess) -> None:
    """A row per strategy the quick run names, in its order; the plot is written."""
    out = cwd / "runs" / "comm"
    rows = (out / "comm.md").read_text().splitlines()[2:]
    assert [row.split("|")[1].strip() for row in rows] == ["ddp", "local_sgd", "ddp_int8"]
    assert (out / "comm.png").read_bytes()[:4] == PNG


def _check_report(name: str) -> Callable[[Path, subprocess.CompletedProcess], None]:
    def check(cwd: Path, result: subprocess.CompletedProcess) -> None:
        out = cwd / "runs" / name
        assert len((out / f"{name}.md").read_text().splitlines()) > 2  # header, rule and at least one row
        assert json.loads((out / f"{name}.json").read_text())["environment"]["torch"]
        assert (out / f"{name}.png").read_bytes()[:4] == PNG

    check.__doc__ = f"{name}.md holds at least one row; the JSON and plot are written."
    return check


def check_charlm(cwd: Path, result: subprocess.CompletedProcess) -> None:
    """The causal Transformer learns to reverse symbol strings within one epoch."""
    report = _report(result.stdout, "test loss", "test seq acc")
    assert float(report["test loss"]) < 0.5 and float(report["test seq acc"]) > 0.3


def check_scaling(cwd: Path, result: subprocess.CompletedProcess) -> None:
    """1 process and pp2 read the same batches: equal validation curves; E_1 = 1; one RSS per rank."""
    out = cwd / "runs" / "scaling"
    assert len((out / "scaling.md").read_text().splitlines()) == 4
    assert (out / "scaling.png").read_bytes()[:4] == PNG
    one, pp2 = json.loads((out / "scaling.json").read_text())["layouts"]
    assert one["efficiency"] == 1.0 and [len(one["peak_rss_bytes"]), len(pp2["peak_rss_bytes"])] == [1, 2]
    assert [s for s, _, _ in one["curve"]] == [s for s, _, _ in pp2["curve"]]
    assert max(abs(a[2] - b[2]) for a, b in zip(one["curve"], pp2["curve"], strict=True)) < 1e-4


def check_too_big(cwd: Path, result: subprocess.CompletedProcess) -> None:
    """Each pp rank holds its own blocks, together the whole model, with Adam state twice its weights."""
    report = json.loads((cwd / "runs" / "too_big" / "too_big.json").read_text())
    ranks = report["pipeline"]
    assert sorted(b for r in ranks for b in r["blocks"]) == list(range(3))
    assert sum(r["parameter_bytes"] for r in ranks) == report["parameter_bytes"]
    assert all(r["adam_state_bytes"] == 2 * r["parameter_bytes"] for r in ranks)


CHECKS: dict[str, Callable[[Path, subprocess.CompletedProcess], None]] = {
    "digits": check_digits,
    "large-batch": check_large_batch,
    "optimizers": _check_table("optimizers", 14),
    "init": check_init,
    "norms": _check_table("norms", 6),
    "async": check_async,
    "charlm": check_charlm,
    "comm": check_comm,
    "pipeline": _check_report("pipeline"),
    "scaling": check_scaling,
    "too-big": check_too_big,
}
EXTRA_ARGS: dict[str, tuple[str, ...]] = {
    "digits": ("--model.optimizer=lamb", "--model.lr=0.01", "--model.norm=layer", "--model.init=he_normal"),
}
MULTI_PROCESS = {"async", "comm", "pipeline", "scaling", "tensor-parallel", "too-big"}


def test_every_recipe_declares_quick_arguments() -> None:
    for recipe in cli.RECIPES:
        assert recipe.quick, f"recipe {recipe.name!r} declares no quick arguments"
        assert all(arg.startswith("--") for arg in recipe.quick), recipe.quick


def test_checks_name_known_recipes_and_extras_override_no_quick_argument() -> None:
    names = {recipe.name for recipe in cli.RECIPES}
    assert set(CHECKS) <= names and set(EXTRA_ARGS) <= names and names >= MULTI_PROCESS
    for recipe in cli.RECIPES:
        quick_keys = {arg.split("=")[0] for arg in recipe.quick}
        assert not quick_keys & {arg.split("=")[0] for arg in EXTRA_ARGS.get(recipe.name, ())}


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe",
    [
        pytest.param(r, id=r.name, marks=[pytest.mark.distributed] if r.name in MULTI_PROCESS else [])
        for r in cli.RECIPES
    ],
)
def test_recipe_runs_quick(tmp_path: Path, recipe: cli.Recipe) -> None:
    result = run_recipe(recipe.name, *recipe.quick, *EXTRA_ARGS.get(recipe.name, ()), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if recipe.name in CHECKS:
        CHECKS[recipe.name](tmp_path, result)
