"""Adapters behind one interface, registered in one place."""

from __future__ import annotations

from collections.abc import Callable

from orpo_cli.adapters.base import Adapter, InferenceAdapter, NoAdapter, count_parameters, trainable_state
from orpo_cli.adapters.full import FullAdapter
from orpo_cli.adapters.lora import LoraAdapter
from orpo_cli.adapters.reft.adapter import ReftAdapter
from orpo_cli.recipe import AdapterSettings

# The implementation of each `adapter.kind` of the recipe (orpo_cli.recipe.ADAPTER_MODELS lists the kinds;
# tests/test_recipe.py holds the two lists to each other).
_ADAPTERS: dict[str, Callable[..., Adapter]] = {
    "lora": LoraAdapter,
    "reft": ReftAdapter,
    "full": lambda _settings: FullAdapter(),
}


def build_adapter(settings: AdapterSettings) -> Adapter:
    """The adapter a recipe's `adapter:` section asks for."""
    build = _ADAPTERS.get(settings.kind)
    if build is None:
        from orpo_cli.errors import UserError

        raise UserError(f"adapter.kind: {settings.kind} is not available in this version")
    return build(settings)


__all__ = ["Adapter", "InferenceAdapter", "NoAdapter", "build_adapter", "count_parameters", "trainable_state"]
