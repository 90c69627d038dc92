"""Full fine-tuning: every weight of the base trains, nothing sits beside it; the 'adapter' saved is the whole
model. (A model run without any adapter is base.NoAdapter.)"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from orpo_cli.errors import stage
from orpo_cli.recipe import FullSettings


class FullAdapter:
    name = "full"
    mergeable = True
    packs_pairs = FullSettings.packs_pairs  # its one home: the recipe's settings (the planner reads it there)
    speed_paths = ()  # none of its own (orpo_cli/kernels' STEP_PATHS still apply)
    trains_base = FullSettings.trains_base
    fsdp_refusal = (
        "adapter.kind: full (full fine-tuning) does not combine with fsdp here: the loss uses the output "
        "layer outside the model's forward, so fsdp keeps it whole and cannot train it; use strategy ddp "
        "or deepspeed"
    )

    @stage("preparing full fine-tuning", blame="adapter")
    def attach(self, model: nn.Module, *, quantized: bool, gradient_checkpointing: bool) -> nn.Module:
        model.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def forward_context(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def disabled(self, model: nn.Module) -> AbstractContextManager[None] | None:
        return None  # the base weights are gone: load the base model again instead

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    @stage("loading the fine-tuned weights", blame="{adapter_dir}")
    def load(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for shard in sorted(adapter_dir.glob("*.safetensors")):
            state.update(load_file(str(shard)))
        missing, unexpected = base.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{adapter_dir}: weights the base model does not have: {unexpected[:3]}")
        return base

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # the trained weights are the model
