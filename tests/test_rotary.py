"""orpo_cli.kernels.rotary: RoPE as one autograd function, bit for bit the model's own."""

from __future__ import annotations

import sys

import pytest
import torch

from orpo_cli.kernels import rotary


def _llama(**overrides: object) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = dict(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=64, pad_token_id=0)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config))


def _angles(model: torch.nn.Module, position_ids: torch.Tensor, dtype: torch.dtype):
    x = torch.zeros(1, dtype=dtype)
    return model.model.rotary_emb(x, position_ids)


@pytest.fixture
def original(monkeypatch: pytest.MonkeyPatch):
    """Llama's own function; the modeling module's name is put back after the test."""
    from transformers.models.llama import modeling_llama

    function = modeling_llama.apply_rotary_pos_emb
    function = getattr(function, rotary._ORIGINAL, function)
    monkeypatch.setitem(vars(modeling_llama), "apply_rotary_pos_emb", function)
    return function


@pytest.fixture
def inside(monkeypatch: pytest.MonkeyPatch) -> None:
    """As inside the forward of an attention module that fuse_rotary marked: the dispatcher may take the fused path."""
    monkeypatch.setattr(rotary._INSIDE, "depth", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_gradients_are_the_model_s_bit_for_bit(original, inside, dtype: torch.dtype) -> None:
    model = _llama()
    # Packed positions (two sequences in one row, a third in the other) and GQA heads, q and k as the
    # attention makes them: a [rows, W, heads, d] projection viewed as [rows, heads, W, d].
    positions = torch.tensor([list(range(7)) + list(range(6)), list(range(13))])
    cos, sin = _angles(model, positions, dtype)
    torch.manual_seed(1)
    q_rows = torch.randn(2, 13, 6, 8, dtype=dtype, requires_grad=True)
    k_rows = torch.randn(2, 13, 2, 8, dtype=dtype, requires_grad=True)
    grads = torch.randn(2, 6, 13, 8, dtype=dtype), torch.randn(2, 2, 13, 8, dtype=dtype)

    def run(function):
        q, k = function(q_rows.transpose(1, 2), k_rows.transpose(1, 2), cos, sin)
        return q, k, *torch.autograd.grad((q, k), (q_rows, k_rows), grads)

    calls = []
    apply = rotary._Rotary.apply
    fused = rotary._dispatcher(original)
    try:
        rotary._Rotary.apply = lambda *a: calls.append(1) or apply(*a)
        got = run(fused)
    finally:
        rotary._Rotary.apply = apply
    expected = run(original)
    assert calls == [1]
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert got[2].abs().sum() > 0


def test_the_model_s_own_function_where_the_fused_one_does_not_apply(original, inside, monkeypatch) -> None:
    calls = []
    apply = rotary._Rotary.apply
    fused = rotary._dispatcher(original)
    q, k = torch.randn(1, 4, 5, 8, requires_grad=True), torch.randn(1, 2, 5, 8, requires_grad=True)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    try:
        rotary._Rotary.apply = lambda *a: calls.append(1) or apply(*a)
        with torch.no_grad():  # inference: nothing to keep
            fused(q, k, cos, sin)
        fused(q, k, cos.double(), sin.double())  # mixed dtypes
        fused(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)  # another layout
        fused(q.detach(), k.detach(), cos, sin)  # no gradient wanted
        monkeypatch.setattr(rotary._INSIDE, "depth", 0)
        fused(q, k, cos, sin)  # outside a marked attention module: another model's call
        assert calls == []
        monkeypatch.setattr(rotary._INSIDE, "depth", 1)
        fused(q, k, cos, sin)
        assert calls == [1]
    finally:
        rotary._Rotary.apply = apply


def test_a_model_trains_to_the_same_numbers_through_it(original) -> None:
    from transformers.models.llama import modeling_llama

    model = _llama()
    ids = torch.randint(1, 96, (2, 11))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, labels=ids).loss
    expected = torch.autograd.grad(loss, params)
    assert rotary.fuse_rotary(model) == 2 and rotary.fuse_rotary(model) == 2  # idempotent: one dispatcher
    dispatcher = vars(modeling_llama)["apply_rotary_pos_emb"]
    assert getattr(dispatcher, rotary._ORIGINAL) is original
    fused_loss = model(input_ids=ids, labels=ids).loss
    got = torch.autograd.grad(fused_loss, params)
    assert torch.equal(fused_loss, loss)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    rotary.unfuse_rotary(model)
    assert vars(modeling_llama)["apply_rotary_pos_emb"] is original  # the last model out puts it back


def test_a_model_whose_rope_is_not_llama_s_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import Phi3Config, Phi3ForCausalLM

    model = Phi3ForCausalLM(Phi3Config(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, pad_token_id=0))
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    monkeypatch.setitem(vars(module), "apply_rotary_pos_emb", module.apply_rotary_pos_emb)
    before = module.apply_rotary_pos_emb
    assert rotary.fuse_rotary(model) == 0  # Phi-3's partial rotary is another function
    assert module.apply_rotary_pos_emb is before
