"""orpo_cli.kernels.recompute: norm and MLP activations recomputed in the backward, bit for bit, for less memory."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.kernels.gated_mlp import fuse_gated_mlps
from orpo_cli.kernels.recompute import disable_recompute, enable_recompute, recomputing
from orpo_cli.training.batching import collate_pairs
from orpo_cli.training.forward import orpo_forward

PAD = 0
VOCAB = 96
LENGTHS = [(5, 7, 4), (9, 3, 8), (4, 11, 6)]


class _NoAdapter:
    def forward_context(self, model, batch):
        return contextlib.nullcontext()


def _llama(dtype: torch.dtype = torch.float32, dropout: float = 0.0) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160, pad_token_id=PAD, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=dropout)
    return get_peft_model(model, lora)


def _batch(layout: str) -> dict:
    g = torch.Generator().manual_seed(3)
    pairs = [TokenizedPair(*(torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths)) for lengths in LENGTHS]
    batch = collate_pairs(pairs, PAD, layout=layout)
    batch["_layout"] = layout  # read (and dropped) by _forward
    return batch


def _forward(model: nn.Module, batch: dict):
    batch = dict(batch)
    layout = batch.pop("_layout", "packed")
    return orpo_forward(model, _NoAdapter(), batch, lam=0.1, nll_on_prompt=True, layout=layout)


def _loss_and_grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    terms = _forward(model, batch)
    return terms.loss.detach(), list(torch.autograd.grad(terms.loss, params))


def _saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes autograd keeps for the backward in one forward: each storage once, parameters left out."""
    from orpo_cli.kernels.recompute import observing_kept

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def count(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with observing_kept(model, count), torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        loss = _forward(model, batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_bitwise_the_same_with_recomputation(layout: str, dtype: torch.dtype) -> None:
    model = _llama(dtype)
    batch = _batch(layout)
    loss, grads = _loss_and_grads(model, batch)
    assert enable_recompute(model) > 0
    assert fuse_gated_mlps(model) == model.config.num_hidden_layers  # and the fused SiLU product, as training runs
    loss_r, grads_r = _loss_and_grads(model, batch)  # the first forward checks each module's recomputation
    loss_r2, grads_r2 = _loss_and_grads(model, batch)  # from then on, noted and recomputed without a check
    assert torch.equal(loss, loss_r) and torch.equal(loss, loss_r2)
    for a, b, c in zip(grads, grads_r, grads_r2, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert max(g.abs().max().item() for g in grads) > 1e-4


def test_it_keeps_two_norm_outputs_and_two_mlp_tensors_fewer_per_layer() -> None:
    model = _llama()
    batch = _batch("packed")
    tokens = int(batch["attention_mask"].sum())
    before = _saved_bytes(model, batch)
    enable_recompute(model)
    _saved_bytes(model, batch)  # the checking forward
    after = _saved_bytes(model, batch)
    cfg = model.config
    # Per layer and token: the two norm outputs (hidden each) and act(gate), act(gate) * up (MLP width each), fp32;
    # less the first norm's input (the embeddings, which nothing else keeps), held by its record.
    expected = cfg.num_hidden_layers * tokens * 4 * (2 * cfg.hidden_size + 2 * cfg.intermediate_size)
    expected -= tokens * 4 * cfg.hidden_size
    assert before - after == expected
    disable_recompute(model)
    assert _saved_bytes(model, batch) == before


def test_the_backward_makes_each_activation_once() -> None:
    """act(gate) is remade once per MLP in the backward: the product's recipe makes it for the product's own backward
    too (not once for each). Counted with a wrapped activation; the gradients stay bitwise the same."""
    model = _llama()
    batch = _batch("packed")
    _, grads = _loss_and_grads(model, batch)
    mlps = [m for m in model.modules() if hasattr(m, "act_fn") and hasattr(m, "down_proj")]
    calls = []
    for mlp in mlps:
        real = mlp.act_fn.forward
        mlp.act_fn.forward = lambda x, real=real: calls.append(torch.is_grad_enabled()) or real(x)
    enable_recompute(model)
    _loss_and_grads(model, batch)  # the checking forward
    calls.clear()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = _forward(model, batch).loss
    assert calls == [True] * len(mlps)  # the forward: once per MLP
    grads_r = torch.autograd.grad(loss, params)
    assert calls == [True] * len(mlps) + [False] * len(mlps)  # the backward: once more per MLP, not twice
    for a, b in zip(grads, grads_r, strict=True):
        assert torch.equal(a, b)


def test_a_module_whose_recomputation_differs_is_left_alone() -> None:
    """An MLP whose down_proj reads act(gate) * up * 0.5: the product is not noted, the gradients stay right."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    model = _llama()
    batch = _batch("packed")
    _, grads = _loss_and_grads(model, batch)
    original = LlamaMLP.forward
    LlamaMLP.forward = lambda self, x: self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)
    try:
        _, halved = _loss_and_grads(model, batch)
        enable_recompute(model)
        _, halved_r = _loss_and_grads(model, batch)
        _, halved_r2 = _loss_and_grads(model, batch)
    finally:
        LlamaMLP.forward = original
    assert any(not torch.equal(a, b) for a, b in zip(grads, halved, strict=True))
    for a, b, c in zip(halved, halved_r, halved_r2, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    from orpo_cli.kernels.recompute import _find_state

    state = _find_state(model)
    mlps = [m for m in model.modules() if isinstance(m, LlamaMLP)]
    assert all(id(m) in state.skipped for m in mlps)
    assert all(id(m.act_fn) in state.checked for m in mlps)  # act(gate) alone is still right, still noted


def test_no_effect_without_gradients_or_outside_the_context() -> None:
    model = _llama()
    enable_recompute(model)
    state = model._orpo_recompute
    batch = _batch("packed")
    with torch.no_grad(), recomputing(model):
        _forward(model, batch)
    assert not state.checked and not state.noted
    with recomputing(model):
        _forward(model, batch)
    assert state.checked and not state.noted  # nothing noted outlives the forward


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_gradients_are_bitwise_the_same(smollm2_four_layers: nn.Module) -> None:
    model = smollm2_four_layers
    g = torch.Generator().manual_seed(5)
    pairs = [TokenizedPair(*(torch.randint(1, 40000, (n,), generator=g).tolist() for n in (40, 60, 50))) for _ in range(2)]
    batch = collate_pairs(pairs, 2, layout="packed")
    loss, grads = _loss_and_grads(model, batch)
    enable_recompute(model)
    assert fuse_gated_mlps(model) == 4
    _loss_and_grads(model, batch)
    loss_r, grads_r = _loss_and_grads(model, batch)
    assert torch.equal(loss, loss_r)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_r, strict=True))
    state = model._orpo_recompute
    assert not state.skipped and len(state.checked) == 4 * 3 + 1  # 2 norms and the MLP per layer (its SiLU runs fused); the final norm
