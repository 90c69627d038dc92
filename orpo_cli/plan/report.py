"""`orpo-tune plan`: a recipe's settings turned into the planner's inputs, the model's config found, the report.

The planner (plan.py) takes plain values; this module is where a :class:`Recipe`'s sections become them, where
the model's `config.json` comes from (a local directory, a built-in, a shipped public config, or the hub), and
where the result becomes a table for people or one JSON object. `train` calls :func:`check_before_training`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from orpo_cli.errors import UserError
from orpo_cli.layouts import choose_layout
from orpo_cli.plan.adapter_terms import json_fields, terms_for
from orpo_cli.plan.gpus import DEFAULT_MFU, Gpu, step_seconds
from orpo_cli.plan.shapes import ModelShape, StepSetup, context_limit, pairs_of, worst_case_pairs
from orpo_cli.plan.step import REFUSE_MARGIN, Lever, StepPlan, levers, plan_step, verdict
from orpo_cli.plan.units import GIB, gib, human_flops, human_seconds
from orpo_cli.recipe import Recipe

# hub ids (lower case) -> shipped config file (orpo_cli/assets/model_configs, README.md there gives the sources)
SHIPPED_CONFIGS: dict[str, str] = {
    "mistralai/mistral-7b-v0.1": "Mistral-7B-v0.1.json",
    "qwen/qwen2-0.5b": "Qwen2-0.5B.json",
    "qwen/qwen2-0.5b-instruct": "Qwen2-0.5B.json",
    "qwen/qwen2-1.5b": "Qwen2-1.5B.json",
    "qwen/qwen2-1.5b-instruct": "Qwen2-1.5B.json",
    "microsoft/phi-3-mini-4k-instruct": "Phi-3-mini-4k-instruct.json",
    "meta-llama/meta-llama-3-8b": "Meta-Llama-3-8B.json",
    "meta-llama/meta-llama-3-8b-instruct": "Meta-Llama-3-8B.json",
    "meta-llama/llama-2-13b-hf": "Llama-2-13b-hf.json",
    "meta-llama/llama-2-13b-chat-hf": "Llama-2-13b-hf.json",
    "meta-llama/meta-llama-3-70b": "Meta-Llama-3-70B.json",
    "meta-llama/meta-llama-3-70b-instruct": "Meta-Llama-3-70B.json",
    "huggingfacetb/smollm2-135m-instruct": "SmolLM2-135M-Instruct.json",
    "builtin:smollm2-135m-instruct": "SmolLM2-135M-Instruct.json",
}


def shipped_config(file: str) -> dict[str, Any]:
    text = resources.files("orpo_cli").joinpath("assets", "model_configs", file).read_text(encoding="utf-8")
    return json.loads(text)


def model_config(name_or_path: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, where it came from) for a recipe's model.name_or_path, without any weights."""
    shipped = SHIPPED_CONFIGS.get(name_or_path.strip().lower())
    if shipped is not None:
        return shipped_config(shipped), f"shipped config ({shipped})"
    from orpo_cli.models.builtin import is_builtin, materialize_builtin

    if is_builtin(name_or_path):
        directory = materialize_builtin(name_or_path.removeprefix("builtin:"))  # tiny and local: a few seconds once
        return _read_config(directory / "config.json", name_or_path), f"built-in ({name_or_path})"
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return _read_config(local / "config.json", name_or_path), f"local ({local / 'config.json'})"
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"model.name_or_path: no such model directory: {name_or_path}")
    return _hub_config(name_or_path, revision), f"hub ({name_or_path}/config.json)"


