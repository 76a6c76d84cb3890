"""Between a sharded checkpoint folder and Lightning's one-file checkpoint, in one process and without model
code: :func:`to_full`, :func:`to_sharded`, :func:`convert`, and the ``lightning-dl checkpoint convert`` command.
Torch only."""

from __future__ import annotations

import argparse
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lightning_dl.parallel.checkpoint.sharded import (
    FORMATS,
    META_FILE,
    NAMES_KEY,
    TENSOR_KEYS,
    _dcp_load,
    _dcp_save,
    _read_groups,
    _select,
    _write_meta,
    is_sharded,
)


def to_full(src: str | os.PathLike, *, weights_only: bool = False) -> dict[str, Any]:
    """A sharded folder as Lightning's one-process checkpoint dict: ``state_dict`` of plain tensors in the whole
    model's order, ``optimizer_states`` in the single-process format (parameters numbered in the whole model's
    optimizer order), ``optimizer_param_names`` (the names of those numbers), and the rest. One process, no model."""
    src = Path(src)
    meta = torch.load(src / META_FILE, map_location="cpu", weights_only=weights_only) if is_sharded(src) else None
    if meta is None:
        raise ValueError(f"`src='{src}'` is not a sharded checkpoint folder (it needs .metadata and {META_FILE}).")
    order = meta.pop("lightning_dl", {}).get("state_dict_keys", [])
    metadata = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata
    state = {k: _empty(md) for k, md in metadata.items()}
    _dcp_load(state, src, one=True)
    model = _select(state, "state_dict.")
    keys = [k for k in order if k in model] + [k for k in model if k not in order]
    checkpoint: dict[str, Any] = {**meta, "state_dict": {k: model[k] for k in keys}}
    optimizers = sorted({int(k.split(".")[0].removeprefix("optimizer_")) for k in state if k.startswith("optimizer_")})
    states, names = [], []
    for index in optimizers:
        groups = _read_groups(_select(state, f"optimizer_{index}.param_groups."))
        flat = _select(state, f"optimizer_{index}.state.")
        order_of = [p for g in groups for p in g["params"]]
        numbered, start = [], 0
        for g in groups:
            numbered.append({**g, "params": list(range(start, start + len(g["params"])))})
            start += len(g["params"])
        per_param = {i: _select(flat, f"{p}.") for i, p in enumerate(order_of)}
        states.append({"state": {i: s for i, s in per_param.items() if s}, "param_groups": numbered})
        names.append([list(g["params"]) for g in groups])
    if optimizers:
        checkpoint["optimizer_states"] = states
        if all(isinstance(p, str) for n in names for g in n for p in g):
            checkpoint[NAMES_KEY] = names
    return checkpoint


def _empty(md: Any) -> Any:
    if isinstance(md, TensorStorageMetadata):
        return torch.empty(tuple(md.size), dtype=md.properties.dtype)
    return None


def to_sharded(checkpoint: Mapping[str, Any], dst: str | os.PathLike) -> None:
    """Write a one-file checkpoint dict (Lightning's, or :func:`to_full`'s) as a sharded folder ``dst``, in one
    process. Optimizer state is keyed by name where ``checkpoint`` has ``optimizer_param_names``, by flat index
    otherwise."""
    if "state_dict" not in checkpoint:
        raise ValueError("the checkpoint dict has no 'state_dict': it is not a Lightning or lightning_dl checkpoint.")
    names = checkpoint.get(NAMES_KEY)
    state: dict[str, Any] = {"state_dict": dict(checkpoint["state_dict"])}
    for index, optimizer in enumerate(checkpoint.get("optimizer_states", [])):
        groups = optimizer["param_groups"]
        number: dict[int, Any] = {i: i for g in groups for i in g["params"]}
        if names is not None:
            for g, group_names in zip(groups, names[index], strict=True):
                number.update(zip(g["params"], group_names, strict=True))
        state[f"optimizer_{index}"] = {
            "state": {number[i]: dict(s) for i, s in optimizer["state"].items()},
            "param_groups": [{**g, "params": [number[i] for i in g["params"]]} for g in groups],
        }
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    _dcp_save(state, dst, one=True)
    _write_meta(dst, {k: v for k, v in checkpoint.items() if k not in TENSOR_KEYS}, list(checkpoint["state_dict"]))


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, to: Literal["full", "sharded"]) -> Path:
    """Convert the checkpoint ``src`` (one file or a sharded folder) into ``dst`` (``to="full"``: one file that
    Lightning loads in one process; ``"sharded"``: a folder that loads under any layout). One process, no model
    code. ``dst`` must not exist; it appears only complete (written under a temporary name, then renamed).
    Checkpoints are pickles: convert only files you trust."""
    check_target(dst, to)
    return write_checkpoint(read_checkpoint(src), dst, to=to)


