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
writing into it is safe).

Layers that read the same tensor (q, k and v of one attention; gate and up of one MLP) also share their
``lora_A``: the first of them to run computes ``x @ [A_q; A_k; A_v]^T`` in one matmul and the others take
their columns of it (:class:`_SharedInput`). At rank 16 each ``lora_A`` alone is a ``[tokens, 16]`` product,
which a CPU's GEMM runs at half its speed, and each one's input gradient is a full ``[tokens, hidden]``
tensor that autograd then adds to the others'; one ``[tokens, 48]`` product and one input gradient instead.
Autograd keeps what it kept (``x`` once, the lora_A outputs as columns of one tensor: the same bytes).

Every other case runs PEFT's own forward: DoRA and other variants, dropout > 0,
a bias on lora_B, several or no active adapters, a merged or disabled adapter, extra arguments, a base that
is not a plain ``nn.Linear`` (bitsandbytes' 4-bit and 8-bit layers), adapter weights of another dtype than
the input, weights that are not matrices of matching shapes (FSDP's flat shards), and autocast.
"""

from __future__ import annotations

import types
import weakref
from typing import Any

import torch
from torch import nn

from orpo_cli.kernels.module_code import restore_forwards
from orpo_cli.kernels.paths import SpeedPath

_MARK = "_orpo_inplace_update"
_SHARED = "_orpo_shared_input"

# Sibling layers that a Llama-style decoder layer calls on one tensor, by the parent's attribute names.
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


# What the in-place forward reads of PEFT's LoRA ``Linear`` on every call (checked once, at install).
_PEFT_ATTRIBUTES = (
    "disable_adapters", "merged", "base_layer", "active_adapters", "lora_A", "lora_B", "lora_variant",
    "lora_dropout", "scaling",
)


def declines(model: nn.Module) -> str | None:
    """Why :func:`add_updates_in_place` would change nothing of `model`, or None: no PEFT LoRA ``Linear``, or a
    PEFT whose layer no longer has what the in-place forward reads."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layers = [m for m in model.modules() if _over_linear(m, LoraLinear)]
    if not layers:
        return "no PEFT LoRA layer over a plain nn.Linear"
    missing = [name for name in _PEFT_ATTRIBUTES if not hasattr(layers[0], name)]
    if missing:
        return f"PEFT's LoRA Linear has no {', '.join(missing)} (another PEFT than it was verified with)"
    return None


def add_updates_in_place(model: nn.Module) -> int:
    """Give every PEFT LoRA ``Linear`` over a plain ``nn.Linear`` of `model` the in-place forward (idempotent);
    returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if _over_linear(module, LoraLinear) and not getattr(module, _MARK, False):
            module.forward = types.MethodType(_forward, module)
            setattr(module, _MARK, True)
            count += 1
    for parent in model.modules():
        for names in _SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(isinstance(m, LoraLinear) and getattr(m, _MARK, False) for m in members) and not any(
                hasattr(m, _SHARED) for m in members
            ):
                group = _SharedInput(members)
                for m in members:
                    setattr(m, _SHARED, group)
    return count


def _over_linear(module: nn.Module, lora_linear: type) -> bool:
    """A PEFT LoRA ``Linear`` over a plain ``nn.Linear`` (not GPT-2's Conv1D, not a quantized layer)."""
    return isinstance(module, lora_linear) and type(getattr(module, "base_layer", None)) is nn.Linear


class _SharedInput:
    """LoRA layers called on one input tensor, one after the other: their ``lora_A`` products made in one matmul.

    The first member called with a tensor ``x`` makes the products of every member (where all of them take the
    in-place path for ``x``) and keeps the others' columns until they are called with the same ``x`` (the same
    object, unchanged since, in the same grad mode). A member called with anything else computes its own.
    """

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self.key: tuple[Any, ...] | None = None
        self.waiting: dict[int, torch.Tensor] = {}

    def product(self, layer: nn.Module, name: str, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        key = (x._version, torch.is_grad_enabled(), name)
        if self.key is not None and self.key[0]() is x and self.key[1:] == key and id(layer) in self.waiting:
            return self.waiting.pop(id(layer))
        self.key, self.waiting = None, {}
        if not all(_plain_adapter(m, x, (), {}) == name for m in self.members):
            return nn.functional.linear(rows, layer.lora_A[name].weight)
        weights = [m.lora_A[name].weight for m in self.members]
        parts = _Stacked.apply(rows, *weights).split([w.shape[0] for w in weights], dim=1)
        self.waiting = {id(m): p for m, p in zip(self.members, parts, strict=True) if m is not layer}
        self.key = (weakref.ref(x), *key)
        return parts[self.members.index(layer)]


class _Stacked(torch.autograd.Function):
    """``rows @ cat(weights)^T`` keeping only `rows` and the weights themselves for the backward (autograd's own
    product would keep the concatenated copy: a fixed few MB per layer)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(rows, *weights)
        return rows @ torch.cat(weights).t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        rows, *weights = ctx.saved_tensors
        grad_rows = grad @ torch.cat(weights) if ctx.needs_input_grad[0] else None
        if not any(ctx.needs_input_grad[1:]):
            return (grad_rows, *(None for _ in weights))
        # One product for all the weights, then each weight's gradient in a storage of its own (a view of the
        # stacked one would keep all of it alive as any weight's .grad).
        grad_weights = (grad.t() @ rows).split([w.shape[0] for w in weights], dim=0)
        return (grad_rows, *(g.clone() if need else None for g, need in zip(grad_weights, ctx.needs_input_grad[1:], strict=True)))


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
    group = getattr(self, _SHARED, None)
    a = nn.functional.linear(rows, self.lora_A[name].weight) if group is None else group.product(self, name, x, rows)
    out = self.base_layer(rows)
    out.addmm_(a, self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


def remove_updates_in_place(model: nn.Module) -> None:
    """Undo :func:`add_updates_in_place`: every LoRA layer of `model` runs PEFT's forward again."""
    restore_forwards(model, _MARK)
    for module in model.modules():
        if hasattr(module, _SHARED):
            delattr(module, _SHARED)


SPEED_PATH = SpeedPath(
    name="lora_inplace",
    unit="layers",
    devices=("cpu",),
    dtypes=(torch.float32, torch.bfloat16),
    model_types=None,  # any model PEFT puts a LoRA Linear on; each call checks that it computes what PEFT would
    install=add_updates_in_place,
    undo=remove_updates_in_place,
    declines=declines,
)
"""LoRA's speed path: `LoraAdapter.speed_paths` offers it to orpo_cli/kernels' apply_speed_paths."""
