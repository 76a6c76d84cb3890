"""The automatic tensor-parallel plan: Megatron's Linear pairs and attention heads found in the traced execution
order, vocabulary-parallel embeddings and output head with ``loss_parallel``, tied weights kept tied, and a reason
for every layer left replicated."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from lightning_dl.parallel.tensor.attention import check_mha
from lightning_dl.parallel.tensor.plan import PlanEntry, TPPlan, kind_of
from lightning_dl.parallel.tensor.sequence import plan_sequence_parallel
from lightning_dl.parallel.tensor.simulate import check_pair
from lightning_dl.parallel.tensor.trace import Level, classify, describe, is_size_node, module_of, trace_levels

HEAD_ATTRIBUTES = ("n_heads", "num_heads", "n_head", "nhead", "num_attention_heads")
KV_HEAD_ATTRIBUTES = ("n_kv_heads", "num_key_value_heads", "n_kv_head", "num_kv_heads")
PLACEMENT = {"colwise": 0, "vocab": 0, "vocab_head": 0, "rowwise": 1}


def _linear_calls(level: Level) -> dict[fx.Node, nn.Linear]:
    assert level.graph is not None
    return {n: m for n in level.graph.nodes if isinstance(m := module_of(level, n), nn.Linear)}


def _walk(
    level: Level, b_node: fx.Node, linears: dict[fx.Node, nn.Linear], visited: set[fx.Node]
) -> tuple[set[fx.Node], set[str], str]:
    """From the input of Linear ``b_node`` back to the Linears that produce it: (sources, kinds of the operations
    passed, reason it is not a pair or ""); ``visited`` receives the nodes passed."""
    sources: set[fx.Node] = set()
    kinds: set[str] = set()
    stack: list[tuple[fx.Node, fx.Node | None]] = [(a, None) for a in b_node.all_input_nodes if not is_size_node(a)]
    while stack:
        node, parent = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        if node in linears:
            sources.add(node)
            continue
        kind = classify(level, node)
        if kind is None:
            if parent is not None and classify(level, parent) == "product":
                joined = f"{describe(level, parent)}, which also takes {describe(level, node)}"
                return sources, kinds, f"its input comes through {joined}"
            return sources, kinds, f"its input comes through {describe(level, node)}"
        kinds.add(kind)
        stack += [(a, node) for a in node.all_input_nodes if not is_size_node(a)]
    if not sources:
        return sources, kinds, "no Linear feeds it"
    if "external" in kinds and "attention" not in kinds:
        return sources, kinds, "a parameter or buffer joins its input"
    for node in visited:
        for user in node.users:
            if user not in visited and user is not b_node and not is_size_node(user):
                return sources, kinds, f"{describe(level, node)} also feeds {describe(level, user)}"
    return sources, kinds, ""


def _forward_reason(level: Level, node: fx.Node) -> str:
    """Why a Linear is not the first half of a pair: where its output goes before reaching any Linear."""
    while True:
        users = [u for u in node.users if not is_size_node(u)]
        if len(users) != 1:
            return f"its output feeds {len(users)} operations" if users else "its output is not used"
        node = users[0]
        if classify(level, node) != "elementwise":
            return f"its output goes to {describe(level, node)}"


def _heads_reason(module: nn.Module, tp: int) -> str:
    for names in (HEAD_ATTRIBUTES, KV_HEAD_ATTRIBUTES):
        for attr in names:
            value = getattr(module, attr, None)
            if isinstance(value, int) and value % tp:
                return f"{attr}={value} is not divisible by tp={tp}"
    return ""


class _Planner:
    def __init__(self, model: nn.Module, tp: int, loss_parallel: bool, sequence_parallel: bool) -> None:
        self.model, self.tp, self.loss_parallel, self.sequence_parallel = model, tp, loss_parallel, sequence_parallel
        self.cones: dict[str, set[fx.Node]] = {}
        self.levels = trace_levels(model)
        self.by_name = {level.name: level for level in self.levels}
        self.styles: dict[str, tuple[str, str]] = {}  # name -> (style, reason)
        self.partners: dict[str, list[str]] = {}
        self.order: list[str] = []

    def _set(self, name: str, style: str, reason: str) -> None:
        if name not in self.order:
            self.order.append(name)
        self.styles[name] = (style, reason)

    def output_head(self) -> str | None:
        """The Linear whose output is the model's output (through modules that return it unchanged)."""
        level = self.by_name.get("")
        while level is not None and level.graph is not None:
            output = next(n for n in level.graph.nodes if n.op == "output")
            node = output.args[0]
            if not isinstance(node, fx.Node) or node.op != "call_module":
                return None
            name = level.qualname(str(node.target))
            if isinstance(self.model.get_submodule(name), nn.Linear):
                return name
            level = self.by_name.get(name)
        return None

    def pairs(self, level: Level) -> None:
        linears = _linear_calls(level)
        calls: dict[str, int] = {}
        for node in linears:
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        failed: dict[str, str] = {}
        for b_node, b in linears.items():
            b_name = level.qualname(str(b_node.target))
            if b_name in self.styles:
                continue
            if calls[str(b_node.target)] > 1:
                failed[b_name] = f"called {calls[str(b_node.target)]} times in one forward"
                continue
            cone: set[fx.Node] = set()
            sources, kinds, reason = _walk(level, b_node, linears, cone)
            walk_reason = reason
            if reason.startswith("its input comes through the input"):
                failed[b_name] = _forward_reason(level, b_node)
            a_names = [level.qualname(str(a.target)) for a in sources]
            if not reason:
                taken = [n for n in a_names if n in self.styles]
                reused = [level.qualname(str(a.target)) for a in sources if calls[str(a.target)] > 1]
                if taken or reused:
                    reason = f"its input comes from {(taken or reused)[0]}, which is already planned or reused"
            if not reason and any(linears[a].out_features % self.tp for a in sources):
                reason = f"in_features={b.in_features} is not divisible by tp={self.tp}"
            attention = "attention" in kinds
            if not reason and attention:
                reason = _heads_reason(level.module, self.tp)
            if not reason and kinds - {"elementwise", "product"}:
                reason = check_pair(level, sources, b_node, linears, self.tp)
            if reason:
                failed.setdefault(b_name, reason)
                if sources and not walk_reason:
                    for a_name in a_names:
                        failed[a_name] = f"pair with {b_name} refused: {reason}"
                continue
            what = "attention heads" if attention else "pair"
            for a_name in sorted(a_names):
                self._set(a_name, "colwise", f"{what} with {b_name}")
            self._set(b_name, "rowwise", f"{what} with {', '.join(sorted(a_names))}")
            for name in (*a_names, b_name):
                self.partners[name] = [*a_names, b_name]
            self.cones.setdefault(level.name, set()).update(cone | {b_node})
        for name, reason in failed.items():
            if name not in self.styles:
                self._set(name, "replicate", reason)

    def plan(self) -> TPPlan:
        head = self.output_head() if self.loss_parallel else None
        if self.loss_parallel:
            module = None if head is None else self.model.get_submodule(head)
            if not isinstance(module, nn.Linear) or module.out_features % self.tp:
                found = "no Linear returns the model's output" if module is None else f"{head} has out_features="
                found += "" if module is None else f"{module.out_features}, not divisible by tp={self.tp}"
                raise ValueError(
                    f"`loss_parallel=True` needs an output head to split along the vocabulary (an nn.Linear whose "
                    f"output is the model's output, out_features divisible by tp={self.tp}), but {found}. "
                    "Set loss_parallel=False."
                )
            assert head is not None
            self._set(head, "vocab_head", "output head, logits split along the vocabulary (loss_parallel)")
        for level in self.levels:
            if level.graph is not None:
                self.pairs(level)
        for name, module in self.model.named_modules():
            if name in self.styles:
                continue
            if isinstance(module, nn.MultiheadAttention):
                reason = check_mha(module, self.tp)
                self._set(name, "replicate" if reason else "heads", reason or "attention split by heads")
            elif isinstance(module, nn.Embedding):
                self._set(name, *self._embedding(module, head))
            elif isinstance(module, nn.Linear) and not self._inside_mha(name):
                self._set(name, "replicate", self._untraced_reason(name))
        self._keep_ties()
        if self.sequence_parallel:
            for name, (style, reason) in plan_sequence_parallel(
                self.model, self.levels, self.styles, self.cones
            ).items():
                self._set(name, style, reason)
        entries = [PlanEntry(n, kind_of(self.model.get_submodule(n)), *self.styles[n]) for n in self._ordered()]
        return TPPlan(self.tp, entries, loss_parallel=self.loss_parallel, sequence_parallel=self.sequence_parallel)

    def _ordered(self) -> list[str]:
        rank = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        return sorted(self.order, key=rank.__getitem__)

    def _embedding(self, module: nn.Embedding, head: str | None) -> tuple[str, str]:
        if head is None:
            return "replicate", "vocabulary-parallel embeddings come with loss_parallel=True"
        vocab = self.model.get_submodule(head).out_features
        if module.num_embeddings != vocab:
            return "replicate", f"num_embeddings={module.num_embeddings} is not the vocabulary ({vocab})"
        return "vocab", "embedding split along the vocabulary"

    def _inside_mha(self, name: str) -> bool:
        parent = name.rpartition(".")[0]
        return isinstance(self.model.get_submodule(parent), nn.MultiheadAttention) if name else False

    def _untraced_reason(self, name: str) -> str:
        parent = self.by_name.get(name.rpartition(".")[0])
        if parent is not None and parent.graph is None:
            return f"{parent.name or 'the model'}.forward could not be traced ({parent.error})"
        return "not called by a traced forward"

    def _keep_ties(self) -> None:
        """Modules sharing one weight must shard it the same way; otherwise they (and their partners) replicate."""
        owners: dict[int, list[str]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and name in self.styles:
                owners.setdefault(id(weight), []).append(name)
        changed = True
        while changed:
            changed = False
            for names in owners.values():
                names = list(dict.fromkeys(names))
                dims = {PLACEMENT.get(self.styles[n][0]) for n in names}
                if len(names) > 1 and len(dims) > 1:
                    for name in names:
                        for member in self.partners.get(name, [name]):
                            if self.styles[member][0] != "replicate":
                                others = ", ".join(n for n in names if n != name)
                                self._set(member, "replicate", f"weight tied with {others}, split differently")
                                changed = True


def auto_plan(model: nn.Module, tp: int, *, loss_parallel: bool = False, sequence_parallel: bool = False) -> TPPlan:
    """Find the tensor-parallel plan of ``model`` for ``tp`` ranks, without processes. With ``sequence_parallel``
    the block list also runs split along the sequence between the pairs (:func:`plan_sequence_parallel`).

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 4))
        >>> [(e.name, e.style) for e in auto_plan(net, tp=2).entries]
        [('0', 'colwise'), ('2', 'rowwise'), ('4', 'replicate')]
        >>> auto_plan(net, tp=2)["4"].reason
        'its input comes through 3 (LayerNorm)'
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"`tp={tp!r}` must be a positive integer (the tensor-parallel degree).")
    return _Planner(model, tp, loss_parallel, sequence_parallel).plan()
