"""`orpo-tune train`: check everything cheap, set up data/model/adapter from the recipe, then fit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orpo_cli.errors import UserError
from orpo_cli.recipe import Recipe
from orpo_cli.rundir import RunDir

# Keys that may change between a run and its --resume (how long, how often); anything else must match.
_RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "output_dir",
}


def run_dir_for(recipe: Recipe) -> RunDir:
    return RunDir(Path(recipe.output_dir or Path("runs") / (recipe.name or "run")))


def start_run(recipe: Recipe, *, resume: bool, force: bool) -> RunDir:
    """Train the recipe into its run directory; returns the run directory."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from orpo_cli.adapters import build_adapter, count_parameters
    from orpo_cli.atomic import atomic_dir, atomic_write_text
    from orpo_cli.data import check_source, prepare_data
    from orpo_cli.engine import fit
    from orpo_cli.modeling import (
        check_model_source,
        check_quantization,
        load_model,
        load_tokenizer,
        pick_device,
        resolve_dtype,
    )
    from orpo_cli.progress import Reporter

    run = run_dir_for(recipe)
    # ---- cheap checks first: errors in seconds, before anything is loaded or written
    if resume and force:
        raise UserError("--resume and --force contradict each other: pick one")
    if resume:
        _check_same_recipe(run, recipe)
    elif run.root.exists() and any(run.root.iterdir()) and not force:
        run.prepare(resume=False, force=False)  # raises the "exists" error
    device = pick_device(recipe.model.device)
    check_quantization(recipe.quantization, device)
    check_model_source(recipe.model)
    check_source(recipe.data)

    dtype = resolve_dtype(recipe.model.dtype, device)
    mixed = recipe.train.mixed_precision
    if mixed == "auto":
        mixed = (
            {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
            if device.type == "cuda"
            else "no"
        )
    accelerator = Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed,
        log_with="tensorboard" if recipe.train.tensorboard else None,
        project_dir=str(run.root),
    )
    reporter = Reporter(enabled=accelerator.is_main_process)
    set_seed(recipe.seed)

    tokenizer = load_tokenizer(
        recipe.model.name_or_path, recipe.model.revision, recipe.model.trust_remote_code
    )
    data = prepare_data(recipe.data, recipe.orpo, tokenizer)
    reporter.note(data.stats.summary())

    model = load_model(recipe.model, recipe.quantization, device, dtype)
    adapter = build_adapter(recipe.adapter)
    model = adapter.attach(
        model,
        quantized=recipe.quantization.mode != "none",
        gradient_checkpointing=recipe.train.gradient_checkpointing,
    )
    trainable, total = count_parameters(model)
    reporter.note(
        f"model: {recipe.model.name_or_path} on {device} ({str(dtype).removeprefix('torch.')}, "
        f"quantization {recipe.quantization.mode}); adapter {recipe.adapter.kind}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.4f}%)"
    )

    # ---- the run directory: only now that everything checked out
    if accelerator.is_main_process:
        run.prepare(resume=resume, force=force)
        atomic_write_text(run.recipe, recipe.to_yaml())
        if not run.tokenizer.is_dir():
            with atomic_dir(run.tokenizer, replace=True) as tmp:
                tokenizer.save_pretrained(str(tmp))
    accelerator.wait_for_everyone()
    if recipe.train.tensorboard:
        accelerator.init_trackers("tensorboard", config=_flat_config(recipe.resolved()))

    result = fit(
        model=model,
        adapter=adapter,
        train_pairs=data.train,
        eval_pairs=data.eval,
        train=recipe.train,
        orpo=recipe.orpo,
        run=run,
        accelerator=accelerator,
        pad_token_id=tokenizer.pad_token_id,
        seed=recipe.seed,
        resume=resume,
        reporter=reporter,
    )
    if accelerator.is_main_process:
        with atomic_dir(run.adapter, replace=True) as tmp:
            adapter.save(accelerator.unwrap_model(model), tmp)
    accelerator.wait_for_everyone()
    accelerator.end_training()

    if result.first_eval or result.last_eval:
        keys = ["rewards/accuracies", "log_odds_ratio", "rewards/margins", "nll_loss", "loss"]
        rows = [
            [
                k,
                result.first_eval.get(f"eval_{k}", float("nan")),
                result.last_eval.get(f"eval_{k}", float("nan")),
            ]
            for k in keys
        ]
        reporter.table(
            f"eval: step 0 vs step {result.steps}", ["metric", "step 0", f"step {result.steps}"], rows
        )
    reporter.note(f"run directory: {run.root}  (adapter in {run.adapter})")
    return run


def _check_same_recipe(run: RunDir, recipe: Recipe) -> None:
    import yaml

    if not run.recipe.is_file():
        raise UserError(f"--resume: {run.root} holds no run to resume (no recipe.yaml); drop --resume")
    saved = yaml.safe_load(run.recipe.read_text(encoding="utf-8"))
    changed = sorted(k for k in _diff(saved, recipe.resolved()) if k not in _RESUMABLE_CHANGES)
    if changed:
        raise UserError(
            f"--resume: the recipe differs from the run's {run.recipe} at {', '.join(changed)}; "
            "resume with the same settings, or start a new run"
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """TensorBoard hparams want flat scalars."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat
