"""The LoRA update added into the frozen layer's output in place: one matmul-accumulate instead of three ops.

PEFT's LoRA linear computes ``base(x) + lora_B(lora_A(x)) * scaling``: besides the base output and the rank-r
``lora_A(x)``, that is three more tensors of the output's full size per adapted layer (``lora_B``'s output, its
scaled copy, the sum), seven adapted layers per decoder layer with ``all-linear`` targets. Each is written and
read once more, and each is one more block of megabytes for the C library's allocator to place on a CPU (the
heap holes they leave are what makes a step's resident memory exceed what it keeps: docs/performance.md).

:func:`add_updates_in_place` gives each plain LoRA linear a forward that computes ``out = base(x)`` and then
``out += scaling * lora_A(x) @ lora_B.weight.T`` with one ``addmm_`` into ``out``: the same terms, the sum's
rounding that of a fused multiply-add (a few ulps, inside the TRL parity tests' tolerance). Autograd keeps
what PEFT's version keeps (``x`` for lora_A, ``lora_A(x)`` for lora_B; ``out`` itself is kept by nobody, so
writing into it is safe). Every other case runs PEFT's own forward: DoRA and other variants, dropout > 0,
a bias on lora_B, several or no active adapters, a merged or disabled adapter, extra arguments, a base that
is not a plain ``nn.Linear`` (bitsandbytes' 4-bit and 8-bit layers), adapter weights of another dtype than
the input, weights that are not matrices of matching shapes (FSDP's flat shards), and autocast.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

_MARK = "_orpo_inplace_update"


def add_updates_in_place(model: nn.Module) -> int:
    """Give every PEFT LoRA ``Linear`` of `model` the in-place forward (idempotent); returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not getattr(module, _MARK, False):
            module.forward = types.MethodType(_forward, module)
            setattr(module, _MARK, True)
            count += 1
    return count


def _plain_adapter(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter's name when the in-place update computes what PEFT would; else None."""
    if args or kwargs or layer.disable_adapters or layer.merged or type(layer.base_layer) is not nn.Linear:
        return None
    active = layer.active_adapters
    if len(active) != 1 or active[0] not in layer.lora_A or active[0] in layer.lora_variant:
        return None
    name = active[0]
    if not isinstance(layer.lora_dropout[name], nn.Identity) or layer.lora_B[name].bias is not None:
        return None
    base, a, b = layer.base_layer.weight, layer.lora_A[name].weight, layer.lora_B[name].weight
    if x.dtype != a.dtype or base.dtype != a.dtype or b.dtype != a.dtype:
        return None
    # Matrices of matching shapes: FSDP, between its gathers, leaves a module a flat shard of its weights.
    if base.dim() != 2 or a.dim() != 2 or b.dim() != 2 or a.shape[1] != x.shape[-1] or b.shape != (base.shape[0], a.shape[0]):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    return name


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _plain_adapter(self, x, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    # In 2-D: an in-place op on a view of the output would make autograd copy its gradient (CopySlices).
    rows = x.reshape(-1, x.shape[-1])
    out = self.base_layer(rows)
    out.addmm_(nn.functional.linear(rows, self.lora_A[name].weight), self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])
