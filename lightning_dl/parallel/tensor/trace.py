"""Execution-order graphs of a model, one per module: ``torch.fx`` traces each module's ``forward`` with its children
as leaves, so a graph shows how the data flows between the direct children (and the functions between them) in
the order the model computes, whatever the order the children were registered in."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.Mish, nn.LeakyReLU, nn.ELU,
    nn.Softplus, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.CELU, nn.SELU,
)  # fmt: skip
ELEMENTWISE_FUNCTIONS = {
    F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.dropout, F.mish, F.leaky_relu, F.elu, F.softplus, F.relu6,
    F.hardswish, F.selu, F.celu, torch.relu, torch.tanh, torch.sigmoid, torch.nn.functional.hardtanh,
}  # fmt: skip
ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}
PRODUCTS = {operator.mul, torch.mul, operator.add, torch.add, operator.sub, operator.truediv}
PRODUCT_METHODS = {"mul", "add", "sub", "div"}
SHAPE_METHODS = {
    "view", "reshape", "transpose", "permute", "split", "chunk", "unbind", "flatten", "unflatten", "unsqueeze",
    "squeeze", "type_as", "float", "to", "masked_fill", "softmax",
}  # fmt: skip
SHAPE_FUNCTIONS = {
    operator.getitem, torch.transpose, torch.reshape, torch.flatten, torch.split, torch.chunk, torch.unbind,
    torch.permute, torch.unflatten,
}  # fmt: skip
ATTENTION_FUNCTIONS = {
    F.scaled_dot_product_attention,
    torch.matmul,
    operator.matmul,
    torch.bmm,
    F.softmax,
    torch.softmax,
}
SIZE_METHODS = {"size", "dim"}


@dataclass
class Level:
    """One module's traced ``forward`` (``graph`` None and ``error`` set when it could not be traced)."""

    name: str
    module: nn.Module
    graph: fx.Graph | None
    error: str = ""

    def qualname(self, target: str) -> str:
        return f"{self.name}.{target}" if self.name else target


class _ChildrenAsLeaves(fx.Tracer):
    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._root = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._root


def _defaults(module: nn.Module) -> dict[str, object]:
    """Optional arguments of ``forward`` fixed at their defaults (masks left out), so their checks trace."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


@contextmanager
def tracing_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout traced as the identity) and no MultiheadAttention fast path (it branches on tensors)."""
    modes = [(m, m.training) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    model.eval()
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training in modes:
            m.training = training


def trace_levels(model: nn.Module) -> list[Level]:
    """A ``Level`` for every module that has children, in ``named_modules`` order (MultiheadAttention excluded: it is
    recognised by type)."""
    levels = []
    with tracing_mode(model):
        for name, module in model.named_modules():
            if next(module.children(), None) is None or isinstance(module, nn.MultiheadAttention):
                continue
            try:
                graph = _ChildrenAsLeaves(module).trace(module, concrete_args=_defaults(module))
            except Exception as err:  # any failure means "not traceable", reported as the reason
                message = str(err).strip().splitlines()[0] if str(err).strip() else ""
                levels.append(Level(name, module, None, f"{type(err).__name__}: {message[:80]}"))
                continue
            levels.append(Level(name, module, graph))
    return levels


def is_size_node(node: fx.Node) -> bool:
    """Nodes that compute shapes (``x.shape``, ``x.size(0)`` and arithmetic on them), not tensor data."""
    if node.op == "call_method" and node.target in SIZE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",)):
        return True
    if node.op == "call_function" and node.target in (operator.getitem, operator.floordiv, operator.mul):
        inputs = node.all_input_nodes
        return bool(inputs) and all(is_size_node(n) for n in inputs)
    return False


def module_of(level: Level, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return level.module.get_submodule(str(node.target))


def classify(level: Level, node: fx.Node) -> str | None:
    """What a node does to the features flowing through it: ``elementwise``, ``product`` (of two operands),
    ``shape``, ``attention``, ``external`` (a parameter or buffer), or None (anything else: it blocks a pair)."""
    module = module_of(level, node)
    if module is not None:
        return "elementwise" if isinstance(module, ELEMENTWISE_MODULES) else None
    if node.op == "get_attr":
        return "external"
    if node.op == "call_function":
        if node.target in ELEMENTWISE_FUNCTIONS:
            return "elementwise"
        if node.target in PRODUCTS:
            return "product"
        if node.target in ATTENTION_FUNCTIONS:
            return "attention"
        if node.target in SHAPE_FUNCTIONS:
            return "shape"
    if node.op == "call_method":
        if node.target in ELEMENTWISE_METHODS:
            return "elementwise"
        if node.target in PRODUCT_METHODS:
            return "product"
        if node.target == "softmax":
            return "attention"
        if node.target in SHAPE_METHODS:
            return "shape"
    return None


def describe(level: Level, node: fx.Node) -> str:
    """A short human name for a node in a reason."""
    if node.op == "call_module":
        return f"{level.qualname(str(node.target))} ({type(module_of(level, node)).__name__})"
    if node.op == "placeholder":
        return f"the input of {level.name or 'the model'}"
    if node.op == "output":
        return f"the output of {level.name or 'the model'}"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{target} in {level.name or 'the model'}.forward"
