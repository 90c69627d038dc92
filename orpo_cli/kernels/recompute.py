"""Cheap activations recomputed in the backward pass instead of kept for it (selective recomputation).

Autograd keeps, for every decoder layer, the inputs of the adapters' matmuls and of the elementwise ops
between them. In a Llama-style layer with LoRA on every linear layer, at dropout 0, that is per token
(hidden h, MLP width i, floats): the residual stream at each of the two norms (h each), each norm's output
(the input that q/k/v's and gate/up's LoRA read, h each), q/k/v and the attention output (~1.7h + h), the
attention output's copy that o_proj reads (h), the MLP's gate and up outputs (i each), the activation's
output (i) and the product that down_proj reads (i). The last four are 4i of the ~6.7h + 4i.

Three of them are a cheap function of tensors autograd keeps anyway, so this module keeps a recipe in
their place and recomputes them when the backward asks:

* a norm's output (RMSNorm, LayerNorm), from the norm's input (kept by the norm's own backward);
* the MLP activation's output ``act(gate)``, from ``gate`` (kept by the activation's backward);
* the MLP product ``act(gate) * up`` that down_proj's adapter reads, from ``gate`` and ``up`` (kept by the
  activation's and the product's backward).

That is 2h + 2i per layer per token fewer (what that is at a real shape: docs/performance.md), for one
more norm and activation per layer in the backward (elementwise, a few percent of a step). The numbers do
not change: the recomputation runs the same modules on the same inputs (on a CPU and on CUDA those
kernels are deterministic), and the first training forward checks, once per module, that recomputing each
output gives it bit for bit (a model whose down_proj reads something other than ``act(gate) * up``, or a
module with randomness or side effects, fails the check and is left alone).

Mechanism: forward hooks note each such output (a weak reference and how to recompute it) while the
forward runs; :func:`recomputing` installs `torch.autograd.graph.saved_tensors_hooks` whose pack step
replaces a saved tensor that is (a view of) a noted output by a small record, and whose unpack step
recomputes it (once for all the adapters that read it: q, k and v read the same norm output; and the
product's recipe makes ``act(gate)`` for the product's own backward too, so the activation runs once). Saved
tensors that are not noted are kept as usual. Inactive under activation checkpointing (which recomputes
whole layers anyway), and for outputs autocast has cast (the matmul then keeps its cast copy).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from orpo_cli.kernels.gated_mlp import is_fused, silu_product

_ATTRIBUTE = "_orpo_recompute"


class _Noted:
    """An output that can be recomputed: a weak reference to it, the function that remakes it and what that holds."""

    __slots__ = ("ref", "remake", "holds", "packs", "unpacks", "cache")

    def __init__(self, output: torch.Tensor, remake: Callable[[], torch.Tensor], holds: tuple[torch.Tensor, ...]):
        self.ref = weakref.ref(output)
        self.remake = remake
        self.holds = holds  # the tensors remake() reads: kept alive by it (autograd keeps them anyway, but the first norm's)
        self.packs = 0
        self.unpacks = 0
        self.cache: torch.Tensor | None = None

    def value(self) -> torch.Tensor:
        if self.cache is None:
            with torch.no_grad():
                self.cache = self.remake()
        out = self.cache
        self.unpacks += 1
        if self.unpacks >= self.packs:  # every reader has had it: let it go
            self.cache = None
        return out

    def peek(self) -> torch.Tensor:
        """The value for another recipe that starts from it (the MLP product from ``act(gate)``): kept, when made
        here, for this tensor's own readers still to come, so that the backward makes it once."""
        if self.cache is not None:
            return self.cache
        with torch.no_grad():
            value = self.remake()
        if self.unpacks < self.packs:
            self.cache = value
        return value


class _Packed:
    """What autograd keeps instead of a noted tensor: the note and the view's geometry."""

    __slots__ = ("noted", "size", "stride", "offset")

    def __init__(self, noted: _Noted, view: torch.Tensor, base: torch.Tensor):
        self.noted = noted
        self.size = tuple(view.size())
        self.stride = tuple(view.stride())
        self.offset = view.storage_offset() - base.storage_offset()


class Recompute:
    """The hooks on one model, and the outputs noted during the current forward."""

    def __init__(self) -> None:
        self.noted: dict[int, _Noted] = {}
        self.active = False
        self.remaking = False
        self.handles: list[Any] = []
        # Modules (by id) whose output was checked, on their first training forward, to be what recomputing
        # it gives bit for bit; and those where it was not (left alone from then on).
        self.checked: set[int] = set()
        self.skipped: set[int] = set()

    def note(self, key: int, output: Any, remake: Callable[[], torch.Tensor], holds: tuple[torch.Tensor, ...]) -> None:
        """Note `output` as `remake()` (which reads `holds`); the first time for each `key` (a module), check that it
        is, bit for bit."""
        if not self.active or self.remaking or key in self.skipped or not isinstance(output, torch.Tensor):
            return
        if output.numel() == 0:  # empty tensors may all share one (null) data pointer: never a key
            return
        if key not in self.checked:
            self.remaking = True  # the module's own hooks run again inside remake(): they must not note
            try:
                with torch.no_grad():
                    again = remake()
            finally:
                self.remaking = False
            same = again.shape == output.shape and again.dtype == output.dtype and torch.equal(again, output)
            (self.checked if same else self.skipped).add(key)
            if not same:
                return
        self.noted[output.untyped_storage().data_ptr()] = _Noted(output, remake, holds)

    def pack(self, tensor: torch.Tensor) -> Any:
        noted = self.noted.get(tensor.untyped_storage().data_ptr()) if self.noted else None
        if noted is None:
            return tensor
        base = noted.ref()
        if base is None or base.dtype != tensor.dtype:  # the noted tensor is gone (its memory reused), or a cast view
            return tensor
        noted.packs += 1
        return _Packed(noted, tensor, base)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Packed):
            return packed
        full = packed.noted.value()
        return full.as_strided(packed.size, packed.stride, full.storage_offset() + packed.offset)


