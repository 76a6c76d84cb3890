"""Parameter averaging across ranks (local SGD) and DiLoCo's outer step: Nesterov-momentum SGD on the averaged
pseudo-gradient ``Δ = θ_start − mean_r θ_r`` (Douillard et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

IN_PLACE_NUMEL = 1 << 16
"""Tensors at least this large are all-reduced in place; smaller ones travel together in one flat buffer."""


def average_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> int:
    """Replace every tensor by its mean over the ranks of ``group``; returns the bytes this rank sent. Large tensors
    are all-reduced in place (no copy into a flat buffer and back), the small ones in one flat all-reduce; every
    collective is issued before any is waited on. With one rank (or no process group) the tensors are unchanged.

    Example::

        >>> average_([torch.ones(3)])  # no process group here: 12 bytes would be sent
        12
    """
    if not tensors:
        return 0
    sent = sum(t.numel() * t.element_size() for t in tensors)
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    if world == 1:
        return sent
    large = [t.detach() for t in tensors if t.numel() >= IN_PLACE_NUMEL and t.is_contiguous()]
    small = [t.detach() for t in tensors if not (t.numel() >= IN_PLACE_NUMEL and t.is_contiguous())]
    flat = torch.cat([t.reshape(-1) for t in small]) if small else None
    works = [dist.all_reduce(t, group=group, async_op=True) for t in large]
    if flat is not None:
        works.append(dist.all_reduce(flat, group=group, async_op=True))
    for work in works:
        work.wait()
    for tensor in large:
        tensor.div_(world)
    if flat is not None:
        flat.div_(world)
        offset = 0
        for tensor in small:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()
    return sent


def outer_step_(
    params: Sequence[torch.Tensor],
    start: Sequence[torch.Tensor],
    momentum: Sequence[torch.Tensor],
    *,
    lr: float,
    mu: float,
    nesterov: bool = True,
) -> None:
    """DiLoCo's outer step, in place. ``params`` hold the averaged local parameters ``θ̄``, ``start`` the
    parameters at the start of the period ``θ₀``, ``momentum`` the outer buffers ``m``:

        Δ = θ₀ − θ̄,  m ← μ·m + Δ,  u = Δ + μ·m (Nesterov) or m,  θ₀ ← θ₀ − lr·u,  params ← θ₀.

    This is ``torch.optim.SGD(lr, momentum=μ, nesterov=True)`` applied to ``θ₀`` with gradient ``Δ``; with
    ``lr = 1`` and ``μ = 0`` the parameters stay the average.

    Example::

        >>> p, s, m = [torch.tensor([1.0])], [torch.tensor([3.0])], [torch.tensor([0.0])]
        >>> outer_step_(p, s, m, lr=0.5, mu=0.5)
        >>> p[0].item(), s[0].item(), m[0].item()
        (1.5, 1.5, 2.0)
    """
    for param, theta0, buf in zip(params, start, momentum, strict=True):
        work = param.detach()  # holds Δ, then the update: the step allocates nothing
        torch.sub(theta0, work, out=work)
        buf.mul_(mu).add_(work)
        if nesterov:
            work.add_(buf, alpha=mu)
        theta0.sub_(work if nesterov else buf, alpha=lr)
        work.copy_(theta0)


def check_sync(sync_every: int, warmup_steps: int = 0) -> None:
    """``sync_every`` (optimizer steps between averages) must be an integer >= 1, ``warmup_steps`` >= 0."""
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"`sync_every` must be an integer >= 1 (optimizer steps between syncs), got {sync_every!r}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be an integer >= 0, got {warmup_steps!r}.")


def check_outer(outer_lr: float, outer_momentum: float) -> None:
    """DiLoCo's outer learning rate must be > 0 and its momentum in [0, 1)."""
    if not (isinstance(outer_lr, int | float) and outer_lr > 0):
        raise ValueError(f"`outer_lr` must be > 0, got {outer_lr!r}.")
    if not (isinstance(outer_momentum, int | float) and 0 <= outer_momentum < 1):
        raise ValueError(f"`outer_momentum` must be in [0, 1), got {outer_momentum!r}.")
