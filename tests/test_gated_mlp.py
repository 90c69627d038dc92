"""orpo_cli.kernels.gated_mlp: the SiLU-gated product in row blocks, bit for bit the two ops it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orpo_cli.kernels.gated_mlp as gated
from orpo_cli.kernels.gated_mlp import fuse_gated_mlps, is_fused, silu_product


def _mlp(act: nn.Module | None = None, hidden: int = 24, width: int = 40) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=width, num_attention_heads=4, num_key_value_heads=2))
    if act is not None:
        mlp.act_fn = act
    return mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [1, 7, 1 << 16])
def test_forward_and_backward_are_bitwise_the_two_ops(dtype, block, monkeypatch):
    monkeypatch.setattr(gated, "BLOCK_ELEMENTS", block * 40)  # `block` rows of 40, rounded up to 8 (8 x 40 = 5 x 64)
    assert gated._block_rows(40, torch.device("cpu")) == (8 if block < 8 else block)
    g = torch.Generator().manual_seed(1)
    gate = torch.randn(3, 11, 40, generator=g).to(dtype).requires_grad_()
    up = torch.randn(3, 11, 40, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(3, 11, 40, generator=g).to(dtype)
    ref = F.silu(gate) * up
    ref_grads = torch.autograd.grad(ref, (gate, up), grad)
    out = gated._SiluProduct.apply(gate, up)
    grads = torch.autograd.grad(out, (gate, up), grad)
    assert torch.equal(out, ref) and torch.equal(silu_product(gate, up), ref)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.equal(a, b)
    assert ref_grads[0].abs().max().item() > 0.1


def test_only_the_gate_or_only_up_needs_a_gradient():
    gate, up = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8)
    (d_gate,) = torch.autograd.grad(gated._SiluProduct.apply(gate, up).sum(), (gate,))
    (ref,) = torch.autograd.grad((F.silu(gate) * up).sum(), (gate,))
    assert torch.equal(d_gate, ref)


def test_a_llama_mlp_is_fused_and_gives_the_same_output_and_gradients():
    mlp = _mlp()
    x = torch.randn(2, 9, 24, requires_grad=True)
    ref = mlp(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *mlp.parameters()])
    assert fuse_gated_mlps(mlp) == 1 and is_fused(mlp)
    assert fuse_gated_mlps(mlp) == 1  # idempotent
    calls = []
    real = gated._SiluProduct.apply
    gated._SiluProduct.apply = lambda *a: calls.append(1) or real(*a)
    try:
        with torch.no_grad():
            assert torch.equal(mlp(x), ref)  # no gradients (evaluation): the plain ops
        assert calls == []
        out = mlp(x)
    finally:
        gated._SiluProduct.apply = real
    assert calls == [1]
    grads = torch.autograd.grad(out.square().sum(), [x, *mlp.parameters()])
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.equal(a, b)


def test_what_is_not_a_silu_gated_mlp_is_left_alone():
    gelu = _mlp(nn.GELU())
    assert fuse_gated_mlps(gelu) == 0 and not is_fused(gelu)

    class Scaled(nn.Module):  # SiLU, but a forward that is not down(silu(gate) * up): its code tells them apart
        def __init__(self):
            super().__init__()
            inner = _mlp()
            self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
                inner.gate_proj, inner.up_proj, inner.down_proj, inner.act_fn)

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 0.5)

    scaled = Scaled()
    assert fuse_gated_mlps(scaled) == 0 and not is_fused(scaled)


def test_qwen2_and_mistral_mlps_are_recognised_and_hooked_forwards_are_not():
    from transformers import MistralConfig, Qwen2Config
    from transformers.models.mistral.modeling_mistral import MistralMLP
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    shape = dict(hidden_size=24, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2)
    assert fuse_gated_mlps(Qwen2MLP(Qwen2Config(**shape))) == 1
    assert fuse_gated_mlps(MistralMLP(MistralConfig(**shape))) == 1
    hooked = _mlp()
    hooked.forward = lambda x: x  # what accelerate's offloading hooks do: an instance-level forward
    assert fuse_gated_mlps(hooked) == 0


def test_fusing_touches_no_weight():
    """Nothing runs while fusing (no projection is called), so no weight page is read in."""
    mlp = _mlp()
    calls = []
    for proj in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
        proj.register_forward_pre_hook(lambda *a: calls.append(1))
    assert fuse_gated_mlps(mlp) == 1 and calls == []
