"""Adapters behind one interface, registered in one place."""

from __future__ import annotations

from orpo_cli.adapters.base import Adapter, count_parameters, trainable_state
from orpo_cli.adapters.full import FullAdapter
from orpo_cli.adapters.lora import LoraAdapter
from orpo_cli.adapters.reft.adapter import ReftAdapter
from orpo_cli.recipe import FullSettings, LoraSettings, ReftSettings


def build_adapter(settings: LoraSettings | ReftSettings | FullSettings) -> Adapter:
    """The adapter a recipe's `adapter:` section asks for."""
    if isinstance(settings, LoraSettings):
        return LoraAdapter(settings)
    if isinstance(settings, ReftSettings):
        return ReftAdapter(settings)
    if isinstance(settings, FullSettings):
        return FullAdapter()
    from orpo_cli.errors import UserError

    raise UserError(f"adapter.kind: {settings.kind} is not available in this version")


__all__ = ["Adapter", "build_adapter", "count_parameters", "trainable_state"]
