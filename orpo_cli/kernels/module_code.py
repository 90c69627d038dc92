"""Recognising a module by its code, and giving the ones recognised another forward.

The fused paths (kernels/gated_mlp.py, kernels/rms_norm.py, kernels/rotary.py) replace what a model's own
code computes only where that code is, compiled, exactly the reference they were written against: read from
the code, not by running the module, so nothing is computed and no weight is touched at setup.
"""

from __future__ import annotations

import dis
import types
from collections.abc import Callable
from typing import Any

from torch import nn


def code_of(function: Any) -> tuple[Any, ...] | None:
    """What a function's compiled code does: its instructions with their arguments resolved (constants by value,
    so a docstring, which shifts the constants' indices, is no difference) and its variables; to compare it with
    a reference written out here. None for what has no Python code."""
    code = getattr(function, "__code__", None)
    if code is None:
        return None
    instructions = tuple((i.opname, repr(i.argval)) for i in dis.get_instructions(code))
    return instructions, code.co_varnames, code.co_argcount


def swap_forwards(
    model: nn.Module, qualifies: Callable[[nn.Module], bool], forward: Callable[..., Any], marker: str
) -> int:
    """Give every module of `model` that `qualifies` the instance-level `forward`, marked with `marker`
    (idempotent); returns how many have it. A module that already has an instance-level forward (someone's
    hook or wrapper) is left alone."""
    swapped = 0
    for module in model.modules():
        if getattr(module, marker, False):
            swapped += 1
            continue
        if "forward" in vars(module) or not qualifies(module):
            continue
        module.forward = types.MethodType(forward, module)
        setattr(module, marker, True)
        swapped += 1
    return swapped


def restore_forwards(model: nn.Module, marker: str) -> None:
    """Undo :func:`swap_forwards`: every module of `model` marked with `marker` runs its class's forward again."""
    for module in model.modules():
        if getattr(module, marker, False):
            vars(module).pop("forward", None)
            delattr(module, marker)
