"""The command layer: the only place that reads a recipe file. Each verb is recipe/run dir -> setup -> work."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from orpo_cli import __version__
from orpo_cli.errors import DEBUG_ENV, UserError, framework_exit, report, use_run_log
from orpo_cli.rundir import RunDir

app = typer.Typer(
    name="orpo-tune",
    help="Align causal language models with ORPO from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set train.lr=1e-5 (repeatable).", show_default=False),
]


def _user_errors(fn: F) -> F:
    """One line on stderr, never a traceback: a user's mistake exits 2, a failed run or a bug of ours 1 (the
    line says where its traceback was written), an interrupted run 130. errors.report sorts them."""
    command = fn.__name__.rstrip("_")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        use_run_log(None)  # until this command has a run directory of its own
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as err:
            if framework_exit(err):
                raise  # typer.Exit and the like: the command's own way out
            code, lines = report(err, command)
            for line in lines:
                typer.echo(line, err=True)
            raise typer.Exit(code) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"orpo-tune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Print the full traceback of an error (or set {DEBUG_ENV}=1).")
    ] = False,
) -> None:
    """Align causal language models with ORPO from one YAML recipe."""
    if debug:
        os.environ[DEBUG_ENV] = "1"  # through the environment, so that --nproc workers print theirs too


@app.command()
@_user_errors
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe and print it fully resolved (every default filled in) as YAML."""
    from orpo_cli.recipe_loading import load_recipe

    typer.echo(load_recipe(recipe, set_ or []).to_yaml(), nl=False)


@app.command()
def schema(
    markdown: Annotated[bool, typer.Option(help="Print the recipe reference (docs/recipe-reference.md) instead.")] = False,
) -> None:
    """Print the recipe's JSON Schema (or, with --markdown, the recipe reference)."""
    if markdown:
        from orpo_cli.reference import recipe_reference

        typer.echo(recipe_reference(), nl=False)
        return
    from orpo_cli.recipe import Recipe

    typer.echo(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))