def check_target(dst: str | os.PathLike, to: str, *, name: str = "dst") -> None:
    """Raise when ``to`` is no format or ``dst`` exists (before anything is read)."""
    if to not in FORMATS:
        raise ValueError(f"`to={to!r}` must be one of {FORMATS}.")
    if Path(dst).exists() or Path(dst).is_symlink():
        raise FileExistsError(f"`{name}='{dst}'` exists already: give a new path (nothing is overwritten).")


def read_checkpoint(src: str | os.PathLike, *, name: str = "src") -> dict[str, Any]:
    """The one-process checkpoint dict of ``src``: a file's own, or a sharded folder's :func:`to_full`. Errors name
    the argument ``name``."""
    src = Path(src)
    valid = "a file written by trainer.save_checkpoint or a sharded checkpoint folder"
    if not src.exists():
        raise FileNotFoundError(f"`{name}='{src}'` does not exist: give {valid}.")
    if src.is_dir():
        if not is_sharded(src):
            raise ValueError(f"`{name}='{src}'` is a folder without .metadata and {META_FILE}, not {valid}.")
        return to_full(src)
    try:
        checkpoint = torch.load(src, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(
            f"`{name}='{src}'` is not a checkpoint torch can read ({type(err).__name__}); give {valid}."
        ) from err
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise ValueError(f"`{name}='{src}'` holds no 'state_dict', so it is not {valid}.")
    return dict(checkpoint)


def write_checkpoint(checkpoint: Mapping[str, Any], dst: str | os.PathLike, *, to: str) -> Path:
    """Write a one-process checkpoint dict as one file (``to="full"``) or a sharded folder; ``dst`` appears only
    complete (written under a temporary name in the same folder, then renamed; removed on failure)."""
    check_target(dst, to)
    dst = Path(dst)
    temporary = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex}"
    try:
        if to == "full":
            torch.save(dict(checkpoint), temporary)
        else:
            to_sharded(checkpoint, temporary)
        os.rename(temporary, dst)
    except BaseException:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        else:
            temporary.unlink(missing_ok=True)
        raise
    return dst


# --- the `lightning-dl checkpoint convert` command ----------------------------------------------------------------
def add_cli(commands: Any) -> argparse.ArgumentParser:
    """Add ``checkpoint convert IN OUT --to full|sharded`` to the ``lightning-dl`` subcommands; returns the
    ``convert`` parser (for its errors)."""
    checkpoint = commands.add_parser("checkpoint", help="convert checkpoints between one file and a sharded folder")
    actions = checkpoint.add_subparsers(dest="checkpoint_command", metavar="convert", required=True)
    parser = actions.add_parser(
        "convert",
        help="convert IN to OUT (--to full: one file for one process; --to sharded: a folder for any layout)",
        description="Convert a checkpoint between Lightning's one-file format and the sharded folder that loads "
        "under any parallel layout. One process, no model code needed. Checkpoints are pickles: convert only "
        "files you trust.",
    )
    parser.add_argument("src", metavar="IN", help="a checkpoint file (trainer.save_checkpoint) or a sharded folder")
    parser.add_argument("dst", metavar="OUT", help="the path to write; must not exist")
    parser.add_argument("--to", required=True, choices=FORMATS, help="the format of OUT")
    return parser


def cli_convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run ``lightning-dl checkpoint convert``; bad input exits with code 2 and a message naming IN, OUT or --to."""
    try:
        check_target(args.dst, args.to, name="OUT")
        checkpoint = read_checkpoint(args.src, name="IN")
        write_checkpoint(checkpoint, args.dst, to=args.to)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {args.dst} ({args.to}) from {args.src}")
    return 0
