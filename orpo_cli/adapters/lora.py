"""LoRA (and DoRA, rsLoRA) through PEFT, saved in PEFT's own format so other tools load it."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from orpo_cli.recipe import LoraSettings


class LoraAdapter:
    mergeable = True
    packs_pairs = True
    kind = "lora"

    def __init__(self, settings: LoraSettings):
        self.settings = settings

    def attach(self, model: nn.Module, *, quantized: bool, gradient_checkpointing: bool) -> nn.Module:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if quantized:
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        s = self.settings
        config = LoraConfig(
            r=s.r,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            target_modules=s.target_modules,
            use_dora=s.use_dora,
            use_rslora=s.use_rslora,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)

    def forward_context(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    def disabled(self, model: nn.Module) -> AbstractContextManager[None] | None:
        return model.disable_adapter()

    def save(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(str(out_dir), safe_serialization=True)

    def load(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)

    def merge(self, model: nn.Module) -> nn.Module:
        # W + (alpha/r)·BA into each adapted Linear, then drop the PEFT wrapper: a plain transformers model.
        return model.merge_and_unload(safe_merge=True)
