"""The SiLU-gated MLP's product ``silu(gate) * up`` as one autograd function, in row blocks that stay in cache.

A Llama-style MLP runs ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. Left to autograd, its two
elementwise ops write ``silu(gate)`` out to memory, read it back for the product, keep it for the backward
(or, with kernels/recompute.py, remake it there), and the backward makes ``dp * up`` and ``dp * silu(gate)``
as whole tensors before SiLU's backward reads the first again: at the real model's shape each of these is
``tokens x 1,536`` floats, ten passes over memory the size of the MLP per layer and step.

:class:`_SiluProduct` keeps only ``gate`` and ``up`` (what the recomputation keeps anyway) and runs forward
and backward a block of rows at a time (:data:`BLOCK_ELEMENTS`), so ``silu(gate)`` and ``dp * up`` exist
only for a block, in cache. The numbers are those of the two ops: the same kernels on the same elements
(``F.silu``, ``mul``, ``aten.silu_backward``) over blocks aligned to their vectors (:data:`ALIGN`), which a
test checks bit for bit; an MLP is fused only where its forward's code is exactly that expression (one whose
forward is anything else is left alone).

On a CPU only: on a GPU the blocks would be kernel launches, and the whole tensors are what it wants.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orpo_cli.kernels.module_code import code_of, restore_forwards, swap_forwards

BLOCK_ELEMENTS = 1 << 16
"""Elements of one block of rows (256 KB in fp32): a block's gate, up, output gradient and two temporaries
fit a core's L2 cache."""

ALIGN = 64
"""Elements a block's size is a multiple of: torch's CPU kernels run whole vectors of 16 or 32 floats and a
scalar loop on what is left over, whose SiLU may differ from the vector one in the last bit; blocks that are
whole multiples of the vectors leave over exactly what the whole tensor does, so the results are the same."""

_ATTRIBUTE = "_orpo_fused_product"


def _block_rows(width: int, device: torch.device) -> int:
    if device.type != "cpu":
        return 1 << 62
    unit = ALIGN // math.gcd(width, ALIGN)  # rows whose elements are a multiple of ALIGN
    rows = max(1, BLOCK_ELEMENTS // max(width, 1))
    return -(-rows // unit) * unit


def silu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, bit for bit, without a whole ``silu(gate)`` tensor (no autograd)."""
    width = gate.shape[-1]
    g, u = gate.reshape(-1, width), up.reshape(-1, width)
    out = torch.empty(g.shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    step = _block_rows(width, gate.device)
    with torch.no_grad():
        for start in range(0, g.shape[0], step):
            rows = slice(start, start + step)
            torch.mul(F.silu(g[rows]), u[rows], out=out[rows])
    return out.view(*gate.shape[:-1], width)


class _SiluProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate, up):  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return silu_product(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad):  # type: ignore[override]
        gate, up = ctx.saved_tensors
        width = gate.shape[-1]
        g, u, d = gate.reshape(-1, width), up.reshape(-1, width), grad.reshape(-1, width)
        need_gate, need_up = ctx.needs_input_grad
        d_gate = torch.empty_like(g) if need_gate else None
        d_up = torch.empty_like(u) if need_up else None
        step = _block_rows(width, gate.device)
        for start in range(0, g.shape[0], step):
            rows = slice(start, start + step)
            if need_up:
                torch.mul(d[rows], F.silu(g[rows]), out=d_up[rows])
            if need_gate:
                torch.ops.aten.silu_backward(d[rows] * u[rows], g[rows], grad_input=d_gate[rows])
        return (
            None if d_gate is None else d_gate.view(gate.shape),
            None if d_up is None else d_up.view(up.shape),
        )


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # nothing is kept, so nothing to save: the plain ops, which free gate early
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return self.down_proj(_SiluProduct.apply(self.gate_proj(x), self.up_proj(x)))


def is_fused(mlp: nn.Module) -> bool:
    return getattr(mlp, _ATTRIBUTE, False)


def fuse_gated_mlps(model: nn.Module) -> int:
    """Give every SiLU-gated MLP of `model` on a CPU the fused product (idempotent); returns how many have it.

    An MLP qualifies when it has ``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``, and its class's
    forward is, compiled, exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (Llama's, Qwen2's and Mistral's
    are; one that scales, adds or drops anything is left alone). Read from the code, not by running the module:
    nothing is computed and no weight is touched (a memory-mapped checkpoint's pages stay where they are).
    """
    return swap_forwards(model, _qualifies, _fused_forward, _ATTRIBUTE)


def unfuse_gated_mlps(model: nn.Module) -> None:
    """Undo :func:`fuse_gated_mlps`: `model`'s modules run their class's forward again."""
    restore_forwards(model, _ATTRIBUTE)


def declines(model: nn.Module) -> str | None:
    """Why :func:`fuse_gated_mlps` would fuse nothing of `model`, or None."""
    mlps = [m for m in model.modules() if _is_silu_gated(m)]
    if not mlps:
        return "no SiLU-gated MLP"
    for mlp in mlps:
        if code_of(type(mlp).forward) not in _PLAIN_FORWARDS:
            return f"{type(mlp).__name__}.forward is not the code it was verified against"
    return None


def _qualifies(module: nn.Module) -> bool:
    if not _is_silu_gated(module):
        return False
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    return weight is not None and weight.device.type == "cpu" and code_of(type(module).forward) in _PLAIN_FORWARDS


def _plain_forward(self: Any, x: Any) -> Any:
    down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
    return down_proj


def _plain_forward_returned(self: Any, x: Any) -> Any:
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


_PLAIN_FORWARDS = {code_of(_plain_forward), code_of(_plain_forward_returned)}


def _is_silu_gated(module: nn.Module) -> bool:
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Module) for p in parts) or not hasattr(parts[0], "in_features"):
        return False
    act = getattr(module, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
