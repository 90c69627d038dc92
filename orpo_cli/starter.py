"""`orpo-tune init`: a commented starter recipe, written from the schema's own field descriptions."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from orpo_cli.recipe import ADAPTER_MODELS, Recipe, section_model
from orpo_cli.recipe_loading import validate_recipe

# What each template changes from the defaults; everything else is the schema's default.
# model.name_or_path and data.train have no default (a recipe that lost them must not train a demo), so
# every template states both.
TEMPLATES: dict[str, dict[str, Any]] = {
    "lora": {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "adapter": {"kind": "lora"},
        "data": {"train": {"path": "builtin:demo"}},
    },
    "qlora": {
        "model": {"name_or_path": "mistralai/Mistral-7B-v0.1", "dtype": "bf16"},
        "quantization": {"mode": "4bit"},
        "adapter": {"kind": "lora"},
        "data": {"train": {"path": "builtin:demo"}},
        "train": {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": True},
    },
    "reft": {  # positions, lr and lambda as measured on SmolLM2-135M (docs/reft.md, "Choosing the settings")
        "model": {"name_or_path": "builtin:tiny-llama"},
        "adapter": {"kind": "reft"},
        "orpo": {"lambda": 1.0},
        "data": {"train": {"path": "builtin:demo"}},
        "train": {"lr": 3.0e-3},
    },
    "full": {
        "model": {"name_or_path": "builtin:tiny-llama"},
        "adapter": {"kind": "full"},
        "data": {"train": {"path": "builtin:demo"}},
    },
}


def starter_recipe(template: str, name: str) -> str:
    """A complete recipe (every field, commented with its description) for `template`."""
    recipe = validate_recipe({"name": name, **TEMPLATES[template]}, source=f"template {template}")
    data = recipe.resolved()
    lines = [
        f"# orpo-tune recipe ({template} starter). Run it with:",
        f"#   orpo-tune train {name}.yaml",
        "# Every key is described in docs/recipe-reference.md; `orpo-tune schema` prints the JSON Schema.",
        "",
    ]
    _emit(Recipe, data, 0, lines)
    return "\n".join(lines) + "\n"


def _emit(model: type[BaseModel], data: dict[str, Any], indent: int, lines: list[str]) -> None:
    pad = " " * indent
    for name, info in model.model_fields.items():
        key = info.alias or name
        value = data[key]
        if info.description:
            lines.append(f"{pad}# {info.description}")
        sub = _section_model(model, name, value)
        if sub is not None and isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            _emit(sub, value, indent + 2, lines)
        else:
            dumped = yaml.safe_dump(
                {key: value}, default_flow_style=True, sort_keys=False, width=1000
            ).strip()
            lines.append(f"{pad}{dumped[1:-1]}")  # strip the flow mapping's braces
        if indent == 0:
            lines.append("")


def _section_model(model: type[BaseModel], name: str, value: Any) -> type[BaseModel] | None:
    if name == "adapter" and isinstance(value, dict):
        return ADAPTER_MODELS[value["kind"]]
    return section_model(model, name)
