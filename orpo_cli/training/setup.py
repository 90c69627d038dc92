"""`orpo-tune train`: check everything cheap, set up data/model/adapter from the recipe, then fit."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from orpo_cli.errors import Interrupted, RunFailed, UserError, stage, use_run_log
from orpo_cli.recipe import Recipe
from orpo_cli.rundir import RunDir
from orpo_cli.training.batching import Layout
from orpo_cli.training.distributed import Machines, QuietExit, check_processes, launch, plan_processes

# The metrics (training/metric_names.py) of train's closing table: the loop's eval at step 0 vs the last step.
EVAL_TABLE = ("rewards/accuracies", "log_odds_ratio", "rewards/margins", "nll_loss", "loss")

# Keys that may change between a run and its --resume (how long, how often); anything else must match.
_RESUMABLE_CHANGES = {
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "output_dir",
    "distributed.num_processes",  # the world size itself is checked against the checkpoint's
    # the remedies for a run whose loss diverged: continue from the last good checkpoint with a smaller
    # step. The schedule is rebuilt from the recipe and replayed to the checkpoint's step, so a new lr
    # takes effect from there on (recipe.yaml records it; metrics.jsonl logs the lr of every step).
    "train.lr",
    "train.max_grad_norm",
    # the remedy for running out of memory that changes no number: activations recomputed, not kept
    "train.gradient_checkpointing",
}


def _to_stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)


def run_dir_for(recipe: Recipe) -> RunDir:
    return RunDir(Path(recipe.output_dir or Path("runs") / (recipe.name or "run")))


def start_run(
    recipe: Recipe,
    *,
    resume: bool,
    force: bool,
    machines: Machines | None = None,
    plan_check: bool = False,
    layout: Layout | None = None,
) -> RunDir:
    """Train the recipe into its run directory; returns the run directory. `plan_check`: refuse, before anything
    loads, a recipe `orpo-tune plan` predicts to need clearly more than the GPU's free memory (one line on a CPU).
    `layout`: the batch layout; None (what train does) takes forward.batch_layout's choice for the adapter, the
    model and the data. A benchmark's ablation may force another in one process (it is not passed to workers).

    When the recipe (or --nproc) asks for several processes and this is not already one of them, this
    process launches them (torchrun's launcher) and waits; each of them comes back here as a worker.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from orpo_cli.adapters import build_adapter, count_parameters
    from orpo_cli.atomic import atomic_dir, atomic_write_text
    from orpo_cli.data.prepare import check_source, prepare_data
    from orpo_cli.models.loading import (
        check_model_source,
        check_quantization,
        load_model,
        load_tokenizer,
        pick_device,
        resolve_dtype,
    )
    from orpo_cli.plan.report import check_context_length
    from orpo_cli.progress import Reporter
    from orpo_cli.tracking import check_tracking, end_tracking, system_facts, trackers_for
    from orpo_cli.training.batching import longest_sequence
    from orpo_cli.training.forward import batch_layout
    from orpo_cli.training.loop import fit
    from orpo_cli.training.strategy import Strategy, accelerate_plugins, shape_fsdp_units

    run = run_dir_for(recipe)
    # ---- cheap checks first: errors in seconds, before anything is loaded or written
    with stage("checking the run directory", blame="output_dir"):
        run.check(resume=resume, force=force)
        resumed_changes = _check_same_recipe(run, recipe) if resume else {}
    machines = machines or Machines()
    procs = plan_processes(recipe, machines)
    check_processes(recipe, procs, resume=resume, run=run)
    device = pick_device(recipe.model.device)
    check_quantization(recipe.quantization, device)
    check_model_source(recipe.model)
    check_context_length(recipe)
    check_source(recipe.data)
    check_tracking(recipe.tracking)
    if plan_check and not procs.launched:  # the launching process checks once for all its workers
        from orpo_cli.plan.report import check_before_training

        check_before_training(recipe, world_size=procs.world_size, device=device, echo=_to_stderr)
    if procs.needs_launch:  # every check passed here once: now the workers, each back in this function
        launch(recipe, procs, machines, resume=resume, force=force)
        return run

    dtype = resolve_dtype(recipe.model.dtype, device)
    mixed = recipe.train.mixed_precision
    if mixed == "auto":
        mixed = (
            {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
            if device.type == "cuda"
            else "no"
        )
    facts = system_facts(device=str(device), dtype=str(dtype).removeprefix("torch."), processes=procs.world_size)
    trackers = trackers_for(recipe.tracking, run, run_name=recipe.name or run.root.name, facts=facts, resume=resume,
                            note=_to_stderr)
    with stage("setting up accelerate", blame="train.mixed_precision / distributed"):
        accelerator = Accelerator(
            cpu=device.type == "cpu",
            mixed_precision=mixed,
            gradient_accumulation_steps=recipe.train.gradient_accumulation,
            log_with=trackers or None,
            project_dir=str(run.root),
            **accelerate_plugins(recipe.distributed, recipe.train),
        )
    strategy = Strategy(accelerator)  # what the loop does differently under it, decided here once
    fsdp = strategy.fsdp
    reporter = Reporter(enabled=accelerator.is_main_process)
    set_seed(recipe.seed)

    tokenizer = load_tokenizer(
        recipe.model.name_or_path, recipe.model.revision, recipe.model.trust_remote_code
    )
    with stage("preparing the data"):
        data = prepare_data(recipe.data, recipe.orpo, tokenizer)
    for key, (was, now) in resumed_changes.items():
        reporter.note(f"--resume: {key} changes from {was} to {now}")
    reporter.note(data.stats.summary())

    # FSDP flattens each unit's weights into one tensor of one dtype: 4-bit weights are stored in the model's
    # dtype, and the base is not prepared for k-bit training (that would upcast its norms to fp32).
    model = load_model(
        recipe.model, recipe.quantization, device, dtype, quant_storage=dtype if fsdp else None
    )
    adapter = build_adapter(recipe.adapter)
    model = adapter.attach(
        model,
        quantized=recipe.quantization.mode != "none" and not fsdp,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
    )
    # The savings that change no number, where the weights are whole on every rank (under FSDP or ZeRO-3 a
    # layer's weights exist only inside the strategy's gathers).
    if not strategy.shards_weights:
        apply_exact_savings(model, gradient_checkpointing=recipe.train.gradient_checkpointing)
    if fsdp:
        shape_fsdp_units(accelerator, model, by_layer=recipe.distributed.fsdp.auto_wrap == "decoder_layers")
    # Once for the run: how every batch is laid out, from the adapter, the attention and the longest pair.
    layout = layout or batch_layout(adapter, model, longest_sequence([*data.train, *data.eval]))
    trainable, total = count_parameters(model)
    reporter.note(
        f"model: {recipe.model.name_or_path} on {device} ({str(dtype).removeprefix('torch.')}, "
        f"quantization {recipe.quantization.mode}); adapter {recipe.adapter.kind}: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.4f}%)"
    )
    if not strategy.resumable:
        reporter.note(f"{strategy.name}: no resumable checkpoints are written (see docs/distributed.md)")

    # ---- the run directory: only now that everything checked out
    if accelerator.is_main_process:
        created = not run.holds_anything()  # (its lock aside: cli.train holds it)
        try:
            with stage("writing the run directory", blame="output_dir"):
                run.prepare(resume=resume, force=force)
                atomic_write_text(run.recipe, recipe.to_yaml())
                if not run.tokenizer.is_dir():
                    with atomic_dir(run.tokenizer, replace=True) as tmp:
                        tokenizer.save_pretrained(str(tmp))
        except UserError:  # a full disk, a permission: leave no half-written run directory behind
            if created:
                shutil.rmtree(run.root, ignore_errors=True)
            raise
        use_run_log(run.root)  # from here on, a traceback of ours goes to RUN/error.log
    accelerator.wait_for_everyone()
    if trackers:  # TensorBoard writes under RUN/tensorboard/; MLflow and W&B open (or, on --resume, reopen) a run
        with stage("starting the trackers", blame="tracking"):
            accelerator.init_trackers("tensorboard", config=_flat_config(recipe.resolved()))

    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]  # before any wrapping
    try:
        with stage("training"):
            result = fit(
                model=model,
                adapter=adapter,
                train_pairs=data.train,
                eval_pairs=data.eval,
                train=recipe.train,
                orpo=recipe.orpo,
                run=run,
                accelerator=accelerator,
                strategy=strategy,
                pad_token_id=tokenizer.pad_token_id,
                layout=layout,
                seed=recipe.seed,
                resume=resume,
                reporter=reporter,
            )
    except (Interrupted, RunFailed) as err:
        end_tracking(accelerator.trackers, err)
        if not accelerator.is_main_process:  # every rank stops alike; rank 0 says why
            raise QuietExit(130 if isinstance(err, Interrupted) else 1) from None
        raise
    with stage("saving the adapter"):
        _save_adapter(recipe, adapter, result.model or model, trainable_names, strategy, run)
    if result.first_eval or result.last_eval:
        rows = [
            [
                k,
                result.first_eval.get(f"eval_{k}", float("nan")),
                result.last_eval.get(f"eval_{k}", float("nan")),
            ]
            for k in EVAL_TABLE
        ]
        reporter.table(
            f"eval: step 0 vs step {result.steps}", ["metric", "step 0", f"step {result.steps}"], rows
        )
    if accelerator.is_main_process:
        _plot_if_possible(run, reporter)
    with stage("finishing the tracked runs", blame="tracking"):
        accelerator.end_training()  # the trackers upload the adapter, the curves and the eval table, then close
    reporter.note(f"run directory: {run.root}  (adapter in {run.adapter})")
    return run


def apply_exact_savings(model: Any, *, gradient_checkpointing: bool) -> None:
    """The savings that change no number beyond rounding (the in-place LoRA sum, the siblings' stacked lora_A
    product and the norm's backward round differently: the last bits), for a model whose weights are whole in this
    process (not FSDP/ZeRO-3):
    LoRA's update added in place (adapters/lora_inplace.py; a no-op for other adapters), RoPE and RMSNorm as one
    function each (training/rotary.py, training/rms_norm.py), and, without
    whole-layer checkpointing (which recomputes everything anyway), norm and MLP activations recomputed in the
    backward (training/recompute.py) and the SiLU-gated product in cache-sized blocks (training/gated_mlp.py).
    One function for training, the planner's tests and bench/step_profile.py."""
    from orpo_cli.adapters.lora_inplace import add_updates_in_place
    from orpo_cli.training.gated_mlp import fuse_gated_mlps
    from orpo_cli.training.recompute import enable_recompute
    from orpo_cli.training.rms_norm import fuse_rms_norms
    from orpo_cli.training.rotary import fuse_rotary

    add_updates_in_place(model)
    fuse_rotary(model)
    fuse_rms_norms(model)
    if not gradient_checkpointing:
        enable_recompute(model)
        fuse_gated_mlps(model)


def _save_adapter(
    recipe: Recipe, adapter: Any, model: Any, trainable: list[str], strategy: Any, run: RunDir
) -> None:
    """Rank 0 writes the adapter; where the weights are sharded (FSDP, ZeRO-3) they are gathered first and
    put into a weightless copy of the model (meta tensors but for the trainable weights) to save from."""
    from orpo_cli.atomic import atomic_dir

    accelerator = strategy.accelerator
    source = accelerator.unwrap_model(model)
    weights = strategy.trainable_weights(model, trainable)  # None: the unwrapped model holds them whole
    if weights is not None:
        source = weightless_replica(recipe, adapter, weights) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        with atomic_dir(run.adapter, replace=True) as tmp:
            adapter.save(source, tmp)
    accelerator.wait_for_everyone()


def weightless_replica(recipe: Recipe, adapter: Any, weights: dict[str, Any]) -> Any:
    """The recipe's model with its adapter attached, all on the meta device but for `weights` (by name).

    Enough to save an adapter from trainable weights gathered off a sharded model, without the memory
    or the time of a second real copy of the base.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from orpo_cli.models.builtin import resolve_model_path

    settings = recipe.model
    path = resolve_model_path(settings.name_or_path)
    config = AutoConfig.from_pretrained(
        path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    )
    with init_empty_weights():
        base = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
    replica = adapter.attach(base, quantized=False, gradient_checkpointing=False)
    missing = sorted(set(weights) - set(replica.state_dict()))
    if missing:
        raise RunFailed(f"cannot save the adapter: gathered weights {missing[:3]} are not in the model")
    replica.load_state_dict(weights, strict=False, assign=True)
    return replica


def _check_same_recipe(run: RunDir, recipe: Recipe) -> dict[str, tuple[Any, Any]]:
    """Refuse a --resume whose recipe differs from the run's beyond `_RESUMABLE_CHANGES`; return the
    resumable settings that do change, as {key: (was, now)}."""
    from orpo_cli.recipe_loading import parse_yaml

    saved = parse_yaml(run.recipe.read_text(encoding="utf-8"), str(run.recipe))  # bounded, as any recipe
    now = recipe.resolved()
    differ = _diff(saved, now)
    changed = sorted(k for k in differ if k not in _RESUMABLE_CHANGES)
    if changed:
        raise UserError(
            f"--resume: the recipe differs from the run's {run.recipe} at {', '.join(changed)}; "
            "resume with the same settings, or start a new run"
        )
    return {k: (_lookup(saved, k), _lookup(now, k)) for k in sorted(differ)}


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


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


def _plot_if_possible(run: RunDir, reporter: Any) -> None:
    """Training curves into the run directory when matplotlib is installed (it is an optional extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        reporter.note("no training-curves.png: pip install 'orpo-tune[plot]' for it, then `orpo-tune plot RUN_DIR`")
        return
    from orpo_cli.plots import plot_run

    reporter.note(f"training curves: {plot_run(run)}")
