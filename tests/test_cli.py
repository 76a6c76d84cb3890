"""The lightning-dl command and the recipes' LightningCLI: listing, errors, argument checks and the default recipe
in full. Every recipe's quick run and what it writes are tested in tests/test_recipes.py."""

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
    known = ", ".join(recipe.name for recipe in cli.RECIPES)
    assert known.startswith("digits, large-batch, optimizers, init, norms, async, charlm")
    assert f"Unknown recipe 'mnist'; known recipes: {known}." in capsys.readouterr().err


def test_run_without_recipe_prints_usage(capsys) -> None:
    assert cli.main(["run"]) == 2
    assert "lightning-dl run RECIPE" in capsys.readouterr().out


def test_checkpoint_convert_is_a_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["checkpoint", "convert", "--help"])
    assert exit_info.value.code == 0
    assert "usage: lightning-dl checkpoint convert [-h] --to {full,sharded} IN OUT" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["checkpoint"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: convert" in capsys.readouterr().err


@pytest.mark.parametrize(("ending", "status"), [("", 0), ("sys.exit(3)", 3), ("sys.exit('bad value')", 1)])
def test_run_script_runs_as_python_would_and_restores_argv_and_path(tmp_path, capsys, ending, status) -> None:
    script = tmp_path / "recipe.py"
    script.write_text(
        "import sys\nimport sibling\n"
        "print(__name__, sys.argv, sys.path[0] == sys.argv[0].rsplit('/', 1)[0], sibling.VALUE)\n" + ending + "\n"
    )
    (tmp_path / "sibling.py").write_text("VALUE = 7\n")
    argv, path = list(sys.argv), list(sys.path)
    assert cli.run_script([sys.executable, str(script), "--x=1"]) == status
    out, err = capsys.readouterr()
    assert out == f"__main__ {[str(script), '--x=1']} True 7\n"
    assert err == ("bad value\n" if status == 1 else "")
    assert sys.argv == argv and sys.path == path
    sys.modules.pop("sibling", None)


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


def test_large_batch_recipe_rejects_bad_values(tmp_path) -> None:
    result = _run("run", "large-batch", "--epochs=0", cwd=tmp_path)
    assert result.returncode == 2 and "--epochs must be >= 1, got 0" in result.stderr


def test_norms_recipe_rejects_a_non_positive_lr(tmp_path) -> None:
    result = _run("run", "norms", "--lr=0", cwd=tmp_path)
    assert result.returncode == 2 and "--lr must be > 0, got 0.0" in result.stderr
