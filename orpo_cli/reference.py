"""docs/recipe-reference.md, generated from the schema's field descriptions (a test keeps it current)."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from orpo_cli.recipe import ADAPTER_MODELS, Recipe, section_model

_HEADER = """# Recipe reference

Generated from the schema (`orpo_cli/recipe.py`) by `orpo-tune schema --markdown`; do not edit by hand.
Every key can be set in the YAML file or overridden with `--set key.path=value`. Unknown keys are errors.
"""


def recipe_reference() -> str:
    """The whole reference as Markdown: one table per section, adapters one table per kind."""
    parts = [_HEADER, "## top level\n", _table(Recipe, "")]
    for name, info in Recipe.model_fields.items():
        key = info.alias or name
        if name == "adapter":
            parts.append(f"## `adapter`\n\n{info.description} Pick one with `adapter.kind`.\n")
            for kind, model in ADAPTER_MODELS.items():
                parts += [f"### `adapter.kind: {kind}`\n", _table(model, "adapter.")]
            continue
        sub = section_model(Recipe, name)
        if sub is None:
            continue
        parts += [f"## `{key}`\n\n{info.description}\n", _table(sub, f"{key}.")]
        for sub_name, sub_info in sub.model_fields.items():
            inner = section_model(sub, sub_name)
            if inner is not None:
                path = f"{key}.{sub_info.alias or sub_name}"
                parts += [f"### `{path}`\n\n{sub_info.description}\n", _table(inner, f"{path}.")]
    return "\n".join(parts)


def _table(model: type[BaseModel], prefix: str) -> str:
    """The plain (non-section) fields of `model`."""
    rows = ["| key | default | description |", "| --- | --- | --- |"]
    for name, info in model.model_fields.items():
        if section_model(model, name) is not None or (model is Recipe and name == "adapter"):
            continue
        key = info.alias or name
        rows.append(f"| `{prefix}{key}` | {_default(info)} | {_escape(info.description or '')} |")
    return "\n".join(rows) + "\n"


def _default(info: Any) -> str:
    if info.default is not PydanticUndefined:
        value = info.default
    elif info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
    else:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
