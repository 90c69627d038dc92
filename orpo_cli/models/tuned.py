"""Loading a tuned model back, from any of the three things `train` and `export` write.

    run directory  RUN/recipe.yaml, RUN/adapter/, RUN/tokenizer/ (see rundir.py): the base model as the
                   recipe loads it (quantized as it trained) with the adapter put back on.
    bundle         DIR/orpo-bundle.json, DIR/adapter/, DIR/tokenizer/, DIR/orpo-tune-recipe.yaml and, for
                   builtin: bases, DIR/base/: what `export` writes for an adapter that cannot be merged (ReFT).
    merged model   DIR/config.json + weights + tokenizer: a plain transformers model (a LoRA or full export,
                   or any causal LM directory); DIR/orpo-tune-recipe.yaml, when there, tells the prompt format.
    builtin:NAME   a built-in model (builtin.py), built into its cache on first use, then a merged model.

Everything here is adapter-agnostic: the adapter comes from `build_adapter(recipe.adapter)` and goes on
through its own `load`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orpo_cli import adapters
from orpo_cli.adapters import InferenceAdapter
from orpo_cli.errors import UserError, stage
from orpo_cli.recipe import QuantizationSettings, Recipe
from orpo_cli.recipe_loading import parse_yaml, validate_recipe
from orpo_cli.rundir import RunDir

BUNDLE_MANIFEST = "orpo-bundle.json"
BUNDLE_FORMAT = "orpo-tune-bundle"
EXPORT_RECIPE = "orpo-tune-recipe.yaml"
GGUF_MANIFEST = "orpo-gguf.json"  # an `export --format gguf` directory: run by llama.cpp (models/gguf_runtime.py)  # not recipe.yaml: an export must not pass for a run directory


@dataclass
class Tuned:
    """A tuned model ready for inference, with what it takes to prompt it."""

    model: nn.Module
    adapter: InferenceAdapter  # forward_context() goes around every forward and generate
    tokenizer: Any
    recipe: Recipe | None  # None for a model directory orpo-tune did not write
    device: torch.device


def read_recipe(path: Path) -> Recipe:
    """The resolved recipe saved beside a run or an export."""
    try:
        data = parse_yaml(Path(path).read_text(encoding="utf-8"), str(path))  # a key twice is an error here too
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the saved recipe ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the saved recipe is not a YAML mapping")
    return validate_recipe(data, source=str(path))


def detect(path: Path) -> str:
    """What `path` holds: "run", "bundle", "gguf" or "model"; anything else is a user error."""
    from orpo_cli.models.builtin import check_builtin, is_builtin

    if is_builtin(str(path)):
        check_builtin(str(path))
        return "model"
    path = Path(path)
    if not path.is_dir():
        raise UserError(
            f"{path}: no such directory; give a run directory, an `orpo-tune export`, a model directory or builtin:NAME"
        )
    if (path / BUNDLE_MANIFEST).is_file():
        return "bundle"
    if (path / GGUF_MANIFEST).is_file():
        return "gguf"
    if (path / "recipe.yaml").is_file():
        return "run"
    if (path / "config.json").is_file():
        return "model"
    raise UserError(
        f"{path}: neither a run directory (recipe.yaml), an orpo-tune bundle ({BUNDLE_MANIFEST}) nor a model "
        "directory (config.json)"
    )


def load_tuned(path: Path) -> Tuned:
    """Whatever `path` holds (see the module docstring), loaded for inference."""
    from orpo_cli.models.builtin import is_builtin, resolve_model_path

    kind = detect(path)
    if is_builtin(str(path)):
        return load_merged(Path(resolve_model_path(str(path))))
    if kind == "run":
        return load_run(RunDir(Path(path)))
    if kind == "bundle":
        return load_bundle(Path(path))
    return load_merged(Path(path))


def inference_device(recipe: Recipe | None) -> torch.device:
    """Where eval and generate run: the GPU when there is one, unless the recipe pinned the CPU."""
    from orpo_cli.models.loading import pick_device

    return pick_device("cpu" if recipe is not None and recipe.model.device == "cpu" else "auto")


def load_base(
    recipe: Recipe,
    device: torch.device,
    *,
    name_or_path: str | None = None,
    full_precision: bool = False,
) -> nn.Module:
    """The recipe's base model as it trained (dtype, quantization), or unquantized fp32 with full_precision."""
    from orpo_cli.models.loading import check_quantization, load_model, resolve_dtype

    settings = recipe.model if name_or_path is None else recipe.model.model_copy(update={"name_or_path": name_or_path})
    if full_precision:
        return load_model(settings, QuantizationSettings(mode="none"), device, torch.float32)
    check_quantization(recipe.quantization, device)
    return load_model(settings, recipe.quantization, device, resolve_dtype(recipe.model.dtype, device))


