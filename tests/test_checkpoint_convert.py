"""``lightning-dl checkpoint convert IN OUT --to full|sharded`` on a checkpoint of Lightning's own BoringModel: both
directions exact, and bad input (missing IN, OUT existing, unknown --to, IN not a checkpoint) refused with a message
naming the argument, the value and what is valid, leaving no OUT and no temporary behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_dl import cli
from lightning_dl.parallel import checkpoint as ckpt
from lightning_dl.parallel.checkpoint import conversion
from tests.helpers.trainer import quiet_trainer


@pytest.fixture(scope="module")
def boring(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-process Lightning checkpoint after 3 steps of BoringModel (SGD, a StepLR schedule)."""
    path = tmp_path_factory.mktemp("boring") / "boring.ckpt"
    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=3)
    trainer.fit(BoringModel())
    trainer.save_checkpoint(path)
    return path


def _same_checkpoint(got: dict, want: dict) -> None:
    assert set(got) - {ckpt.NAMES_KEY} == set(want)
    assert list(got["state_dict"]) == list(want["state_dict"])
    for key, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key
    assert got["optimizer_states"][0]["param_groups"] == want["optimizer_states"][0]["param_groups"]
    for index, state in want["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(got["optimizer_states"][0]["state"][index][name]), torch.as_tensor(value)
            )
    for key in set(want) - {"state_dict", "optimizer_states"}:
        assert got[key] == want[key], key


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_full_to_sharded_and_back(boring: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    want = torch.load(boring, weights_only=False)
    assert want["global_step"] == 3 and want["lr_schedulers"]  # a real run's loops and scheduler state
    assert cli.main(["checkpoint", "convert", str(boring), str(tmp_path / "sharded"), "--to", "sharded"]) == 0
    assert ckpt.is_sharded(tmp_path / "sharded")
    assert "wrote" in capsys.readouterr().out
    # the folder loads into BoringModel and its optimizer in one process (state keyed by flat index: no names)
    module = BoringModel()
    optimizer = module.configure_optimizers()[0][0]
    rest = ckpt.load_sharded(tmp_path / "sharded", module, [optimizer])
    assert rest["global_step"] == 3 and rest["loops"] == want["loops"]
    for key, value in want["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value), key
    assert (
        cli.main(["checkpoint", "convert", str(tmp_path / "sharded"), str(tmp_path / "full.ckpt"), "--to", "full"]) == 0
    )
    _same_checkpoint(torch.load(tmp_path / "full.ckpt", weights_only=False), want)
    # and Lightning resumes from the converted file
    trainer = quiet_trainer(max_steps=4)
    trainer.fit(BoringModel(), ckpt_path=tmp_path / "full.ckpt")
    assert trainer.global_step == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.ckpt", "sharded"]


def test_the_installed_command_runs(boring: Path, tmp_path: Path) -> None:
    command = ["checkpoint", "convert", str(boring), str(tmp_path / "out"), "--to", "sharded"]
    result = subprocess.run(
        [sys.executable, "-m", "lightning_dl.cli", *command],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert ckpt.is_sharded(tmp_path / "out")


def _error(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["checkpoint", "convert", *args])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_names_the_argument_and_what_is_valid(boring: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    err = _error(capsys, str(tmp_path / "missing.ckpt"), out, "--to", "full")
    assert re.search(
        r"error: `IN='.*missing.ckpt'` does not exist: give a file written by trainer.save_checkpoint", err
    )
    err = _error(capsys, str(boring), str(boring), "--to", "sharded")
    assert f"`OUT='{boring}'` exists already: give a new path" in err
    err = _error(capsys, str(boring), out, "--to", "fp16")
    assert "argument --to: invalid choice: 'fp16' (choose from 'full', 'sharded')" in err
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    err = _error(capsys, str(tmp_path / "notes.txt"), out, "--to", "sharded")
    assert (
        "`IN='" in err
        and "notes.txt'` is not a checkpoint torch can read (UnpicklingError); give a file written by" in err
    )
    torch.save({"weights": torch.ones(2)}, tmp_path / "dict.pt")
    err = _error(capsys, str(tmp_path / "dict.pt"), out, "--to", "sharded")
    assert "dict.pt'` holds no 'state_dict', so it is not a file written by trainer.save_checkpoint" in err
    (tmp_path / "folder").mkdir()
    err = _error(capsys, str(tmp_path / "folder"), out, "--to", "full")
    assert "folder'` is a folder without .metadata and meta.pt, not a file written by" in err
    assert "usage: lightning-dl checkpoint convert [-h] --to {full,sharded} IN OUT" in _error(capsys, str(boring))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dict.pt", "folder", "notes.txt"]  # nothing written


def test_a_failed_write_leaves_no_output(boring: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_written(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"the first bytes")
        raise OSError("disk full")

    with monkeypatch.context() as patch:  # one file: torch.save fails after writing part of it
        patch.setattr(torch, "save", half_written)
        with pytest.raises(OSError, match="disk full"):
            ckpt.convert(boring, tmp_path / "out.ckpt", to="full")
    with monkeypatch.context() as patch:  # a folder: DCP wrote its files, meta.pt fails
        patch.setattr(conversion, "_write_meta", lambda path, rest, keys: half_written(None, path / "meta.pt"))
        with pytest.raises(OSError, match="disk full"):
            ckpt.convert(boring, tmp_path / "out", to="sharded")
    assert list(tmp_path.iterdir()) == []
