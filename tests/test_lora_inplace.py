"""orpo_cli.adapters.lora_inplace: the LoRA update added in place, against PEFT's forward and TRL's loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orpo_cli.adapters.lora_inplace import _plain_adapter, add_updates_in_place


def _peft_llama(**lora: object) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, pad_token_id=0)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, **lora))


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def test_loss_and_gradients_equal_trls_and_peft_forward() -> None:
    import test_forward as tf

    from orpo_cli.training.batching import collate_pairs
    from orpo_cli.training.forward import orpo_forward

    model = tf._lora_llama()
    pairs = tf._pairs(seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    trl = tf._trl_loss(model, pairs, lam=0.1)
    trl_grads = torch.autograd.grad(trl, params)
    batch = collate_pairs(pairs, tf.PAD, layout="packed")
    peft = orpo_forward(model, tf._NoAdapter(), batch, lam=0.1, nll_on_prompt=True, layout="packed").loss
    peft_grads = torch.autograd.grad(peft, params)
    assert add_updates_in_place(model) == 14 and add_updates_in_place(model) == 0  # idempotent
    ours = orpo_forward(model, tf._NoAdapter(), batch, lam=0.1, nll_on_prompt=True, layout="packed").loss
    grads = torch.autograd.grad(ours, params)
    assert abs(ours.item() - trl.item()) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads, trl_grads, strict=True)) < 1e-5
    scale = max(g.abs().max().item() for g in peft_grads)
    assert max((a - b).abs().max().item() for a, b in zip(grads, peft_grads, strict=True)) < 1e-5 * scale
    assert scale > 1e-3


def test_every_plain_layer_takes_the_in_place_path_and_the_rest_peft_s() -> None:
    model = _peft_llama()
    layers = _lora_layers(model)
    x = torch.randn(2, 5, 32)
    xs = {id(m): torch.randn(2, 5, m.base_layer.in_features) for m in layers}
    assert all(_plain_adapter(m, xs[id(m)], (), {}) == "default" for m in layers)
    layer = layers[0]
    x = xs[id(layer)]
    assert _plain_adapter(layer, x.to(torch.bfloat16), (), {}) is None  # input of another dtype than the adapter
    assert _plain_adapter(layer, x, (), {"adapter_names": ["default"]}) is None  # a mixed batch
    with model.disable_adapter():
        assert _plain_adapter(layer, x, (), {}) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _plain_adapter(layer, x, (), {}) is None
    for lora in ({"lora_dropout": 0.1}, {"use_dora": True}, {"lora_bias": True}):
        other = _lora_layers(_peft_llama(**lora))[0]
        assert _plain_adapter(other, x, (), {}) is None, lora


@pytest.mark.parametrize("lora", [{}, {"lora_dropout": 0.1}, {"use_dora": True}])
def test_each_layer_output_equals_peft_s(lora: dict) -> None:
    model = _peft_llama(**lora)
    model.eval()  # dropout off, so the two forwards are comparable
    layers = _lora_layers(model)
    xs = [torch.randn(3, 7, m.base_layer.in_features) for m in layers]
    before = [m(x) for m, x in zip(layers, xs, strict=True)]
    add_updates_in_place(model)
    after = [m(x) for m, x in zip(layers, xs, strict=True)]
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        if lora:  # PEFT's own forward: the same numbers exactly
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def _stacked_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from orpo_cli.adapters import lora_inplace

    calls: list[int] = []
    apply = lora_inplace._Stacked.apply

    def counting(rows: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        calls.append(len(weights))
        return apply(rows, *weights)

    monkeypatch.setattr(lora_inplace._Stacked, "apply", counting)
    return calls


def test_siblings_share_one_lora_a_product_and_match_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ranks that differ between siblings (q 4, k 2, v 3): each takes its own columns of the stacked product.
    model = _peft_llama(rank_pattern={"q_proj": 4, "k_proj": 2, "v_proj": 3, "gate_proj": 5})
    ids = torch.randint(1, 128, (2, 9))
    peft_loss = model(input_ids=ids, labels=ids).loss
    params = [p for p in model.parameters() if p.requires_grad]
    peft_grads = torch.autograd.grad(peft_loss, params)
    add_updates_in_place(model)
    calls = _stacked_calls(monkeypatch)
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, params)
    assert calls == [3, 2, 3, 2]  # per layer: q/k/v, then gate/up, each one product
    torch.testing.assert_close(loss, peft_loss, rtol=1e-6, atol=1e-6)
    for g, expected in zip(grads, peft_grads, strict=True):
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)
        assert g.untyped_storage().nbytes() == g.numel() * g.element_size()  # its own storage


def test_a_sibling_called_on_another_tensor_computes_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _peft_llama()
    attention = model.base_model.model.model.layers[0].self_attn
    x, other = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    expected = {n: getattr(attention, n)(t) for n, t in (("q_proj", x), ("k_proj", other), ("v_proj", x))}
    changed = attention.v_proj(x + 1)
    add_updates_in_place(model)
    calls = _stacked_calls(monkeypatch)
    assert calls == []
    got = {"q_proj": attention.q_proj(x), "k_proj": attention.k_proj(other), "v_proj": attention.v_proj(x)}
    # q made all three on x; k, on another tensor, made them for `other`, which left v (on x) to make them again
    assert calls == [3, 3, 3]
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)
    attention.q_proj(x)
    x.add_(1)  # changed in place after q made the products: v's must be made again from the new values
    torch.testing.assert_close(attention.v_proj(x), changed, rtol=1e-6, atol=1e-6)
