"""Rotary position embedding (RoPE) on q and k as one autograd function: the same numbers in fewer passes.

Llama-style attention applies RoPE as ``q * cos + rotate_half(q) * sin`` (and the same for k), with
``rotate_half(x) = cat(-x[..., h:], x[..., :h])``. Left to autograd that is five passes over q in the forward
(the product, the negation, the concatenation's copy, the second product, the sum), and in the backward two
products, the negation, and for each half a full-size zero tensor with the half copied in (the slices'
backward) before the three gradients are summed (what that costs: docs/performance.md).

:class:`_Rotary` computes the two halves directly: ``out1 = q1 * c1 - q2 * s1``, ``out2 = q2 * c2 + q1 * s2``,
and in the backward ``dq1 = g1 * c1 + g2 * s2``, ``dq2 = g2 * c2 - g1 * s1``. These are the same
multiplications and additions, each rounded once, as autograd's (``a + (-b)`` is ``a - b`` exactly, and adding
the slices' zeros changes nothing), so outputs and gradients are the same numbers bit for bit; a test holds
them equal in fp32 and bf16. It keeps ``cos`` and ``sin`` for the backward, as autograd does.

:func:`fuse_rotary` routes one model's attention modules through it, with gradients, where all of q, k, cos and
sin have one dtype; anything else (inference, autocast's mixed dtypes, other shapes) takes the model's own
function. The modeling module's ``apply_rotary_pos_emb`` is a module-level name that every model of that type
calls, so the function put in its place (a dispatcher) takes the fused path only inside the forward of an
attention module that :func:`fuse_rotary` marked (a pre-hook and a hook count it in and out): another model of
the same type in the process runs the original. :func:`unfuse_rotary` removes the hooks, and the last model to
leave puts the original function back. Installed where the model's type is one whose function is Llama's
(orpo_cli/kernels/paths.py) and, as a guard, only where it and its ``rotate_half`` are, compiled, exactly the
reference below (:func:`declines` says why not).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch
from torch import nn

from orpo_cli.kernels.module_code import code_of

_ORIGINAL = "_orpo_original"
_HANDLES = "_orpo_rotary_hooks"


def _reference_rotate_half(x):  # noqa: ANN001, ANN202 - Llama's, written out to compare code with
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _reference_apply(q, k, cos, sin, unsqueeze_dim=1):  # noqa: ANN001, ANN202
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)  # noqa: F821 - the modeling module's name
    k_embed = (k * cos) + (rotate_half(k) * sin)  # noqa: F821
    return q_embed, k_embed


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = t.shape[-1] // 2
    return t[..., :half], t[..., half:]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (sign +1), or its backward ``x * cos + rotate_half^T(x * sin)`` (-1)."""
    out = torch.empty_like(x)
    (x1, x2), (c1, c2), (s1, s2), (o1, o2) = _halves(x), _halves(cos), _halves(sin), _halves(out)
    torch.mul(x1, c1, out=o1)
    torch.mul(x2, c2, out=o2)
    if sign > 0:  # out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2
        o1.sub_(x2 * s1)
        o2.add_(x1 * s2)
    else:  # d1 = g1 c1 + g2 s2, d2 = g2 c2 - g1 s1
        o1.add_(x2 * s2)
        o2.sub_(x1 * s1)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1), _rotate(k, cos, sin, 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_q: torch.Tensor | None, grad_k: torch.Tensor | None):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        dq = _rotate(grad_q, cos, sin, -1) if need_q and grad_q is not None else None
        dk = _rotate(grad_k, cos, sin, -1) if need_k and grad_k is not None else None
        return dq, dk, None, None


