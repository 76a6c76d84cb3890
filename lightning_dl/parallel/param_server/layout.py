"""How the parameters are split across parameter-server shards (Downpour's sharded server): whole tensors, each
to the shard with the fewest elements so far, largest first, so every shard runs an exact optimizer on its own."""

from __future__ import annotations

from collections.abc import Sequence


def assign_shards(numels: Sequence[int], num_servers: int) -> list[int]:
    """The shard of each parameter tensor, given their sizes.

    Example::

        >>> assign_shards([100, 10, 60, 50], num_servers=2)
        [0, 0, 1, 1]
    """
    if num_servers < 1:
        raise ValueError(f"`num_servers` must be >= 1, got {num_servers!r}.")
    if num_servers > len(numels):
        raise ValueError(
            f"`num_servers={num_servers}` exceeds the {len(numels)} parameter tensors of the model; each server "
            "owns whole tensors, so use at most that many."
        )
    load = [0] * num_servers
    shard = [0] * len(numels)
    for index in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        target = min(range(num_servers), key=lambda s: (load[s], s))
        shard[index] = target
        load[target] += numels[index]
    return shard


def shard_indices(shards: Sequence[int], num_servers: int) -> list[list[int]]:
    """The parameter indices each shard owns, in model order."""
    return [[i for i, s in enumerate(shards) if s == server] for server in range(num_servers)]
