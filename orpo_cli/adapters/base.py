"""The one interface every adapter (LoRA, ReFT, full fine-tuning) offers; the engine never asks which it is.

What differs between the methods is a capability here (`mergeable`, `packs_pairs`, `trains_base`,
`fsdp_refusal`), never a test of `adapter.kind` elsewhere. A model without any adapter (a base loaded again to
compare with, a merged export) runs through :class:`NoAdapter`, which offers only the inference half.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from orpo_cli.kernels.paths import SpeedPath


class InferenceAdapter(Protocol):
    """What eval, export's checks and generate need around a model's forward passes."""

    packs_pairs: bool  # True when several pairs may share a batch row (it reads nothing per row): LoRA, full
    speed_paths: tuple[SpeedPath, ...]  # its own speed paths (LoRA's in-place update), for kernels.apply_speed_paths

    def forward_context(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> AbstractContextManager[None]:
        """Context around forward passes over `batch` (needs at least `attention_mask` and `prompt_lengths`:
        each row's real prompt length, whatever the padding side), in training and in generation."""
        ...

    def disabled(self, model: nn.Module) -> AbstractContextManager[None] | None:
        """Context in which `model` behaves as its base model, or None when that is impossible (full fine-tuning)."""
        ...


class Adapter(InferenceAdapter, Protocol):
    """What training, eval, export and generate need from an adapter."""

    name: str  # the recipe's `adapter.kind` it implements, as messages and a bundle's manifest name it
    mergeable: bool  # True when export can fold the adapter into the base weights (LoRA, full fine-tuning)
    trains_base: bool  # True when the base's own weights train and nothing sits beside them (full fine-tuning)
    fsdp_refusal: str | None  # why it cannot train under distributed.strategy fsdp (the whole error line), or None

    def attach(self, model: nn.Module, *, quantized: bool, gradient_checkpointing: bool) -> nn.Module:
        """Freeze what must not train, add the trainable parts, and return the model to train."""
        ...

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained adapter (safetensors and a small config) into out_dir."""
        ...

    def load(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        """Put a saved adapter onto a freshly loaded base model, ready for inference."""
        ...

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the adapter into the weights of a full-precision base and return a plain transformers model.

        Called only when `mergeable` is True (export); a non-mergeable adapter may leave it out or raise.
        """
        ...


class NoAdapter:
    """No adapter at all: a plain model run as it is (a base model loaded again to compare with, a merged export
    loaded back). Not full fine-tuning (FullAdapter), which trains and saves the base's own weights."""

    packs_pairs = True  # a plain model reads nothing per row
    speed_paths = ()

    def forward_context(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def disabled(self, model: nn.Module) -> AbstractContextManager[None] | None:
        return None  # nothing to switch off: whatever base the model came from is not at hand


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name: what a checkpoint must keep to resume exactly."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as the parameters they stand for."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if (
            hasattr(p, "quant_state") or p.dtype == torch.uint8
        ):  # bitsandbytes packs two 4-bit values per byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
