"""TransformerLM: causal, its pipeline blocks compose to forward, stable names of the Linear pairs, errors."""

import pytest
import torch

from lightning_dl.nn import TransformerLM


def _model(**kwargs) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(vocab_size=12, block_size=10, d_model=32, n_layers=2, n_heads=4, **kwargs)


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_causal_future_tokens_do_not_change_earlier_logits(norm) -> None:
    model = _model(norm=norm).eval()
    idx = torch.randint(0, 12, (2, 10))
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 12
    torch.testing.assert_close(model(idx)[:, :6], model(changed)[:, :6])
    assert not torch.allclose(model(idx)[:, 6:], model(changed)[:, 6:])


def test_pipeline_blocks_compose_to_forward() -> None:
    model = _model().eval()
    idx = torch.randint(0, 12, (3, 7))
    x = idx
    for block in model.pipeline_blocks():
        x = block(x)
    torch.testing.assert_close(x, model(idx))
    assert len(model.pipeline_blocks()) == 2 + 2


def test_linear_pairs_have_stable_names() -> None:
    names = {name for name, module in _model().named_modules() if isinstance(module, torch.nn.Linear)}
    for i in range(2):
        assert {f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2"} <= names
    assert "head.1" in names


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"d_model": 30}, r"`d_model` \(30\) must be divisible by `n_heads` \(4\)"),
        ({"norm": "batch"}, r"`norm` must be one of \('layer', 'rms'\) for TransformerLM, got 'batch'"),
        ({"n_layers": 0}, r"`n_layers` must be >= 1, got 0"),
    ],
)
def test_invalid_values(kwargs, match) -> None:
    args = dict(vocab_size=12, block_size=10, d_model=32, n_layers=2, n_heads=4) | kwargs
    with pytest.raises(ValueError, match=match):
        TransformerLM(**args)


def test_too_long_a_sequence_is_an_error() -> None:
    with pytest.raises(ValueError, match="sequence of 11 tokens exceeds `block_size` 10"):
        _model()(torch.zeros(1, 11, dtype=torch.long))


def test_attention_rows_are_head_major() -> None:
    """Literal transcription: rows of ``qkv`` are (head, q/k/v, head_dim), so a split of the rows is a split of the
    heads (tensor parallelism relies on it)."""
    from lightning_dl.nn.transformer import CausalSelfAttention

    torch.manual_seed(0)
    attn, heads, head_dim = CausalSelfAttention(12, 3), 3, 4
    x = torch.randn(2, 5, 12)
    weight, bias = attn.qkv.weight.view(heads, 3, head_dim, 12), attn.qkv.bias.view(heads, 3, head_dim)
    q, k, v = (torch.einsum("bld,hed->bhle", x, weight[:, i]) + bias[:, i, None, :] for i in range(3))
    scores = q @ k.transpose(-1, -2) / head_dim**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(5, 5, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 12)
    torch.testing.assert_close(attn(x), attn.proj(y))