def enable_recompute(model: nn.Module) -> int:
    """Install the hooks on `model`'s norms and MLPs (idempotent); returns how many modules got one."""
    existing = getattr(model, _ATTRIBUTE, None)
    if existing is not None:
        return len(existing.handles)
    state = Recompute()
    for module in model.modules():
        if _is_norm(module):
            state.handles.append(module.register_forward_hook(_norm_hook(state)))
        elif _is_gated_mlp(module):
            state.handles.extend(_mlp_hooks(state, module))
    setattr(model, _ATTRIBUTE, state)
    return len(state.handles)


def disable_recompute(model: nn.Module) -> None:
    state = getattr(model, _ATTRIBUTE, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        delattr(model, _ATTRIBUTE)


@contextlib.contextmanager
def recomputing(model: nn.Module) -> Iterator[None]:
    """Around a training forward: noted outputs are kept as recipes by autograd (no-op without the hooks)."""
    state = _find_state(model)
    if state is None or not torch.is_grad_enabled():
        yield
        return
    state.active = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(state.pack, state.unpack):
            yield
    finally:
        state.active = False
        state.noted = {}


@contextlib.contextmanager
def observing_kept(model: nn.Module, observe: Callable[[torch.Tensor], None]) -> Iterator[None]:
    """For measurements (the planner's tests, bench/step_profile.py): during the block, `observe` each tensor the
    recomputation lets autograd keep, and the tensors each of its records holds instead (a norm's input, the
    MLP's gate and up). Its saved-tensor hooks are the innermost, so hooks installed around the forward see
    nothing of what is saved under them. A no-op where the recomputation is not enabled."""
    state = _find_state(model)
    if state is None:
        yield
        return
    pack = state.pack

    def observed(tensor: torch.Tensor) -> Any:
        out = pack(tensor)
        for kept in (out,) if isinstance(out, torch.Tensor) else out.noted.holds:
            observe(kept)
        return out

    state.pack = observed  # type: ignore[method-assign]
    try:
        yield
    finally:
        state.pack = pack  # type: ignore[method-assign]


def _find_state(model: nn.Module) -> Recompute | None:
    for candidate in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        state = getattr(candidate, _ATTRIBUTE, None) if candidate is not None else None
        if state is not None:
            return state
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def _norm_hook(state: Recompute) -> Callable[..., None]:
    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if state.active and len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
            x = inputs[0]
            state.note(id(module), output, lambda: module(x), (x,))

    return hook


def _mlp_hooks(state: Recompute, mlp: nn.Module) -> list[Any]:
    """Note act(gate) and act(gate) * up for one MLP; the product only where it is what down_proj reads."""
    seen: dict[str, torch.Tensor] = {}
    act = mlp.act_fn

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if state.active and isinstance(output, torch.Tensor):
                seen[name] = output
        return hook

    def act_hook(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if state.active and len(inputs) == 1 and isinstance(inputs[0], torch.Tensor):
            gate = inputs[0]
            state.note(id(act), output, lambda: act(gate), (gate,))
            if isinstance(output, torch.Tensor) and output.numel():
                seen["act"] = output

    def down_hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
        gate, up, act_out = seen.pop("gate", None), seen.pop("up", None), seen.pop("act", None)
        if gate is None or up is None or len(inputs) != 1:
            return
        # The backward asks for the product first (down_proj's adapter), then for act(gate) (the product's own
        # backward): the product's recipe makes act(gate) through act's note, which keeps it for that reader.
        act_noted = state.noted.get(act_out.untyped_storage().data_ptr()) if act_out is not None else None

        def product() -> torch.Tensor:
            if is_fused(mlp):  # kernels/gated_mlp.py: the same product, without a whole act(gate)
                return silu_product(gate, up)
            if act_noted is None or state.remaking:  # the first forward's check: keep nothing
                return act(gate) * up
            return act_noted.peek() * up

        state.note(id(mlp), inputs[0], product, (gate, up))

    return [
        mlp.gate_proj.register_forward_hook(keep("gate")),
        mlp.up_proj.register_forward_hook(keep("up")),
        act.register_forward_hook(act_hook),
        mlp.down_proj.register_forward_pre_hook(down_hook),
    ]
