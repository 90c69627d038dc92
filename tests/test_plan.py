"""The planner against the real thing: a real training step on the built-in models, on the CPU.

Weights, gradients and optimizer state are counted from the model after attach and one optimizer step and must
equal the plan to the byte; the bytes autograd keeps (saved_tensors_hooks, plus what checkpointing keeps for
its recomputation) and the loss head's transient (the allocator's own record, torch.profiler) within 10%.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from orpo_cli.adapters import build_adapter
from orpo_cli.batching import collate_pairs
from orpo_cli.builtin import materialize_builtin
from orpo_cli.data import TokenizedPair
from orpo_cli.engine import _build_optimizer
from orpo_cli.forward import orpo_forward
from orpo_cli.modeling import load_model
from orpo_cli.plan import (
    ModelShape,
    PairLengths,
    StepSetup,
    activation_bytes,
    batch_shape,
    head_transient,
    optimizer_state_bytes,
    plan_step,
    recompute_bytes,
    trainable_tensors,
    weight_bytes,
)
from orpo_cli.recipe import FullSettings, LoraSettings, ModelSettings, QuantizationSettings, TrainSettings

CPU = torch.device("cpu")
LENGTHS = (PairLengths(20, 30, 25), PairLengths(15, 40, 35), PairLengths(30, 10, 20))
LORA_R = 8


def _pairs(lengths=LENGTHS) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(10, 2000, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p.prompt), ids(p.chosen), ids(p.rejected)) for p in lengths]


def _model(name: str, mode: str, gc: bool, dropout: float = 0.0):
    path = str(materialize_builtin(name))
    quant = QuantizationSettings(mode="4bit") if mode == "qlora" else QuantizationSettings()
    model = load_model(ModelSettings(name_or_path=path), quant, CPU, torch.float32)
    settings = FullSettings() if mode == "full" else LoraSettings(r=LORA_R, dropout=dropout)
    adapter = build_adapter(settings)
    model = adapter.attach(model, quantized=mode == "qlora", gradient_checkpointing=gc)
    model.train()
    return path, model, adapter


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _weight_storages(model) -> dict[int, int]:
    """Every parameter's storage, and the 4-bit weights' quantization constants (not parameters, but weights)."""
    out = dict(_storage(p) for p in model.parameters())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        tensors = [state.absmax, state.code, getattr(state, "offset", None)]
        if getattr(state, "state2", None) is not None:
            tensors += [state.state2.absmax, state.state2.code]
        out.update(_storage(t) for t in tensors if isinstance(t, torch.Tensor))
    return out


def _measure(name: str, mode: str, layout: str, gc: bool, optimizer: str = "adamw", dropout: float = 0.0):
    """Bytes of a real step: weights, trainable, gradients, optimizer state, saved activations."""
    path, model, adapter = _model(name, mode, gc, dropout)
    weights = _weight_storages(model)
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        key, nbytes = _storage(t)
        if key not in weights:
            saved[key] = nbytes

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    # What non-reentrant checkpointing keeps for its recomputation is held by the recompute closure, not by a
    # saved-tensor hook: count the floating tensors handed to every checkpointed call.
    import orpo_cli.loss as loss_module

    def counting(fn):
        def wrapper(function, *args, **kwargs):
            bound = list(getattr(function, "args", ())) + list(getattr(function, "keywords", {}).values())
            for value in list(args) + list(kwargs.values()) + bound:
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    keep(value)
                elif isinstance(value, tuple):
                    for v in value:
                        if isinstance(v, torch.Tensor) and v.is_floating_point():
                            keep(v)
            return fn(function, *args, **kwargs)

        return wrapper

    for module in model.modules():
        if getattr(module, "_gradient_checkpointing_func", None) is not None and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = counting(module._gradient_checkpointing_func)
    original_checkpoint = loss_module.checkpoint
    loss_module.checkpoint = counting(original_checkpoint)
    try:
        batch = collate_pairs(_pairs(), 0, layout=layout)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            terms = orpo_forward(model, adapter, batch, lam=0.1, nll_on_prompt=False,
                                 layout="padded" if layout == "padded" else None)
    finally:
        loss_module.checkpoint = original_checkpoint
    terms.loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.grad.untyped_storage().nbytes() for p in params)
    opt = _build_optimizer(params, TrainSettings(optimizer=optimizer, lr=1e-4))
    opt.step()
    seen: set[int] = set()
    state = 0
    for per_param in opt.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                state += value.untyped_storage().nbytes()
    return {
        "config": json.loads((Path(path) / "config.json").read_text()),
        "weights": sum(weights.values()) - sum(_storage(p)[1] for p in params),
        "trainable": sum(_storage(p)[1] for p in params),
        "gradients": grads,
        "optimizer": state,
        "saved": sum(saved.values()),
    }


def _setup(mode: str, layout: str, gc: bool, optimizer: str = "adamw", dropout: float = 0.0) -> StepSetup:
    return StepSetup(
        pairs=LENGTHS,
        quantization="4bit" if mode == "qlora" else "none",
        weight_bytes=4,
        autocast_bytes=None,
        adapter="none" if mode == "full" else "lora",
        lora_r=LORA_R,
        lora_dropout=dropout,
        optimizer=optimizer,
        gradient_checkpointing=gc,
        layout=layout,
        cuda=False,
    )
