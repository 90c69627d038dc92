"""`orpo-tune train`: check everything cheap, set up data/model/adapter from the recipe, then fit."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from orpo_cli.errors import Interrupted, QuietExit, RunFailed, UserError, stage, use_run_log
from orpo_cli.progress import Reporter
from orpo_cli.recipe import OLD_ADAPTER_KINDS, Recipe
from orpo_cli.rundir import RunDir
from orpo_cli.tracking import check_tracking, end_tracking, system_facts, trackers_for
from orpo_cli.training.batching import Layout, longest_sequence
from orpo_cli.training.distributed import Machines, check_processes, launch, plan_processes
from orpo_cli.training.forward import batch_layout
from orpo_cli.training.strategy import Strategy, accelerate_plugins, shape_fsdp_units

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
    after_fit: Callable[[RunDir], None] | None = None,
) -> RunDir:
    """Train the recipe into its run directory; returns the run directory. `plan_check`: refuse, before anything
    loads, a recipe `orpo-tune plan` predicts to need clearly more than the GPU's free memory (one line on a CPU).
    `layout`: the batch layout; None (what train does) takes forward.batch_layout's choice for the adapter, the
    model and the data. A benchmark's ablation may force another in one process (it is not passed to workers).
    `after_fit`: what the command does with the run once the adapter is saved, on the main process, before the
    trackers close (cli.train draws the training curves: training imports no verb).

    When the recipe (or --nproc) asks for several processes and this is not already one of them, this
    process launches them (torchrun's launcher) and waits; each of them comes back here as a worker.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from orpo_cli.kernels import apply_speed_paths

    run = run_dir_for(recipe)
    machines = machines or Machines()
    procs, device, resumed_changes = _check_before_loading(recipe, run, machines, resume, force, plan_check)
    if procs.needs_launch:  # every check passed here once: now the workers, each back in this function
        launch(recipe, procs, machines, resume=resume, force=force)
        return run

    session = _accelerate(recipe, run, device, procs.world_size, resume)
    tokenizer, data, model, adapter = _load(recipe, session, device, resumed_changes)
    # The speed paths verified for this device, dtype and model (orpo_cli/kernels; train.speed_paths: off for none),
    # none where the weights are sharded (under FSDP or ZeRO-3 a layer's weights exist only inside the gathers).
    paths = apply_speed_paths(
        model,
        device=device,
        dtype=session.dtype,
        adapter=adapter,
        setting=recipe.train.speed_paths,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
        shards_weights=session.strategy.shards_weights,
    )
    try:  # no patch outlives the run: transformers' and PEFT's functions are their own again after it
        session.reporter.note(paths.line())
        if session.strategy.fsdp:
            by_layer = recipe.distributed.fsdp.auto_wrap == "decoder_layers"
            shape_fsdp_units(session.accelerator, model, by_layer=by_layer)
        # Once for the run: how every batch is laid out, from the adapter, the attention and the longest pair.
        layout = layout or batch_layout(adapter, model, longest_sequence([*data.train, *data.eval]))
        _describe(recipe, session, device, model)
        _write_run_directory(recipe, run, session, tokenizer, paths.record(), resume=resume, force=force)
        _train(recipe, run, session, data, model, adapter, tokenizer, layout, resume=resume, after_fit=after_fit)
    finally:
        paths.undo()
    session.reporter.note(f"run directory: {run.root}  (adapter in {run.adapter})")
    return run


class _Session(NamedTuple):
    """What the run's processes share, set up once: accelerate, the strategy, the reporter, the model dtype, the
    trackers."""

    accelerator: Any
    strategy: Strategy
    reporter: Reporter
    dtype: Any
    trackers: list[Any]


def _check_before_loading(
    recipe: Recipe, run: RunDir, machines: Machines, resume: bool, force: bool, plan_check: bool
) -> tuple[Any, Any, dict[str, tuple[Any, Any]]]:
    """The cheap checks, errors in seconds before anything is loaded or written: (processes, device, the resumable
    settings that change)."""
    from orpo_cli.data.prepare import check_source
    from orpo_cli.models.loading import check_model_source, check_quantization, pick_device
    from orpo_cli.plan.report import check_context_length

    with stage("checking the run directory", blame="output_dir"):
        run.check(resume=resume, force=force)
        resumed_changes = _check_same_recipe(run, recipe) if resume else {}
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
    return procs, device, resumed_changes


def _accelerate(recipe: Recipe, run: RunDir, device: Any, world_size: int, resume: bool) -> _Session:
    """The trackers; accelerate with the strategy's plugins and the recipe's mixed precision; the run's Strategy;
    the seed."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from orpo_cli.models.loading import resolve_dtype

    dtype = resolve_dtype(recipe.model.dtype, device)
    mixed = recipe.train.mixed_precision
    if mixed == "auto":
        mixed = (
            {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
            if device.type == "cuda"
            else "no"
        )
    facts = system_facts(device=str(device), dtype=str(dtype).removeprefix("torch."), processes=world_size,
                         extra=tuple(b for b in recipe.tracking.backends if b != "tensorboard"))  # trackers' versions
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
    set_seed(recipe.seed)
    # What the loop does differently under the strategy, decided here once.
    reporter = Reporter(enabled=accelerator.is_main_process)
    return _Session(accelerator, Strategy(accelerator), reporter, dtype, trackers)


def _load(
    recipe: Recipe, session: _Session, device: Any, resumed_changes: dict[str, tuple[Any, Any]]
) -> tuple[Any, ...]:
    """The tokenizer, the data, the model and its adapter, attached: (tokenizer, data, model, adapter)."""
    from orpo_cli.adapters import build_adapter
    from orpo_cli.data.prepare import prepare_data
    from orpo_cli.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(recipe.model.name_or_path, recipe.model.revision, recipe.model.trust_remote_code)
    with stage("preparing the data"):
        data = prepare_data(recipe.data, recipe.orpo, tokenizer)
    for key, (was, now) in resumed_changes.items():
        session.reporter.note(f"--resume: {key} changes from {was} to {now}")
    session.reporter.note(data.stats.summary())

    # FSDP flattens each unit's weights into one tensor of one dtype: 4-bit weights are stored in the model's
    # dtype, and the base is not prepared for k-bit training (that would upcast its norms to fp32).
    fsdp = session.strategy.fsdp
    model = load_model(
        recipe.model, recipe.quantization, device, session.dtype, quant_storage=session.dtype if fsdp else None
    )
    adapter = build_adapter(recipe.adapter)
    model = adapter.attach(
        model,
        quantized=recipe.quantization.mode != "none" and not fsdp,
        gradient_checkpointing=recipe.train.gradient_checkpointing,
    )
    return tokenizer, data, model, adapter


def _describe(recipe: Recipe, session: _Session, device: Any, model: Any) -> None:
    from orpo_cli.adapters import count_parameters

    trainable, total = count_parameters(model)
    session.reporter.note(
        f"model: {recipe.model.name_or_path} on {device} "
        f"({str(session.dtype).removeprefix('torch.')}, quantization {recipe.quantization.mode}); "
        f"adapter {recipe.adapter.kind}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / max(total, 1):.4f}%)"
    )
    if not session.strategy.resumable:
        session.reporter.note(f"{session.strategy.name}: no resumable checkpoints are written (see docs/distributed.md)")


def _write_run_directory(
    recipe: Recipe, run: RunDir, session: _Session, tokenizer: Any, speed_paths: dict[str, Any], *, resume: bool,
    force: bool,
) -> None:
    """RUN/recipe.yaml, RUN/speed_paths.json and RUN/tokenizer/: only now that everything checked out; then the
    trackers the recipe asks for."""
    from orpo_cli.atomic import atomic_dir, atomic_write_text

    accelerator = session.accelerator
    if accelerator.is_main_process:
        created = not run.holds_anything()  # (its lock aside: cli.train holds it)
        try:
            with stage("writing the run directory", blame="output_dir"):
                run.prepare(resume=resume, force=force)
                atomic_write_text(run.recipe, recipe.to_yaml())
                atomic_write_text(run.speed_paths, json.dumps(speed_paths, indent=2) + "\n")
                if not run.tokenizer.is_dir():
                    with atomic_dir(run.tokenizer, replace=True) as tmp:
                        tokenizer.save_pretrained(str(tmp))
        except UserError:  # a full disk, a permission: leave no half-written run directory behind
            if created:
                shutil.rmtree(run.root, ignore_errors=True)
            raise
        use_run_log(run.root)  # from here on, a traceback of ours goes to RUN/error.log
    accelerator.wait_for_everyone()
    if session.trackers:  # TensorBoard writes under RUN/tensorboard/; MLflow and W&B open (or, on --resume, reopen) a run
        with stage("starting the trackers", blame="tracking"):
            accelerator.init_trackers("tensorboard", config=_flat_config(recipe.resolved()))


def _train(
    recipe: Recipe, run: RunDir, session: _Session, data: Any, model: Any, adapter: Any, tokenizer: Any,
    layout: Layout, *, resume: bool, after_fit: Callable[[RunDir], None] | None,
) -> None:
    """`fit`, then the adapter saved, the step-0 vs last eval table, `after_fit`, the trackers closed."""
    from orpo_cli.training.loop import fit

    accelerator, strategy, reporter = session.accelerator, session.strategy, session.reporter
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
    if after_fit is not None and accelerator.is_main_process:
        after_fit(run)  # the command's (cli.train draws the curves), before the trackers upload them
    with stage("finishing the tracked runs", blame="tracking"):
        accelerator.end_training()  # the trackers upload the adapter, the curves and the eval table, then close


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
    adapter = saved.get("adapter") if isinstance(saved, dict) else None
    if isinstance(adapter, dict) and adapter.get("kind") in OLD_ADAPTER_KINDS:  # a run written under an old name
        adapter["kind"] = OLD_ADAPTER_KINDS[adapter["kind"]]
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
