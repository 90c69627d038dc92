"""orpo_cli.kernels.rms_norm: RMSNorm's fused backward against autograd's, and where it applies."""

from __future__ import annotations

import pytest
import torch

from orpo_cli.kernels import rms_norm
from orpo_cli.kernels.rms_norm import fuse_rms_norms, is_fused


def _norm(dtype: torch.dtype, width: int = 40) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(False)  # frozen, as under LoRA
    return norm


def _run(norm: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = norm(x)
    residual = x * 0.5 + y  # x also feeds the residual stream, as in a decoder layer
    (dx,) = torch.autograd.grad(residual, x, grad)
    return y, dx


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_forward_is_the_model_s_and_backward_autograd_s(dtype: torch.dtype, tolerance: float) -> None:
    norm = _norm(dtype)
    torch.manual_seed(1)
    x, grad = torch.randn(3, 17, 40, dtype=dtype) * 3, torch.randn(3, 17, 40, dtype=dtype)
    expected_y, expected_dx = _run(norm, x, grad)
    calls = []
    apply = rms_norm._RMSNorm.apply
    assert fuse_rms_norms(norm) == 1 and fuse_rms_norms(norm) == 1 and is_fused(norm)
    try:
        rms_norm._RMSNorm.apply = lambda *a: calls.append(1) or apply(*a)
        y, dx = _run(norm, x, grad)
    finally:
        rms_norm._RMSNorm.apply = apply
    assert calls == [1]
    assert y.dtype == expected_y.dtype and torch.equal(y, expected_y)  # the forward: bit for bit
    scale = expected_dx.abs().max().item()
    assert scale > 0.1 and (dx - expected_dx).abs().max().item() <= tolerance * scale


def test_the_model_s_forward_where_it_does_not_apply() -> None:
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    assert fuse_rms_norms(Gemma2RMSNorm(8)) == 0  # Gemma's (1 + w) is another forward
    norm = _norm(torch.float32)
    fuse_rms_norms(norm)
    calls = []
    apply = rms_norm._RMSNorm.apply
    x = torch.randn(2, 40, requires_grad=True)
    try:
        rms_norm._RMSNorm.apply = lambda *a: calls.append(1) or apply(*a)
        with torch.no_grad():
            norm(x)  # inference: nothing to keep
        norm.weight.requires_grad_(True)
        trained = norm(x)  # a weight being trained: its gradient is autograd's
        trained.sum().backward()
        assert calls == [] and norm.weight.grad is not None
    finally:
        rms_norm._RMSNorm.apply = apply


def test_a_model_trains_to_the_same_loss_and_close_gradients() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(1, 96, (2, 11))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(input_ids=ids, labels=ids).loss
    expected = torch.autograd.grad(loss, params)
    assert fuse_rms_norms(model) == 5  # two per layer and the final one
    fused_loss = model(input_ids=ids, labels=ids).loss
    got = torch.autograd.grad(fused_loss, params)
    assert torch.equal(fused_loss, loss)
    scale = max(g.abs().max().item() for g in expected)
    assert max((a - b).abs().max().item() for a, b in zip(got, expected, strict=True)) <= 1e-5 * scale


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_layers_train_to_the_same_numbers_with_every_saving(smollm2_four_layers) -> None:
    """Four real SmolLM2-135M layers with LoRA: what setup applies (in-place LoRA, siblings' lora_A, RoPE and
    RMSNorm as one function each, the recomputation, the fused product) against none of it."""
    from test_recompute import _loss_and_grads

    from orpo_cli.adapters.lora import LoraAdapter
    from orpo_cli.data.pairs import TokenizedPair
    from orpo_cli.kernels import apply_speed_paths, rotary
    from orpo_cli.recipe import LoraSettings
    from orpo_cli.training.batching import collate_pairs

    model = smollm2_four_layers
    g = torch.Generator().manual_seed(5)
    pairs = [TokenizedPair(*(torch.randint(1, 40000, (n,), generator=g).tolist() for n in (140, 160, 150))) for _ in range(2)]
    batch = collate_pairs(pairs, 2, layout="packed")
    loss, grads = _loss_and_grads(model, batch)
    with apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=LoraAdapter(LoraSettings())) as paths:
        assert sum(rms_norm.is_fused(m) for m in model.modules()) == 4 * 2 + 1
        assert paths.applied["rope"] == 4 and rotary.fuse_rotary(model) == 4
        _loss_and_grads(model, batch)  # the recomputation's first forward checks what it will recompute
        loss_s, grads_s = _loss_and_grads(model, batch)
    assert abs(loss_s.item() - loss.item()) <= 1e-6 * abs(loss.item())
    scale = max(x.abs().max().item() for x in grads)
    assert scale > 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(grads_s, grads, strict=True)) <= 1e-5 * scale
