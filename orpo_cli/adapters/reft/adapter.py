"""ReFT (LoReFT, NoReFT, DiReFT) behind the adapter interface; the interventions live in interventions.py.

The interventions hang on the model as `model.reft_interventions` (a `ReftStack`), so they train, are
checkpointed and restored by name like any parameter; the base model is frozen. A ReFT adapter is not
mergeable: export writes this bundle (`reft_config.json` + `reft_adapter.safetensors`) for `generate`.

`forward_context` takes each row's prompt length from the batch:

* `attention_mask` [rows, L] and `prompt_lengths` [rows]: one prompt per row (generation, either padding
  side; without `prompt_lengths`, each row's real tokens are its prompt);
* `attention_mask` [2B, L] and `prompt_lengths` [B]: the padded training layout of `batching.collate_pairs`,
  rows i (chosen) and B+i (rejected) share prompt i and so its edit positions;
* the prefix-shared training layout (one `[prompt | chosen | rejected]` row per pair, a 4-D mask and
  `position_ids` given to the model) is the first case: its prompt is edited once, and both responses
  attend to that one edited copy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from orpo_cli.adapters.reft.interventions import (
    ATTRIBUTE,
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    Positions,
    ReftStack,
    decoder_layers,
    find_stack,
    get_weights,
    set_weights,
)
from orpo_cli.errors import UserError, stage
from orpo_cli.models.loading import model_name as _model_name
from orpo_cli.recipe import ReftSettings


class ReftAdapter:
    name = "reft"
    mergeable = False
    packs_pairs = ReftSettings.packs_pairs  # its one home: the recipe's settings (the planner reads it there)
    speed_paths = ()  # none of its own (orpo_cli/kernels' STEP_PATHS still apply)
    trains_base = ReftSettings.trains_base
    fsdp_refusal = (
        "adapter.kind: reft does not combine with fsdp: its interventions run from hooks, outside the "
        "modules fsdp gathers weights for; use strategy ddp (ReFT's trainable weights are tiny)"
    )

    def __init__(self, settings: ReftSettings):
        self.settings = settings

    @stage("attaching the ReFT adapter", blame="adapter")
    def attach(self, model: nn.Module, *, quantized: bool, gradient_checkpointing: bool) -> nn.Module:
        s = self.settings
        layers = _check_layers(model, s.layers, "adapter.layers")
        positions = Positions.parse(s.positions)
        if positions.first == 0 and positions.last == 0:
            raise UserError(f"adapter.positions: {s.positions} edits no position; use e.g. f1+l1")
        # The base stays frozen whether or not it is quantized: only the interventions train. They live in
        # fp32 beside 4-bit weights too, so nothing else is needed for a quantized base. Non-reentrant
        # checkpointing needs no input that requires grad, so a frozen base is fine with it.
        model.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        stack = ReftStack(
            hidden_size=_hidden_size(model),
            layers=layers,
            positions=positions,
            rank=s.rank,
            tied=s.tied,
            intervention=s.intervention,
            dropout=s.dropout,
            act_fn=s.act_fn,
        )
        _mount(model, stack)
        return model

    def forward_context(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> AbstractContextManager[None]:
        return find_stack(model).prompts(row_prompt_lengths(batch))

    def disabled(self, model: nn.Module) -> AbstractContextManager[None] | None:
        return find_stack(model).off()

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save_file

        stack = find_stack(model)
        tensors = {
            f"layers.{layer}.{group}.{name}": value
            for layer, groups in stack.layers.items()
            for group, module in groups.items()
            for name, value in get_weights(module).items()
        }
        config = {
            "format": "orpo-tune-reft",
            "format_version": FORMAT_VERSION,
            "base_model": _model_name(model),
            "num_layers": len(decoder_layers(model)),
            **stack.settings(),
            "dtype": "float32",
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @stage("loading the adapter", blame="{adapter_dir}")
    def load(self, base: nn.Module, adapter_dir: Path) -> nn.Module:
        from safetensors.torch import load_file

        config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise UserError(f"{adapter_dir}: not a ReFT adapter (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{config_path}: ReFT format version {config.get('format_version')!r}; this version reads {FORMAT_VERSION}"
            )
        hidden = _hidden_size(base)
        if config["hidden_size"] != hidden:
            raise UserError(
                f"{config_path}: the adapter was trained on a model with hidden size {config['hidden_size']} "
                f"({config.get('base_model')}); {_model_name(base)} has {hidden}"
            )
        base.requires_grad_(False)
        stack = ReftStack(
            hidden_size=hidden,
            layers=_check_layers(base, config["layers"], f"{config_path}: layers"),
            positions=Positions.parse(config["positions"]),
            rank=config["rank"],
            tied=config["tied"],
            intervention=config["type"],
            dropout=config["dropout"],
            act_fn=config["act_fn"],
        )
        tensors = load_file(str(weights_path))
        expected = {f"layers.{layer}.{group}" for layer, groups in stack.layers.items() for group in groups}
        found = {key.rsplit(".", 1)[0] for key in tensors}
        if found != expected:
            raise UserError(
                f"{weights_path}: holds interventions {sorted(found)}, its config asks for {sorted(expected)}"
            )
        _mount(base, stack)
        for layer, groups in stack.layers.items():
            for group, module in groups.items():
                prefix = f"layers.{layer}.{group}."
                set_weights(module, {name: tensors[prefix + name] for name in ("R", "W", "b")})
        stack.requires_grad_(False)
        return base

    def merge(self, model: nn.Module) -> nn.Module:
        raise UserError(
            "a ReFT adapter edits activations at prompt positions and cannot be merged into the weights; "
            "export writes it as a bundle (base model + reft_config.json + reft_adapter.safetensors)"
        )


def row_prompt_lengths(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One prompt length per row of `batch` (see the module docstring for the two layouts)."""
    mask = batch["attention_mask"]
    lengths = batch.get("prompt_lengths")
    if lengths is None:
        return mask.long().sum(-1)
    lengths = torch.as_tensor(lengths, device=mask.device).reshape(-1)
    rows = mask.shape[0]
    if rows == lengths.numel():
        return lengths
    if rows == 2 * lengths.numel():  # collate_pairs: chosen rows, then rejected rows of the same prompts
        return lengths.repeat(2)
    raise ValueError(
        f"ReFT: {rows} rows but {lengths.numel()} prompt lengths; give one per row, or one per pair "
        "for chosen+rejected batches"
    )


def _mount(model: nn.Module, stack: ReftStack) -> None:
    """Hang the stack on the model, each layer's interventions on that layer's device, and hook it in."""
    if isinstance(getattr(model, ATTRIBUTE, None), ReftStack):
        raise ValueError("this model already has ReFT interventions attached")
    blocks = decoder_layers(model)
    for layer, groups in stack.layers.items():
        device = next(iter(blocks[int(layer)].parameters())).device
        groups.to(device)
    stack.train(model.training)
    setattr(model, ATTRIBUTE, stack)
    stack.install(model)


def _check_layers(model: nn.Module, layers: list[int] | str, where: str) -> list[int]:
    count = len(decoder_layers(model))
    if layers == "all":
        return list(range(count))
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        names = ", ".join(str(b) for b in bad)
        verb = "does not exist" if len(bad) == 1 else "do not exist"
        raise UserError(
            f"{where}: layer{'s' if len(bad) > 1 else ''} {names} {verb}; "
            f"{_model_name(model)} has {count} layers (0-{count - 1})"
        )
    return sorted(layers)


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)


__all__ = ["ReftAdapter", "row_prompt_lengths"]