def _read_config(path: Path, name: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"model.name_or_path: {name} has no config.json; is it a Hugging Face model directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"model.name_or_path: cannot read {path}: {err}") from None


def _hub_config(name: str, revision: str | None) -> dict[str, Any]:
    """config.json alone from the hub: the local cache first, then the hub if its name resolves (without that
    check an offline machine spends ~25 s in huggingface_hub's retries before the same answer)."""
    import logging
    import socket

    from huggingface_hub import constants, hf_hub_download

    failed = UserError(
        f"model.name_or_path: could not load '{name}' from the Hugging Face hub (offline, or no such model); "
        "download it (e.g. `hf download NAME --local-dir DIR`) and set model.name_or_path: DIR"
    )
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry notices are not for our users
    try:
        try:
            return _read_config(Path(hf_hub_download(name, "config.json", revision=revision, local_files_only=True)), name)
        except UserError:
            raise
        except Exception:
            pass  # not in the cache
        host = constants.ENDPOINT.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
        try:
            socket.getaddrinfo(host, 443)
        except OSError:
            raise failed from None
        try:
            return _read_config(Path(hf_hub_download(name, "config.json", revision=revision)), name)
        except UserError:
            raise
        except Exception:  # no such repository, gated, or the connection dropped: as loading the model would say
            raise failed from None
    finally:
        hub_logger.setLevel(level)


# --------------------------------------------------------------------------------------- recipe -> setup
_ELT = {"bf16": 2, "fp16": 2, "fp32": 4}


def step_setup(
    recipe: Recipe,
    shape: ModelShape,
    *,
    cuda: bool,
    world_size: int,
    prompt_tokens: int | None = None,
    response_tokens: int | None = None,
) -> StepSetup:
    """The planner's inputs for `recipe` on `world_size` ranks (CUDA rules, or a CPU's: fp32, no autocast)."""
    model, quant, train, orpo = recipe.model, recipe.quantization, recipe.train, recipe.orpo
    dtype = model.dtype if model.dtype != "auto" else ("bf16" if cuda else "fp32")
    weight = _ELT[dtype]
    mixed = train.mixed_precision
    if mixed == "auto":
        mixed = dtype if cuda and dtype != "fp32" else "no"
    autocast = None if mixed == "no" else _ELT[mixed]
    adapter = recipe.adapter
    layout = choose_layout(  # training's rule (forward.batch_layout), on the longest sequence the recipe allows
        packs_pairs=adapter.packs_pairs,
        attention=model.attn_implementation,
        sliding_window=shape.sliding_window,
        longest=orpo.max_length,
    )
    if prompt_tokens is None and response_tokens is None:
        pairs = worst_case_pairs(train.micro_batch_size, orpo.max_length, orpo.max_prompt_length)
    else:
        prompt = min(prompt_tokens or 1, orpo.max_prompt_length)
        response = min(response_tokens or orpo.max_length - prompt, orpo.max_length - prompt)
        pairs = pairs_of(train.micro_batch_size, prompt, response)
    dist = recipe.distributed
    strategy = dist.strategy if dist.strategy != "auto" else ("ddp" if world_size > 1 else "none")
    # as kernels.apply_speed_paths decides: the CPU paths on a CPU with train.speed_paths auto; of them the
    # recomputation where every rank holds the whole model (not FSDP, not ZeRO-3) and whole layers are not checkpointed
    shards = strategy == "fsdp" or (strategy == "deepspeed" and dist.deepspeed.zero_stage == 3)
    cpu_paths = not cuda and train.speed_paths == "auto"
    return StepSetup(
        pairs=pairs,
        quantization=quant.mode,
        double_quant=quant.double_quant,
        quant_compute_bytes=weight if quant.compute_dtype == "auto" else _ELT[quant.compute_dtype],
        weight_bytes=weight,
        autocast_bytes=autocast,
        adapter=terms_for(adapter, shape),
        optimizer=train.optimizer,
        gradient_checkpointing=train.gradient_checkpointing,
        cpu_paths=cpu_paths,
        recompute=cpu_paths and not train.gradient_checkpointing and not shards,
        layout=layout,
        gradient_accumulation=train.gradient_accumulation,
        eval_pairs=train.eval_batch_size or train.micro_batch_size,
        world_size=world_size,
        strategy=strategy,
        fsdp_sharding=dist.fsdp.sharding_strategy,
        zero_stage=dist.deepspeed.zero_stage,
        offload_optimizer=dist.deepspeed.offload_optimizer,
        cuda=cuda,
    )


def world_size_of(recipe: Recipe, nproc: int | None) -> int:
    if nproc is not None:
        return nproc
    n = recipe.distributed.num_processes
    return n if isinstance(n, int) else 1


# ---------------------------------------------------------------------------------------------- report
@dataclass
class Report:
    model: str
    config_source: str
    shape: ModelShape
    setup: StepSetup
    plan: StepPlan
    memory: int | None
    memory_source: str
    gpu: Gpu | None
    mfu: float
    steps: int | None
    steps_note: str
    levers: list[Lever]

    @property
    def verdict(self) -> str | None:
        return None if self.memory is None else verdict(self.plan.peak, self.memory)

    @property
    def seconds_per_step(self) -> float | None:
        if self.gpu is None:
            return None
        return step_seconds(self.plan.flops_per_optimizer_step, self.gpu, self.mfu, self.setup.world_size)

    def as_dict(self) -> dict[str, Any]:
        per_step = self.seconds_per_step
        setup: dict[str, Any] = {}
        for k, v in self.setup.__dict__.items():
            if k != "pairs":
                setup.update(json_fields(v) if k == "adapter" else {k: v})
        setup["pairs"] = [p.__dict__ for p in self.setup.pairs]
        return {
            "model": self.model,
            "config_source": self.config_source,
            "model_shape": self.shape.__dict__,
            "parameters": self.shape.num_parameters,
            "setup": setup,
            "per_rank": self.plan.as_dict(),
            "memory_bytes": self.memory,
            "memory_source": self.memory_source,
            "gpu": None if self.gpu is None else self.gpu.__dict__,
            "verdict": self.verdict,
            "levers": [lever.__dict__ for lever in self.levers],
            "tokens_per_optimizer_step": self.plan.tokens_per_micro_batch
            * self.setup.gradient_accumulation * self.setup.world_size,
            "flops_per_optimizer_step": self.plan.flops_per_optimizer_step,
            "mfu": self.mfu,
            "seconds_per_step": per_step,
            "steps": self.steps,
            "steps_note": self.steps_note,
            "run_seconds": None if per_step is None or self.steps is None else per_step * self.steps,
            "unverified": "CUDA terms (context, cuBLAS workspace, allocator overhead) are documented constants, "
            "not measured; CPU-checked: weights, adapter, gradients, optimizer state exactly, saved activations "
            "and the head transient within 10% (tests/test_plan.py)",
        }


def build_report(
    recipe: Recipe,
    *,
    memory: int | None,
    memory_source: str,
    gpu: Gpu | None,
    mfu: float = DEFAULT_MFU,
    nproc: int | None = None,
    num_pairs: int | None = None,
    prompt_tokens: int | None = None,
    response_tokens: int | None = None,
    cuda: bool = True,
) -> Report:
    config, source = model_config(recipe.model.name_or_path, recipe.model.revision)
    shape = ModelShape.from_config(config)
    world = world_size_of(recipe, nproc)
    setup = step_setup(recipe, shape, cuda=cuda, world_size=world, prompt_tokens=prompt_tokens,
                       response_tokens=response_tokens)
    plan = plan_step(shape, setup)
    steps, note = _steps(recipe, world, num_pairs)
    found = [] if memory is None else levers(shape, setup, memory, recipe.orpo.max_length, recipe.orpo.max_prompt_length)
    return Report(recipe.model.name_or_path, source, shape, setup, plan, memory, memory_source, gpu, mfu, steps,
                  note, found)


def _steps(recipe: Recipe, world: int, num_pairs: int | None) -> tuple[int | None, str]:
    train = recipe.train
    if train.max_steps is not None:
        return train.max_steps, "train.max_steps"
    if num_pairs is None:
        return None, "train.epochs: give --pairs N (the training pairs) for the run's length"
    per_epoch = math.ceil(num_pairs / (train.micro_batch_size * world))
    return max(1, math.ceil(train.epochs * per_epoch / train.gradient_accumulation)), f"{num_pairs:,} pairs x {train.epochs:g} epochs"


def render(report: Report, console: Any) -> None:
    """The breakdown as a rich table, then tokens, FLOPs, time, the verdict and the levers."""
    from rich.table import Table

    plan, setup = report.plan, report.setup
    p = setup.pairs[0]
    console.print(
        f"[bold]{report.model}[/bold] ({report.config_source}): {report.shape.num_parameters / 1e9:.2f}B parameters, "
        f"{report.shape.layers} layers, hidden {report.shape.hidden}, vocabulary {report.shape.vocab:,}"
    )
    console.print(
        f"micro batch {len(setup.pairs)} x accumulation {setup.gradient_accumulation} x {setup.world_size} "
        f"rank{'s' if setup.world_size > 1 else ''} ({setup.strategy}); layout {setup.layout}; pairs of "
        f"{p.prompt} + {p.chosen} + {p.rejected} tokens; gradient checkpointing "
        f"{'on' if setup.gradient_checkpointing else 'off'}; norms and MLP activations recomputed "
        f"{'on' if setup.recompute else 'off'}; optimizer {setup.optimizer}"
    )
    table = Table(title="peak memory of one training step, per rank", show_lines=False)
    table.add_column("term")
    table.add_column("GiB", justify="right")
    table.add_column("MiB", justify="right")

    def row(name: str, n: int, style: str | None = None) -> None:
        table.add_row(name, f"{n / GIB:.3f}", f"{n / 2**20:,.1f}", style=style)

    for name, n in plan.weights.items():
        row(f"weights: {name}", n)
    if not setup.trains_base:
        row(f"trainable weights ({plan.trainable_params:,} params)", plan.trainable)
    row("gradients", plan.gradients)
    row(f"optimizer state ({setup.optimizer})", plan.optimizer)
    for name, n in plan.activations.items():
        row(f"activations: {name}", n)
    later = f"recomputed layer {plan.recompute / GIB:.2f} + " if plan.recompute else ""
    row(f"the larger of: head transient {plan.head_transient / GIB:.2f}, {later}backward allowance "
        f"{plan.backward / GIB:.2f}", plan.transient_peak)
    if plan.mask:
        row("4-D attention mask (bool) and its temporaries", plan.mask)
    for name, n in plan.cuda.items():
        row(name, n)
    row("training step peak", plan.train_peak, "bold")
    if plan.eval_peak:
        row(f"eval pass peak ({setup.eval_pairs} pairs, no gradients)", plan.eval_peak)
    console.print(table)

    tokens = plan.tokens_per_micro_batch * setup.gradient_accumulation * setup.world_size
    console.print(
        f"per optimizer step: {tokens:,} tokens (prompts counted twice, as batching.count_tokens does), "
        f"{human_flops(plan.flops_per_optimizer_step)}"
    )
    per_step = report.seconds_per_step
    if per_step is not None and report.gpu is not None:
        run = f"; the run: {human_seconds(per_step * report.steps)} for {report.steps:,} steps ({report.steps_note})" \
            if report.steps is not None else f"; {report.steps_note}"
        console.print(
            f"time at {report.mfu:.0%} MFU of the {report.gpu.name}'s {report.gpu.bf16_flops / 1e12:,.0f} TFLOPS "
            f"bf16 peak: {human_seconds(per_step)} per step{run}"
        )
    else:
        console.print("time: give --gpu NAME for the time per step and for the run")
    for note in plan.notes:
        console.print(f"note: {note}")
    if report.memory is None:
        console.print("verdict: give --gpu-memory (e.g. 24GiB) or --gpu NAME to compare with a card")
        return
    console.print(
        f"verdict: [bold]{report.verdict}[/bold]: peak {gib(plan.peak)} against {gib(report.memory)} "
        f"({report.memory_source}); fits means at most 90%, tight up to 100%"
    )
    if report.levers:
        console.print("cheapest levers, in order, each on top of the ones before:")
        for i, lever in enumerate(report.levers, 1):
            console.print(f"  {i}. {lever.change}: peak {gib(lever.peak)}")
        if report.levers[-1].peak > 0.9 * report.memory:
            console.print("  (still over: no lever the planner knows brings it under)")
    console.print(
        "[dim]CUDA terms are documented constants, unverified on a GPU; weights, adapter, gradients, optimizer "
        "state, saved activations and the head's transient are checked against a real step on the CPU.[/dim]"
    )


# ------------------------------------------------------------------------------------------ train's check
def check_context_length(recipe: Recipe) -> None:
    """Before `train` loads or writes anything: refuse an orpo.max_length beyond the model's context (its config's
    max_position_embeddings, shapes.context_limit). Past it, a model with learned positions fails inside its
    forward (IndexError) and one with rotary positions trains on positions it never saw. A model whose config
    cannot be found here is left to the loader, which says why."""
    try:
        config, _ = model_config(recipe.model.name_or_path, recipe.model.revision)
    except UserError:
        return
    limit = context_limit(config)
    if limit is not None and recipe.orpo.max_length > limit:
        raise UserError(
            f"orpo.max_length: {recipe.orpo.max_length} tokens is longer than the context of "
            f"{recipe.model.name_or_path}, {limit} positions (from its config.json); set "
            f"orpo.max_length: {limit} or less (and orpo.max_prompt_length below it)"
        )


def check_before_training(recipe: Recipe, *, world_size: int, device: Any, echo: Any) -> None:
    """Before `train` loads anything: on CUDA, refuse (UserError, exit 2) a recipe predicted to need more than
    REFUSE_MARGIN x the device's free memory, naming the levers; on a CPU, one line with the predicted peak.
    A model whose config cannot be found here is left to the loader, which says why."""
    cuda = getattr(device, "type", "cpu") == "cuda"
    try:
        config, _ = model_config(recipe.model.name_or_path, recipe.model.revision)
        shape = ModelShape.from_config(config)
    except UserError:
        return
    setup = step_setup(recipe, shape, cuda=cuda, world_size=world_size)
    plan = plan_step(shape, setup)
    if not cuda:
        echo(f"plan: predicted peak {gib(plan.peak)} per process on the CPU (not checked there; "
             "`orpo-tune plan RECIPE --gpu NAME` for a GPU)")
        return
    import torch

    try:
        free, _total = torch.cuda.mem_get_info(device)
    except RuntimeError:  # no usable driver after all: the loader will say so
        return
    if plan.peak <= REFUSE_MARGIN * free:
        echo(f"plan: predicted peak {gib(plan.peak)} per GPU, {gib(free)} free")
        return
    found = levers(shape, setup, free, recipe.orpo.max_length, recipe.orpo.max_prompt_length)
    advice = "; ".join(f"{lever.change} ({gib(lever.peak)})" for lever in found) or "none known"
    raise UserError(
        f"plan: this recipe is predicted to need {gib(plan.peak)} per GPU and {gib(free)} is free; levers, in order: "
        f"{advice}. `orpo-tune plan RECIPE` shows the breakdown; --no-plan-check trains anyway"
    )
