"""Sharded checkpoints keyed by the plain module's names, so that a checkpoint written under one parallel layout
loads under any other (pipeline stages, DTensor shards, FSDP2, replicas, one process), and a converter between
that sharded folder and Lightning's one-file checkpoint that needs no model code. Torch only.

On disk a sharded checkpoint is the folder Lightning's ``ModelParallelStrategy`` writes, read by
``torch.distributed.checkpoint`` (DCP):

``<path>/.metadata``, ``<path>/__<rank>_<n>.distcp``
    DCP's index and data. Keys: ``state_dict.<name>`` for every entry of the whole module's ``state_dict()``;
    ``optimizer_<i>.state.<param name>.<key>`` (``exp_avg``, ``step``, ``momentum_buffer``...) for optimizer ``i``;
    ``optimizer_<i>.param_groups.<g>.<hyper-parameter>`` with ``params``: the names of group ``g``'s parameters in
    the whole model's optimizer order. A tensor is stored once, whatever the layout that wrote it (DCP keeps one copy
    of replicated entries and the chunks of sharded ones), and read back cut to the reader's own layout.
``<path>/meta.pt``
    ``torch.save`` of the rest of Lightning's checkpoint dict (``epoch``, ``global_step``, ``loops``, ``callbacks``,
    ``lr_schedulers``, ``hyper_parameters``...), plus ``"lightning_dl": {"format": FORMAT, "state_dict_keys": [...]}``
    (the whole model's key order). Written last: a folder without it is no checkpoint.

Optimizer state is keyed by parameter name, so it does not depend on which rank held which parameter. A folder
converted from a one-file checkpoint that carries no names (``"optimizer_param_names"``, written by :func:`to_full`)
keys it by the whole model's flat index instead (``params`` are integers); loading it under a split layout then needs
``optimizer_names``, the whole model's parameter names per param group.

API:

- :func:`save_sharded` (a collective) and :func:`load_sharded` (each rank reads only what it holds);
- :func:`is_sharded`, :func:`read_extra`;
- :func:`to_full` (one process: the folder as Lightning's one-process dict), :func:`to_sharded` (one process: a
  one-file dict as a folder), :func:`convert` (file or folder to file or folder, never a half-written output; built
  from :func:`read_checkpoint` and :func:`write_checkpoint`);
- :func:`add_cli` and :func:`cli_convert`: the ``lightning-dl checkpoint convert IN OUT --to full|sharded`` command.

Example (one process; under a layout every rank makes the same calls)::

    >>> import tempfile, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    >>> opt = torch.optim.Adam(model.parameters())
    >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> folder = tempfile.mkdtemp() + "/ckpt"
    >>> save_sharded(folder, model, [opt], {"global_step": 1})
    >>> is_sharded(folder), sorted(to_full(folder))
    (True, ['global_step', 'optimizer_param_names', 'optimizer_states', 'state_dict'])
    >>> other = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    >>> other_opt = torch.optim.Adam(other.parameters())
    >>> load_sharded(folder, other, [other_opt])["global_step"]
    1
    >>> torch.equal(other[1].weight, model[1].weight), other_opt.state_dict()["state"][0]["step"].item()
    (True, 1.0)
"""

from lightning_dl.parallel.checkpoint.conversion import (
    add_cli,
    check_target,
    cli_convert,
    convert,
    read_checkpoint,
    to_full,
    to_sharded,
    write_checkpoint,
)
from lightning_dl.parallel.checkpoint.sharded import (
    FORMAT,
    FORMATS,
    META_FILE,
    NAMES_KEY,
    TENSOR_KEYS,
    is_sharded,
    load_sharded,
    optimizer_names,
    read_extra,
    save_sharded,
)

__all__ = [
    "FORMAT",
    "FORMATS",
    "META_FILE",
    "NAMES_KEY",
    "TENSOR_KEYS",
    "add_cli",
    "check_target",
    "cli_convert",
    "convert",
    "is_sharded",
    "load_sharded",
    "optimizer_names",
    "read_checkpoint",
    "read_extra",
    "save_sharded",
    "to_full",
    "to_sharded",
    "write_checkpoint",
]
