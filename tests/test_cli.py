"""The lightning-dl command and the recipes' LightningCLI."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_dl import cli

REPO = Path(__file__).resolve().parent.parent


def test_list_prints_one_line_per_recipe(capsys) -> None:
    assert cli.main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(cli.RECIPES)
    assert lines[0].startswith("digits ")


def test_unknown_recipe_lists_the_known_ones(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "mnist"])
    assert exit_info.value.code == 2
    assert "Unknown recipe 'mnist'; known recipes: digits, large-batch, optimizers, init, norms, async, charlm" in (
        capsys.readouterr().err
    )


def test_run_without_recipe_prints_usage(capsys) -> None:
    assert cli.main(["run"]) == 2
    assert "lightning-dl run RECIPE" in capsys.readouterr().out


def test_every_recipe_script_and_config_exists() -> None:
    for recipe in cli.RECIPES:
        command = cli.recipe_command(recipe, ["--extra"])
        assert Path(command[1]).is_file() and command[-1] == "--extra"
        if recipe.config is not None:
            assert command[2:4] == ["fit", "--config"] and Path(command[4]).is_file()


def _run(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_dl.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--data.batch_size=0", r"`batch_size` must be a positive integer (>= 1), got 0."),
        ("--data.val_fraction=1.5", r"`val_fraction` must lie in the open interval (0, 1), got 1.5."),
    ],
)
def test_recipe_rejects_invalid_values_before_training(tmp_path, override, message) -> None:
    result = _run("run", "digits", override, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Epoch 0" not in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_default_recipe_reaches_095_and_reports_its_files(tmp_path) -> None:
    """The default recipe, exactly as `make demo` runs it (from another working directory)."""
    result = _run("run", "digits", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = dict(re.findall(r"^(test acc|test loss|metrics CSV|curves PNG) +(\S+)$", result.stdout, re.MULTILINE))
    assert len(report) == 4, result.stdout[-2000:]
    assert float(report["test acc"]) >= 0.95
    csv_path, png_path = tmp_path / report["metrics CSV"], tmp_path / report["curves PNG"]
    assert csv_path.is_file() and "test_acc" in csv_path.read_text().splitlines()[0]
    assert png_path.read_bytes()[:4] == b"\x89PNG"
    assert "Epoch 29: 100%" in result.stdout  # Lightning's progress bar
    assert "`Trainer.fit` stopped: `max_epochs=30` reached." in result.stderr


@pytest.mark.slow
def test_large_batch_recipe_writes_its_table_and_plot(tmp_path) -> None:
    result = _run("run", "large-batch", "--epochs=2", "--warmup-epochs=1", "--seeds=1", "--out=lb", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "lb" / "large_batch.md").read_text().splitlines()
    assert len(table) == 6 and table[2].startswith("| baseline B=32")
    assert (tmp_path / "lb" / "large_batch.png").read_bytes()[:4] == b"\x89PNG"
    runs = json.loads((tmp_path / "lb" / "large_batch.json").read_text())["runs"]
    assert [r["steps"] for r in runs] == [80, 10, 10, 10]
    assert runs[2]["final_lr"] == pytest.approx(8 * 0.03)  # linear scaling applied
    assert len(runs[0]["val_acc"]) == 2


def test_large_batch_recipe_rejects_bad_values(tmp_path) -> None:
    result = _run("run", "large-batch", "--epochs=0", cwd=tmp_path)
    assert result.returncode == 2 and "--epochs must be >= 1, got 0" in result.stderr


def _table(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_init_recipe_shows_collapse_and_saturation(tmp_path) -> None:
    result = _run("run", "init", "--out=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stds = json.loads((tmp_path / "out" / "init.json").read_text())["stds"]
    assert stds["tanh"]["N(0, 0.01²)"][-1] < 1e-6 and stds["relu"]["N(0, 0.01²)"][-1] < 1e-6  # collapse
    assert stds["tanh"]["N(0, 1)"][-1] > 0.9  # saturated tanh: activations pinned near ±1
    assert 0.3 < stds["relu"]["He (normal)"][-1] < 3.0  # He keeps ReLU's scale over 10 layers
    assert stds["relu"]["Xavier (normal)"][-1] < 0.1 * stds["relu"]["He (normal)"][-1]
    assert (tmp_path / "out" / "init.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "rows"), [("optimizers", 14), ("norms", 6)])
def test_comparison_recipes_write_a_row_per_contender(tmp_path, recipe, rows) -> None:
    result = _run("run", recipe, "--epochs=1", "--out=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_table(tmp_path / "out" / f"{recipe}.md")) == 2 + rows
    assert (tmp_path / "out" / f"{recipe}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_charlm_recipe_learns(tmp_path) -> None:
    result = _run("run", "charlm", "--trainer.max_epochs=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = dict(re.findall(r"^(test loss|test seq acc) +(\S+)$", result.stdout, re.MULTILINE))
    assert float(report["test loss"]) < 0.5 and float(report["test seq acc"]) > 0.3


@pytest.mark.slow
def test_digits_recipe_takes_optimizer_norm_and_init_by_name(tmp_path) -> None:
    result = _run(
        "run",
        "digits",
        "--trainer.max_epochs=3",
        "--model.optimizer=lamb",
        "--model.lr=0.01",
        "--model.norm=layer",
        "--model.init=he_normal",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = dict(re.findall(r"^(test acc) +(\S+)$", result.stdout, re.MULTILINE))
    assert float(report["test acc"]) > 0.9
    hparams = next(tmp_path.glob("runs/digits/version_*/hparams.yaml")).read_text()
    assert "optimizer: lamb" in hparams and "norm: layer" in hparams and "init: he_normal" in hparams


def test_norms_recipe_rejects_a_non_positive_lr(tmp_path) -> None:
    result = _run("run", "norms", "--lr=0", cwd=tmp_path)
    assert result.returncode == 2 and "--lr must be > 0, got 0.0" in result.stderr