def _takes_fused(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: Any) -> bool:
    if unsqueeze_dim != 1 or not torch.is_grad_enabled():
        return False
    tensors = (q, k, cos, sin)
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors):
        return False
    if not (q.requires_grad or k.requires_grad) or cos.requires_grad or sin.requires_grad:
        return False
    if len({t.dtype for t in tensors}) != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return False
    width = q.shape[-1]
    if width % 2 or k.shape[-1] != width or cos.shape != sin.shape:
        return False
    angles = cos.unsqueeze(1).shape
    # The output takes q's shape: cos and sin broadcast to q and k, never the other way.
    return torch.broadcast_shapes(q.shape, angles) == q.shape and torch.broadcast_shapes(k.shape, angles) == k.shape


class _Inside(threading.local):
    depth = 0  # how many marked attention forwards are running on this thread (0 or 1 but for nesting)


_INSIDE = _Inside()


def _dispatcher(original: Any) -> Any:
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):  # noqa: ANN001, ANN202 - the model's signature
        if _INSIDE.depth and _takes_fused(q, k, cos, sin, unsqueeze_dim):
            return _Rotary.apply(q, k, cos.unsqueeze(1), sin.unsqueeze(1))
        return original(q, k, cos, sin, unsqueeze_dim)

    setattr(apply_rotary_pos_emb, _ORIGINAL, original)
    apply_rotary_pos_emb._orpo_users = 0  # type: ignore[attr-defined] - attention modules routed, all models
    return apply_rotary_pos_emb


def _enter(_module: nn.Module, _args: Any) -> None:
    _INSIDE.depth += 1


def _leave(_module: nn.Module, _args: Any, _output: Any) -> None:
    _INSIDE.depth -= 1


def _attention_namespaces(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    found = []
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            namespace = vars(sys.modules.get(type(module).__module__, object()))
            if "apply_rotary_pos_emb" in namespace:
                found.append((module, namespace))
    return found


def declines(model: nn.Module) -> str | None:
    """Why :func:`fuse_rotary` would route nothing of `model`, or None."""
    found = _attention_namespaces(model)
    if not found:
        return "no attention module calling apply_rotary_pos_emb"
    for module, namespace in found:
        function = namespace["apply_rotary_pos_emb"]
        function = getattr(function, _ORIGINAL, function)
        if code_of(function) != _APPLY or code_of(namespace.get("rotate_half")) != _ROTATE_HALF:
            return f"{type(module).__module__}.apply_rotary_pos_emb is not the code it was verified against"
    return None


def fuse_rotary(model: nn.Module) -> int:
    """Route RoPE of `model`'s attention through :class:`_Rotary` where its modeling module's function is
    Llama's (idempotent); returns how many attention modules are routed."""
    routed = 0
    for module, namespace in _attention_namespaces(model):
        if getattr(module, _HANDLES, None) is not None:
            routed += 1
            continue
        function = namespace["apply_rotary_pos_emb"]
        if not hasattr(function, _ORIGINAL):
            if code_of(function) != _APPLY or code_of(namespace.get("rotate_half")) != _ROTATE_HALF:
                continue
            function = namespace["apply_rotary_pos_emb"] = _dispatcher(function)
        function._orpo_users += 1
        handles = (module.register_forward_pre_hook(_enter), module.register_forward_hook(_leave, always_call=True))
        setattr(module, _HANDLES, (handles, namespace))
        routed += 1
    return routed


def unfuse_rotary(model: nn.Module) -> None:
    """Undo :func:`fuse_rotary` on `model`; the modeling module's own function is back once no model uses it."""
    for module in model.modules():
        installed = getattr(module, _HANDLES, None)
        if installed is None:
            continue
        handles, namespace = installed
        for handle in handles:
            handle.remove()
        delattr(module, _HANDLES)
        function = namespace.get("apply_rotary_pos_emb")
        if hasattr(function, _ORIGINAL):
            function._orpo_users -= 1
            if function._orpo_users <= 0:
                namespace["apply_rotary_pos_emb"] = getattr(function, _ORIGINAL)


_APPLY, _ROTATE_HALF = code_of(_reference_apply), code_of(_reference_rotate_half)
