"""LoRA (and DoRA, rsLoRA) through PEFT, saved in PEFT's own format so other tools load it."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from orpo_cli.adapters.lora_inplace import SPEED_PATH as LORA_INPLACE
from orpo_cli.errors import UserError, stage
from orpo_cli.recipe import LoraSettings


class LoraAdapter:
    name = "lora"
    mergeable = True
    packs_pairs = LoraSettings.packs_pairs  # its one home: the recipe's settings (the planner reads it there)
    speed_paths = (LORA_INPLACE,)  # adapters/lora_inplace.py: the update added into the base output
    trains_base = LoraSettings.trains_base
    fsdp_refusal = None

    def __init__(self, settings: LoraSettings):
        self.settings = settings

    @stage("attaching the LoRA adapter", blame="adapter")
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
        if isinstance(s.target_modules, list):
            check_target_modules(model, s.target_modules)
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

    @stage("loading the adapter", blame="{adapter_dir}")
    def load(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        from peft import PeftModel

        missing = [n for n in ("adapter_config.json", "adapter_model.safetensors") if not (adapter_dir / n).is_file()]
        if missing:  # else PEFT takes the directory for a hub id and says that instead
            raise UserError(f"{adapter_dir}: not a complete LoRA adapter (no {' or '.join(missing)})")
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)

    def merge(self, model: nn.Module) -> nn.Module:
        # W + (alpha/r)·BA into each adapted Linear, then drop the PEFT wrapper: a plain transformers model.
        return model.merge_and_unload(safe_merge=True)


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Each `adapter.target_modules` entry names modules of this model that LoRA can adapt.

    PEFT matches an entry against a module's full name or its last dotted parts, and raises a long
    traceback when one matches nothing or matches a layer type it cannot adapt (a norm); this says which
    names the model does have, before PEFT is asked.
    """
    adaptable = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)
    try:
        from transformers.pytorch_utils import Conv1D

        adaptable += (Conv1D,)
    except ImportError:  # an old transformers: GPT-2's Conv1D is then not in play
        pass
    modules = dict(model.named_modules())
    names = sorted({name.rsplit(".", 1)[-1] for name, module in modules.items() if isinstance(module, adaptable)})
    from orpo_cli.models.loading import model_name

    for target in targets:
        matched = [m for name, m in modules.items() if name and (name == target or name.endswith("." + target))]
        if not matched:
            raise UserError(
                f"adapter.target_modules: '{target}' matches no module of {model_name(model)}; its modules LoRA can "
                f"adapt are named: {', '.join(names)} (or use target_modules: all-linear)"
            )
        if not any(isinstance(m, adaptable) for m in matched):
            kinds = ", ".join(sorted({type(m).__name__ for m in matched}))
            raise UserError(
                f"adapter.target_modules: '{target}' names {kinds} modules, which LoRA cannot adapt; "
                f"adaptable modules are named: {', '.join(names)}"
            )
