"""The automatic plan in one process: pairs follow execution order, attention is split by heads only where a 1/tp
slice computes its share, everything else stays replicated with a reason; dict plans are validated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_dl.nn import MLP, TransformerLM
from lightning_dl.parallel.tensor import auto_plan, explain_plan, plan_from_dict
from tests.parallel.tensor.models import build


def _styles(model: nn.Module, tp: int = 2, **kwargs) -> dict[str, str]:
    return {e.name: e.style for e in auto_plan(model, tp, **kwargs).entries}


class Reversed(nn.Module):
    """Registered ``out`` before ``up``, computed ``up`` first; a residual joins before ``last``."""

    def __init__(self) -> None:
        super().__init__()
        self.out, self.up, self.last = nn.Linear(16, 8), nn.Linear(8, 16), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.out(torch.relu(self.up(x)))
        return self.last(h)


class Attention(nn.Module):
    """Fused q/k/v ``head_major`` (as TransformerLM) or stacked q, k, v (a contiguous split mixes them);
    ``global_view`` reshapes with the whole model's head count."""

    def __init__(self, *, head_major: bool, global_view: bool = False, n_heads: int = 4) -> None:
        super().__init__()
        self.n_heads, self.head_major, self.global_view = n_heads, head_major, global_view
        self.qkv, self.proj = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.n_heads if self.global_view else -1
        if self.head_major:
            q, k, v = self.qkv(x).unflatten(-1, (heads, 3, 16 // self.n_heads)).transpose(1, 2).unbind(3)
        else:
            q, k, v = self.qkv(x).chunk(3, -1)
            q, k, v = (t.unflatten(-1, (heads, 16 // self.n_heads)).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).flatten(-2))


def test_pairs_follow_execution_order_not_registration_order() -> None:
    plan = auto_plan(Reversed(), tp=2)
    assert _styles(Reversed()) == {"out": "rowwise", "up": "colwise", "last": "replicate"}
    assert (
        plan["last"].reason
        == "its input comes through add in the model.forward, which also takes the input of the model"
    )


def test_norm_between_linears_and_indivisible_width_stay_replicated() -> None:
    assert set(_styles(MLP(8, [16, 16], 4, norm="layer")).values()) == {"replicate"}
    assert auto_plan(MLP(8, [16, 16], 4, norm="layer"), 2)["3"].reason == "its input comes through 1 (LayerNorm)"
    plan = auto_plan(MLP(8, [15], 4), tp=2)
    assert plan["2"].reason == "in_features=15 is not divisible by tp=2"
    assert plan["0"].reason == "pair with 2 refused: in_features=15 is not divisible by tp=2"


def test_mlp_and_swiglu_pairs() -> None:
    assert _styles(MLP(8, [16, 16], 4)) == {"0": "colwise", "2": "rowwise", "4": "replicate"}
    assert _styles(build("swiglu")) == {"0.w1": "colwise", "0.w3": "colwise", "0.w2": "rowwise", "1": "replicate"}


def test_attention_split_by_heads_only_where_a_slice_computes_its_share() -> None:
    assert _styles(Attention(head_major=True)) == {"qkv": "colwise", "proj": "rowwise"}
    stacked = auto_plan(Attention(head_major=False), tp=2)
    assert stacked["proj"].style == "replicate" and "computes something else" in stacked["proj"].reason
    global_view = auto_plan(Attention(head_major=True, global_view=True), tp=2)
    assert "does not run" in global_view["proj"].reason
    odd = auto_plan(TransformerLM(16, 8, 24, 1, 3), tp=2)
    assert odd["blocks.0.attn.proj"].reason == "n_heads=3 is not divisible by tp=2"
    assert odd["blocks.0.attn.qkv"].reason.startswith("pair with blocks.0.attn.proj refused")


def test_library_models_are_planned() -> None:
    encoder = _styles(build("torch_encoder"))
    assert encoder["layers.1.self_attn"] == "heads"
    assert (encoder["layers.1.linear1"], encoder["layers.1.linear2"]) == ("colwise", "rowwise")
    demo = auto_plan(build("lightning_demo"), tp=2)
    assert demo["transformer.decoder.layers.0.multihead_attn"].style == "heads"
    assert demo["decoder"].reason.startswith("the model.forward could not be traced")
    assert auto_plan(nn.MultiheadAttention(15, 3), tp=2)[""].reason == "num_heads=3 is not divisible by tp=2"


def test_loss_parallel_splits_the_vocabulary_and_keeps_ties() -> None:
    model = TransformerLM(16, 8, 32, 1, 4)
    model.head[1].weight = model.embed.token.weight
    styles = _styles(model, loss_parallel=True)
    assert (styles["embed.token"], styles["head.1"], styles["embed.position"]) == ("vocab", "vocab_head", "replicate")
    # a tie split two ways is refused as a whole
    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    tied[2].weight = tied[0].weight
    plan = auto_plan(tied, tp=2)
    assert {e.style for e in plan.entries} == {"replicate"}
    assert "weight tied with" in plan["0"].reason


def test_loss_parallel_needs_an_output_head() -> None:
    with pytest.raises(ValueError, match=r"`loss_parallel=True` needs an output head .* no Linear returns"):
        auto_plan(build("lightning_demo"), tp=2, loss_parallel=True)
    with pytest.raises(ValueError, match=r"out_features=5, not divisible by tp=2"):
        auto_plan(MLP(8, [16], 5), tp=2, loss_parallel=True)


def test_explain_plan_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    explain_plan(MLP(8, [16], 4), tp=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["module", "type", "style", "sharded", "dim", "reason"]
    assert lines[1].split()[:4] == ["0", "Linear", "colwise", "out"]
    assert lines[-1] == "tp=2: 2 of 2 layers sharded"


@pytest.mark.parametrize(
    ("plan", "match"),
    [
        ({"blocks.9.mlp": "colwise"}, r"`plan` names 'blocks.9.mlp', which is not a submodule of TransformerLM"),
        ({"blocks.0.mlp.fc1": "diagonal"}, r"`plan\['blocks.0.mlp.fc1'\]='diagonal'` is not a style; valid"),
        ({"blocks.0.norm1": "colwise"}, r"'colwise' splits an nn.Linear or nn.Embedding, not LayerNorm"),
        ({"blocks.0.mlp": "sequence"}, r"'sequence' runs a LayerNorm, RMSNorm or Dropout .* not FeedForward"),
        ({"blocks.0.attn.qkv": "colwise"}, r"n_heads=3 of blocks.0.attn is not divisible by tp=2"),
        ({"head.1": "colwise"}, r"out_features=15 is not divisible by tp=2"),
    ],
)
def test_dict_plan_errors(plan: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_from_dict(TransformerLM(15, 8, 24, 1, 3), plan, tp=2)


def test_auto_plan_rejects_a_bad_degree() -> None:
    with pytest.raises(ValueError, match=r"`tp=0` must be a positive integer"):
        auto_plan(MLP(8, [16], 4), tp=0)


def test_sequence_parallel_splits_the_blocks_between_the_pairs() -> None:
    styles = _styles(TransformerLM(16, 8, 32, 2, 4), sequence_parallel=True)
    assert (styles["blocks.0"], styles["blocks.1"]) == ("sequence_enter", "sequence_exit")
    assert (styles["blocks.0.norm2"], styles["blocks.0.mlp.fc1"], styles["blocks.0.mlp.fc2"]) == (
        "sequence",
        "colwise_seq",
        "rowwise_seq",
    )
    assert "head.0" not in styles  # the final norm is outside the blocks: it sees the whole sequence


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("torch_encoder", r"cannot split the blocks of layers: layers.0.self_attn is a MultiheadAttention"),
        ("mlp", r"`sequence_parallel=True` needs a list of blocks .* each holding a Linear pair"),
    ],
)
def test_sequence_parallel_refused_where_it_would_not_be_exact(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        auto_plan(build(name), tp=2, sequence_parallel=True)