@app.command()
@_user_errors
def init(
    template: Annotated[str, typer.Option(help="Starter: lora, qlora, reft or full.")] = "lora",
    out: Annotated[Path, typer.Option(help="Where to write the recipe.")] = Path("recipe.yaml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter recipe."""
    from orpo_cli.starter import TEMPLATES, starter_recipe

    if template not in TEMPLATES:
        raise UserError(f"--template: unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the recipe's file name, e.g. {out / 'recipe.yaml'}")
    if out.exists() and not force:
        raise UserError(f"{out} exists; choose another --out or pass --force")
    from orpo_cli.atomic import atomic_write_text

    atomic_write_text(out, starter_recipe(template, out.stem))
    typer.echo(f"wrote {out}; check it with: orpo-tune validate {out}")


@app.command()
@_user_errors
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run directory (overrides output_dir).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest complete checkpoint.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Override train.max_steps.")] = None,
    nproc: Annotated[
        int | None,
        typer.Option(min=1, help="Processes (one per GPU) to launch on this machine; sets distributed.num_processes."),
    ] = None,
    nnodes: Annotated[int, typer.Option(min=1, help="Machines taking part; run the same command on each.")] = 1,
    node_rank: Annotated[int, typer.Option(min=0, help="This machine's index, 0 to nnodes-1 (0 writes the run).")] = 0,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of machine 0, where the processes of several machines meet.", show_default=False),
    ] = None,
    no_plan_check: Annotated[
        bool, typer.Option("--no-plan-check", help="Train even where `orpo-tune plan` predicts the GPU is too small.")
    ] = False,
) -> None:
    """Train with ORPO: checkpoints, metrics and the adapter land in the run directory (docs/distributed.md
    for several GPUs or machines)."""
    from orpo_cli.recipe_loading import load_recipe
    from orpo_cli.run_lock import writes_the_run, writing_run

    overrides = list(set_ or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    if nproc is not None:
        overrides.append(f"distributed.num_processes={nproc}")
    loaded = load_recipe(recipe, overrides)  # before torch is imported: a bad recipe is refused in a second
    from orpo_cli.errors import QuietExit
    from orpo_cli.training.distributed import Machines
    from orpo_cli.training.setup import run_dir_for, start_run

    try:
        with writing_run(run_dir_for(loaded).root, "train", take=writes_the_run(node_rank), blame="output_dir"):
            start_run(loaded, resume=resume, force=force, machines=Machines(nnodes, node_rank, rdzv_endpoint),
                      plan_check=not no_plan_check, after_fit=_draw_curves)
    except QuietExit as err:  # the workers (or rank 0) already said why
        raise typer.Exit(err.code) from None


def _draw_curves(run: RunDir) -> None:
    """Training curves into the run directory when matplotlib is installed (it is an optional extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        typer.echo("no training-curves.png: pip install 'orpo-tune[plot]' for it, then `orpo-tune plot RUN_DIR`",
                   err=True)
        return
    from orpo_cli.plots import plot_run

    typer.echo(f"training curves: {plot_run(run)}", err=True)


@app.command()
@_user_errors
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    gpu_memory: Annotated[str | None, typer.Option(help="Memory per GPU to plan against, e.g. 24GiB or 80GB.",
                                                   show_default=False)] = None,
    gpu: Annotated[str | None, typer.Option(help="A GPU by name (its memory and bf16 peak), e.g. A100-80GB, "
                                            "RTX-4090, H100-SXM.", show_default=False)] = None,
    nproc: Annotated[int | None, typer.Option(min=1, help="Processes (GPUs); default: the recipe's.",
                                              show_default=False)] = None,
    mfu: Annotated[float, typer.Option(help="Model FLOPs utilisation assumed for the time estimate.")] = 0.35,
    pairs: Annotated[int | None, typer.Option(help="Training pairs in the data, for the length of an epochs-based "
                                              "run.", show_default=False)] = None,
    prompt_tokens: Annotated[int | None, typer.Option(help="Prompt length to plan for (default: the worst case, "
                                                      "1 token and responses of max_length - 1).",
                                                      show_default=False)] = None,
    response_tokens: Annotated[int | None, typer.Option(help="Response length to plan for (both sides).",
                                                        show_default=False)] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
) -> None:
    """Will this recipe fit on this GPU, and how long will it take: the peak memory of a training step, broken
    down, and the time at a stated MFU, from the model's config alone (no weights are loaded)."""
    from rich.console import Console

    from orpo_cli.plan.gpus import find_gpu
    from orpo_cli.plan.report import build_report, render
    from orpo_cli.plan.units import parse_memory
    from orpo_cli.recipe_loading import load_recipe

    _at_least("--pairs", pairs, 1)
    _at_least("--prompt-tokens", prompt_tokens, 1)
    _at_least("--response-tokens", response_tokens, 1)
    if not 0 < mfu <= 1:
        raise UserError(f"--mfu: must be in (0, 1], got {mfu}")
    card = find_gpu(gpu) if gpu is not None else None
    memory = parse_memory(gpu_memory) if gpu_memory is not None else (card.memory_bytes if card else None)
    source = f"--gpu-memory {gpu_memory}" if gpu_memory is not None else (f"{card.name}" if card else "")
    loaded = load_recipe(recipe, set_ or [])
    report = build_report(loaded, memory=memory, memory_source=source, gpu=card, mfu=mfu, nproc=nproc,
                          num_pairs=pairs, prompt_tokens=prompt_tokens, response_tokens=response_tokens)
    if json_:
        typer.echo(json.dumps(report.as_dict()))
        return
    render(report, Console(width=max(Console().width, 110)))


def _at_least(option: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise UserError(f"{option}: must be at least {low}, got {value}")


RunDirArg = Annotated[Path, typer.Argument(help="A run directory written by `orpo-tune train`.", show_default=False)]


@app.command(name="eval")
@_user_errors
def eval_(
    run_dir: RunDirArg,
    data: Annotated[
        Path | None,
        typer.Option(help="Evaluate on every pair of this file (mapped with the run's data settings) "
                     "instead of the run's eval split.", show_default=False),
    ] = None,
    base: Annotated[bool, typer.Option("--base", help="Also evaluate the base model (adapter off) on the same "
                                       "pairs and show the difference.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")] = False,
    samples: Annotated[int, typer.Option(help="Answer N distinct eval prompts with the base and the tuned model: "
                                         "shown side by side, and written to RUN_DIR/samples.jsonl.")] = 0,
    answers: Annotated[bool, typer.Option("--answers", help="Answer every eval question that has a known answer "
                                          "(data.columns.answer) greedily, and report how many replies contain it / "
                                          "are exactly it (base and tuned).")] = False,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per forward pass (default: the run's "
                                                   "eval batch size).", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest sample answer, in tokens.")] = 64,
    tasks: Annotated[str | None, typer.Option(help="Run these lm-evaluation-harness tasks instead (comma-separated: "
                                              "lm-eval's names, or the built-in offline short_answers); results "
                                              "under `benchmarks` in RUN_DIR/eval.json.", show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(help="With --tasks: the first N examples of each task only.",
                                              show_default=False)] = None,
) -> None:
    """Held-out preference metrics of a run (accuracy, log odds ratio, margin, NLL), base vs tuned; with --tasks,
    standard benchmarks through lm-evaluation-harness (docs/tracking.md#benchmarks)."""
    from rich.console import Console

    from orpo_cli.evaluate import EVAL_FILE, eval_table, read_samples, run_eval, samples_right, samples_table
    from orpo_cli.progress import Reporter
    from orpo_cli.run_lock import writing_run
    from orpo_cli.rundir import open_run

    _at_least("--samples", samples, 0)
    _at_least("--batch-size", batch_size, 1)
    _at_least("--max-new-tokens", max_new_tokens, 1)
    run = open_run(run_dir)
    if tasks is not None:
        _benchmarks(run, tasks, base=base, limit=limit, batch_size=batch_size, json_=json_,
                    others={"--data": data is not None, "--samples": samples > 0})
        return
    if limit is not None:
        raise UserError("--limit applies to --tasks (lm-eval benchmarks); drop it, or add --tasks")
    with writing_run(run.root, "eval"):  # it writes RUN/eval.json (and samples.jsonl)
        result = run_eval(run, data=data, base=base, samples=samples, answers=answers, batch_size=batch_size,
                          max_new_tokens=max_new_tokens, reporter=Reporter())
    if json_:
        typer.echo(json.dumps(result))
        return
    columns, rows = eval_table(result)
    typer.echo(f"eval of {run.root} on {result['data']}")
    table = Reporter(console=Console())
    table.table("", columns, rows)
    if "samples" in result:  # the change where a person looks: the same prompts, answered before and after
        shown = read_samples(run)
        columns, rows = samples_table(shown)
        table.table(f"greedy answers to {len(rows)} eval prompts", columns, rows, text=True)
        if (right := samples_right(shown)) is not None:
            typer.echo(right)
    typer.echo(f"wrote {run.root / EVAL_FILE}" + (f" and {result['samples']}" if "samples" in result else ""))


def _benchmarks(run: Any, tasks: str, *, base: bool, limit: int | None, batch_size: int | None, json_: bool,
                others: dict[str, bool]) -> None:
    """`eval RUN --tasks ...`: lm-evaluation-harness on the tuned model (and the base), side by side."""
    from rich.console import Console

    from orpo_cli.benchmarks import benchmark_table, check_lm_eval, parse_tasks, run_benchmarks
    from orpo_cli.evaluate import EVAL_FILE
    from orpo_cli.progress import Reporter
    from orpo_cli.run_lock import writing_run

    for option, given in others.items():
        if given:
            raise UserError(f"{option} applies to the preference eval, not to --tasks; run them as two commands")
    _at_least("--limit", limit, 1)
    names = parse_tasks(tasks)
    check_lm_eval()
    with writing_run(run.root, "eval"):  # it writes RUN/eval.json
        result, _ = run_benchmarks(run, names, base=base, limit=limit, batch_size=batch_size or 8,
                                   reporter=Reporter())
    if json_:
        typer.echo(json.dumps(result))
        return
    columns, rows = benchmark_table(result)
    typer.echo(f"lm-evaluation-harness on {run.root}" + (f" (first {limit} per task)" if limit else ""))
    Reporter(console=Console()).table("", columns, rows)
    typer.echo(f"wrote {run.root / EVAL_FILE} (benchmarks)")


@app.command()
@_user_errors
def export(
    run_dir: RunDirArg,
    out: Annotated[Path, typer.Option("--out", help="Directory to write (must not exist unless --force).",
                                      show_default=False)],
    dtype: Annotated[str | None, typer.Option(help="Weights of a merged export: bf16, fp16 or fp32 (default: "
                                              "the base model's own dtype).", show_default=False)] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing --out (only once the new export is "
                                        "complete).")] = False,
    format: Annotated[str, typer.Option("--format", help="hf: a merged transformers model (or a ReFT bundle); gguf: "
                                        "one GGUF file for llama.cpp, Ollama and LM Studio, checked in llama.cpp.")] = "hf",
    quant: Annotated[str | None, typer.Option(help="GGUF tensor type: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 or q4_0 "
                                              "(default f16).", show_default=False)] = None,
    adapter_only: Annotated[bool, typer.Option(help="GGUF: the base model and the LoRA as a GGUF adapter that "
                                               "llama.cpp applies at load (--lora), instead of a merged file.")] = False,
) -> None:
    """Export a merged model (LoRA, full fine-tuning) or, for ReFT, a bundle that `generate` loads; or GGUF."""
    from orpo_cli.export import check_out, export_run, parse_dtype, rounding_line
    from orpo_cli.export_checks import MERGE_TOLERANCE_FACTOR
    from orpo_cli.progress import Reporter
    from orpo_cli.rundir import open_run

    if format not in ("hf", "gguf"):
        raise UserError(f"--format: {format!r} is not one of hf, gguf")
    if format == "hf" and (quant is not None or adapter_only):
        raise UserError(f"{'--quant' if quant is not None else '--adapter-only'} is for --format gguf; add --format gguf")
    if format == "gguf":
        if dtype is not None:
            raise UserError("--dtype is for --format hf; a GGUF's tensor type is --quant")
        _export_gguf(run_dir, out, quant or "f16", adapter_only, force)
        return
    run = open_run(run_dir)
    parse_dtype(dtype)
    check_out(run, out, force)  # before any model loads
    reporter = Reporter()
    result = export_run(run, out, dtype=dtype, force=force, reporter=reporter)
    for note in result.notes:
        reporter.note(f"note: {note}")
    what = f"merged {result.dtype} model" if result.merged else "bundle"
    typer.echo(f"exported a {what} to {result.out}")
    if result.merged:
        typer.echo(
            f"verified: max |Δlogit| = {result.max_abs_diff:.3g} <= tolerance {result.tolerance:.3g} (the merge in "
            f"fp32 vs base + adapter, {result.probe_tokens} tokens; tolerance = {MERGE_TOLERANCE_FACTOR:g} x this "
            f"model's fp32 noise floor {result.noise_floor:.3g})"
        )
        typer.echo(f"verified: the saved {result.dtype} weights load back as the merge rounded to {result.dtype} "
                   f"(max |Δlogit| = {result.reload_diff:.3g})")
        if result.rounding is not None and result.dtype != "fp32":
            typer.echo(f"rounding to {result.dtype}: {rounding_line(result)}")
    else:
        typer.echo(
            f"verified: max |Δlogit| = {result.max_abs_diff:.3g} <= tolerance {result.tolerance:.3g} "
            f"(bundle loaded back vs the run's model, {result.probe_tokens} tokens)"
        )
    if result.merged:
        typer.echo(f"load it with AutoModelForCausalLM.from_pretrained({str(result.out)!r})")
    else:
        typer.echo(f'load it with: orpo-tune generate {result.out} --prompt "..."')


def _export_gguf(run_dir: Path, out: Path, quant: str, adapter_only: bool, force: bool) -> None:
    from orpo_cli.export_gguf import export_gguf_run
    from orpo_cli.progress import Reporter
    from orpo_cli.rundir import open_run

    run = open_run(run_dir)
    reporter = Reporter()  # export_gguf_run checks --out and the request before any model loads
    result = export_gguf_run(run, out, quant=quant, adapter_only=adapter_only, force=force, reporter=reporter)
    for note in result.notes:
        reporter.note(f"note: {note}")
    what = f"{result.model_file} + LoRA {result.adapter_file}" if result.adapter_file else result.model_file
    typer.echo(f"exported {what} ({result.quant}) to {result.out}")
    typer.echo(f"verified: the merge (fp32) vs base + adapter: max |Δlogit| = {result.merge_diff:.3g} <= tolerance "
               f"{result.tolerance:.3g} ({result.probe_tokens} tokens)")
    typer.echo(f"verified: read back by transformers vs the merge quantized to {result.quant} in memory: max |Δlogit| "
               f"= {result.readback_diff:.3g} <= {result.tolerance:.3g}")
    for label, rt in (("llama.cpp", result.runtime), ("llama.cpp, base + LoRA", result.lora_runtime)):
        if rt is not None:
            typer.echo(f"verified in {label}: greedy answers agree with those of the model the file holds (run by "
                       f"torch) on {rt.tokens_agree}/{rt.tokens_total} tokens ({rt.answers_equal}/{rt.probes} whole); "
                       f"along them its top token differs at {rt.forced_mismatches}/{rt.forced_positions} positions "
                       f"(largest logit gap {rt.worst_gap:.3g}); max |Δlogit| vs that model {rt.max_logit_diff:.3g}")
            typer.echo(f"  vs the fp32 merge's greedy answers: {rt.fp32_agree}/{rt.fp32_total} tokens "
                       f"({rt.fp32_equal}/{rt.probes} whole)")
    typer.echo(f"{result.quant} costs max |Δlogit| {result.quant_cost[0]:.3g}, RMS {result.quant_cost[1]:.3g} vs base + "
               "adapter")
    typer.echo(f"run it with: llama-cli -m {result.out / result.model_file}"
               + (f" --lora {result.out / result.adapter_file}" if result.adapter_file else "")
               + f", or ollama create NAME -f {result.out / 'Modelfile'}")


@app.command()
@_user_errors
def generate(
    path: Annotated[Path, typer.Argument(help="A run directory, an `orpo-tune export` (merged model or bundle), "
                                         "any causal LM directory, or a built-in model (builtin:NAME).",
                                         show_default=False)],
    prompt: Annotated[str | None, typer.Option(help="The user message.", show_default=False)] = None,
    system: Annotated[str | None, typer.Option(help="A system message (default: the recipe's data.system_prompt).",
                                               show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 is greedy.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    interactive: Annotated[bool, typer.Option(help="Chat: read messages from stdin until EOF or /exit "
                                              "(/reset forgets the conversation).")] = False,
) -> None:
    """Generate an answer with a tuned model, streamed as it comes."""
    from orpo_cli.generation import chat_template_in_use, conversation, render_prompt, stream_answer
    from orpo_cli.models.tuned import detect, load_tuned

    if prompt is None and not interactive:
        raise UserError("--prompt TEXT is required (or --interactive for a chat)")
    _at_least("--max-new-tokens", max_new_tokens, 1)
    _at_least("--temperature", temperature, 0)
    if detect(path) == "gguf":  # a wrong PATH fails before anything loads
        from orpo_cli.models.gguf_runtime import GgufExport

        export = GgufExport(Path(path))
        tokenizer, recipe = export.tokenizer, export.recipe

        def reply(ids: list[int]) -> str:  # answered by llama.cpp
            return export.stream(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    else:
        tuned = load_tuned(path)
        tokenizer, recipe = tuned.tokenizer, tuned.recipe

        def reply(ids: list[int]) -> str:
            return stream_answer(tuned.model, tuned.adapter, tuned.tokenizer, ids, device=tuned.device,
                                 max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)

    template = chat_template_in_use(tokenizer, recipe)
    if system is None and recipe is not None:
        system = recipe.data.system_prompt

    def answer(text: str, history: list[dict[str, str]]) -> str:
        return reply(render_prompt(tokenizer, conversation(text, system, history), template))

    if not interactive:
        answer(prompt or "", [])
        return
    history: list[dict[str, str]] = []
    pending = prompt
    while True:
        if pending is None:
            try:
                pending = input("> ")
            except EOFError:
                break
        text, pending = pending.strip(), None
        if text in {"/exit", "/quit"}:
            break
        if text == "/reset":
            history = []
            continue
        if text:
            try:
                said = answer(text, history)
            except UserError as err:  # e.g. the conversation outgrew the model's context: say so, keep the chat
                typer.echo(f"error: {err}", err=True)
                continue
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": said}]


@app.command()
@_user_errors
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by train.")],
    out: Annotated[Path | None, typer.Option(help="PNG to write (default RUN_DIR/training-curves.png).")] = None,
) -> None:
    """Draw a run's training curves (loss, NLL, log odds ratio, log-probs, accuracy) to a PNG."""
    from orpo_cli.plots import check_plot_out, plot_run
    from orpo_cli.run_lock import writing_run
    from orpo_cli.rundir import open_run

    run = open_run(run_dir)
    into_run = check_plot_out(run, out)
    with writing_run(run.root, "plot", take=into_run):
        typer.echo(f"wrote {plot_run(run, out)}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