def load_run(run: RunDir, *, device: torch.device | None = None) -> Tuned:
    """Base (as trained) + the run's adapter + the run's tokenizer."""
    recipe = read_recipe(run.recipe)
    check_trained(run)
    device = device or inference_device(recipe)
    tokenizer = load_saved_tokenizer(run.tokenizer)
    adapter = adapters.build_adapter(recipe.adapter)
    model = adapter.load(load_base(recipe, device), run.adapter)
    return Tuned(_ready(model), adapter, tokenizer, recipe, device)


def check_trained(run: RunDir) -> None:
    """A run whose training has not finished has no adapter to load yet."""
    if not run.adapter.is_dir() or not any(run.adapter.iterdir()):
        raise UserError(
            f"{run.root}: no trained adapter yet ({run.adapter} is missing): training has not finished; "
            "let it finish, or `orpo-tune train ... --resume` it"
        )
    if not run.tokenizer.is_dir():
        raise UserError(f"{run.root}: {run.tokenizer} is missing; the run directory is incomplete")


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((Path(path) / BUNDLE_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable {BUNDLE_MANIFEST} ({err.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{path}: {BUNDLE_MANIFEST} is not an orpo-tune bundle manifest")
    return manifest


def bundle_base(path: Path, manifest: dict[str, Any]) -> str:
    """The bundle's base model: its own copy (a path inside the bundle) or the reference it names."""
    base = str(manifest["base_model"])
    if manifest.get("base_copied"):
        return str((Path(path) / base).resolve())
    return base


def load_bundle(path: Path, *, device: torch.device | None = None) -> Tuned:
    """A non-mergeable export: its base (copied or referenced) + its adapter + its tokenizer."""
    path = Path(path)
    manifest = read_manifest(path)
    recipe = read_recipe(path / EXPORT_RECIPE)
    device = device or inference_device(recipe)
    tokenizer = load_saved_tokenizer(path / "tokenizer")
    adapter = adapters.build_adapter(recipe.adapter)
    base = load_base(recipe, device, name_or_path=bundle_base(path, manifest))
    model = adapter.load(base, path / "adapter")
    return Tuned(_ready(model), adapter, tokenizer, recipe, device)


def load_merged(path: Path, *, device: torch.device | None = None) -> Tuned:
    """A plain transformers causal LM directory (a merged export, or any model)."""
    from transformers import AutoModelForCausalLM

    from orpo_cli.models.loading import _mismatched, quiet_libraries, shape_mismatch

    quiet_libraries()
    path = Path(path)
    recipe = read_recipe(path / EXPORT_RECIPE) if (path / EXPORT_RECIPE).is_file() else None
    device = device or inference_device(recipe)
    tokenizer = load_saved_tokenizer(path)
    with stage("loading the model", blame=str(path)):  # what else the loader may raise on a broken directory
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
        except RuntimeError as err:
            mismatch = shape_mismatch(path) if _mismatched(err) else None
            if mismatch is None:
                raise
            raise UserError(f"{path}: {mismatch}") from None
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
            raise UserError(f"{path}: cannot load it as a causal language model: {first}") from None
    model.to(device)
    return Tuned(_ready(model), adapters.NoAdapter(), tokenizer, recipe, device)


def load_saved_tokenizer(path: Path) -> Any:
    """A tokenizer saved by train or export (chat template included), with a pad token guaranteed."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
        raise UserError(f"{path}: cannot load the tokenizer: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _ready(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = True  # training turned the KV cache off; generation wants it
    return model
