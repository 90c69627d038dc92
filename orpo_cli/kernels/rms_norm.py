"""RMSNorm as one autograd function on a CPU: the model's forward, a backward in a third of the passes.

Llama-style models normalise twice per decoder layer, ``w * (x * rsqrt(mean(x^2) + eps))``. Autograd runs the
backward of each of its six operations: the weight's product, the product by ``rsqrt`` (and, for the
``rsqrt`` term, a product by ``x`` and its sum), ``rsqrt``'s, the mean's (a full-size expanded division), the
square's (a full-size product), and two full-size sums of the three gradients that reach ``x``.

:class:`_RMSNorm` keeps what autograd keeps (``x`` and ``rsqrt``: the residual stream and one float per row)
and computes ``dx = r * g' - x * (r^3 / n) * sum(g' * x)`` with ``g' = g * w`` (what that saves:
docs/performance.md). The forward is the model's own operations in the model's order, so outputs are the same numbers bit for bit. The backward is
the same derivative summed in another order: ``dx`` differs from autograd's in the last bits (a test bounds
it), as any two implementations' do.

Applied by :func:`fuse_rms_norms` where a norm's forward is, compiled, exactly Llama's (Llama, Qwen2, Qwen3,
Mistral, Phi-3 in the pinned transformers: not Gemma's ``1 + w``), with a frozen weight (LoRA, ReFT), on a CPU,
with gradients; every other call (inference, a trained weight, another device) runs the model's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orpo_cli.kernels.module_code import code_of, restore_forwards, swap_forwards

_ATTRIBUTE = "_orpo_fused_norm"


def _reference_forward(self, hidden_states):  # noqa: ANN001, ANN202 - Llama's, written out to compare code with
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


_REFERENCE = code_of(_reference_forward)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        x32 = x.to(torch.float32)
        rsqrt = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rsqrt, weight)
        return weight * (x32 * rsqrt).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        x, rsqrt, weight = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # The gradient of the normalised x, in the dtype the forward cast it to, then in fp32 as it was computed.
        scaled = (grad * weight).to(x.dtype).to(torch.float32)
        x32 = x.to(torch.float32)
        coefficient = (scaled * x32).sum(-1, keepdim=True).mul_(rsqrt.pow(3)).div_(x.shape[-1])
        dx = scaled.mul_(rsqrt).sub_(x32 * coefficient)  # `scaled` is a new tensor: (grad * weight) made it
        return dx.to(x.dtype), None, None


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    if (
        torch.is_grad_enabled()
        and not weight.requires_grad
        and hidden_states.device.type == "cpu"
        and weight.device.type == "cpu"
        and weight.dim() == 1
        and hidden_states.shape[-1] == weight.shape[0]
    ):
        return _RMSNorm.apply(hidden_states, weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def is_fused(norm: nn.Module) -> bool:
    return getattr(norm, _ATTRIBUTE, False)


def fuse_rms_norms(model: nn.Module) -> int:
    """Give every Llama-style RMSNorm of `model` the fused backward (idempotent); returns how many have it."""
    return swap_forwards(model, _qualifies, _fused_forward, _ATTRIBUTE)


def unfuse_rms_norms(model: nn.Module) -> None:
    """Undo :func:`fuse_rms_norms`: `model`'s modules run their class's forward again."""
    restore_forwards(model, _ATTRIBUTE)


def declines(model: nn.Module) -> str | None:
    """Why :func:`fuse_rms_norms` would fuse nothing of `model`, or None."""
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    if not norms:
        return "no RMSNorm module"
    for norm in norms:
        if code_of(type(norm).forward) != _REFERENCE:
            return f"{type(norm).__name__}.forward is not the code it was verified against"
    if all(getattr(norm, "weight", None) is None or norm.weight.requires_grad for norm in norms):
        return "the norms' weights train (the fused backward is for a frozen weight)"
    return None


def _qualifies(module: nn.Module) -> bool:
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(getattr(module, "weight", None), nn.Parameter)
        and code_of(type(module).forward) == _REFERENCE
    )
