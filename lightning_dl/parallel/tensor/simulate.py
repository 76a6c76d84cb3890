"""Check a candidate Linear pair numerically in one process: run the traced computation between the column-parallel
Linears and the row-parallel one once whole and once per rank on a 1/tp slice of their weights (random weights and
inputs), and compare the sum of the per-rank outputs with the whole. It catches what structure alone cannot: a fused
q/k/v whose rows are not head-major, a ``view`` that uses the global head count."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lightning_dl.parallel.tensor.trace import Level

_UNAVAILABLE = object()


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack += n.all_input_nodes
    return seen


def _fetch(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _run(
    level: Level,
    b_node: fx.Node,
    inputs: dict[fx.Node, torch.Tensor],
    linears: Mapping[fx.Node, tuple[torch.Tensor, torch.Tensor | None]],
) -> Any:
    """Evaluate the ancestors of ``b_node`` with ``inputs`` injected and the given weights for the Linears."""
    assert level.graph is not None
    needed = _ancestors(b_node)
    env: dict[fx.Node, Any] = {}

    def load(arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: env[n])

    for node in level.graph.nodes:
        if node not in needed:
            continue
        if node in inputs:
            env[node] = inputs[node]
            continue
        if node.op == "placeholder" or any(env[a] is _UNAVAILABLE for a in node.all_input_nodes):
            env[node] = _UNAVAILABLE
            continue
        args, kwargs = load(node.args), load(node.kwargs)
        if node in linears:
            weight, bias = linears[node]
            env[node] = F.linear(args[0], weight, bias)
        elif node.op == "get_attr":
            env[node] = _fetch(level.module, str(node.target))
        elif node.op == "call_module":
            env[node] = level.module.get_submodule(str(node.target))(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        else:
            env[node] = node.target(*args, **kwargs)
        if node is b_node:
            break
    return env[b_node]


def check_pair(level: Level, sources: set[fx.Node], b_node: fx.Node, modules: dict[fx.Node, nn.Linear], tp: int) -> str:
    """Empty when splitting ``sources`` column-wise and ``b_node`` row-wise over ``tp`` ranks computes what the whole
    layers compute; otherwise the reason it does not."""
    generator = torch.Generator().manual_seed(0)
    inputs: dict[fx.Node, torch.Tensor] = {}
    for a in sorted(sources, key=lambda n: n.name):
        x = a.args[0]
        if isinstance(x, fx.Node) and x not in inputs:
            inputs[x] = torch.randn(2, 5, modules[a].in_features, generator=generator)
    weights = {}
    for node in [*sorted(sources, key=lambda n: n.name), b_node]:
        m = modules[node]
        bias = torch.randn(m.out_features, generator=generator) if m.bias is not None else None
        weights[node] = (torch.randn(m.out_features, m.in_features, generator=generator) / m.in_features**0.5, bias)
    try:
        with torch.no_grad():
            whole = _run(level, b_node, inputs, weights)
            if whole is _UNAVAILABLE:
                return "its computation needs inputs other than the hidden states, so it cannot be checked"
            parts = []
            for rank in range(tp):
                sliced = {}
                for node, (w, b) in weights.items():
                    if node is b_node:
                        cols = w.shape[1] // tp
                        sliced[node] = (w[:, rank * cols : (rank + 1) * cols], b if rank == 0 else None)
                    else:
                        rows = w.shape[0] // tp
                        part = slice(rank * rows, (rank + 1) * rows)
                        sliced[node] = (w[part], None if b is None else b[part])
                parts.append(_run(level, b_node, inputs, sliced))
            summed = parts[0]
            for part in parts[1:]:
                summed = operator.add(summed, part)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        message = str(err).strip().splitlines()[0][:100] if str(err).strip() else type(err).__name__
        return f"a 1/{tp} slice of the weights does not run ({message})"
    if summed.shape != whole.shape or not torch.allclose(summed, whole, rtol=1e-4, atol=1e-4):
        return f"a 1/{tp} slice of the weights computes something else (fused projections not laid out by heads?)"
    return ""
