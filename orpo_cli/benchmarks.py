"""Standard benchmarks through lm-evaluation-harness: `orpo-tune eval RUN --tasks NAME[,NAME...] [--base]`.

The tuned model is the run loaded back as `eval` loads it (base + adapter, no export), wrapped as lm-eval's
HFLM; with --base the same model with its adapter switched off (or, for full fine-tuning, the base loaded again).
Prompts go through lm-eval's chat-template path with the template the run trained with (its saved tokenizer's,
or none when the recipe said `data.chat_template: none`) and the recipe's system prompt, as the ORPO paper
evaluates IFEval. The numbers land in RUN/eval.json under `benchmarks`, beside what the preference eval wrote.

Task names are lm-eval's (ifeval, arc_easy, ... : they download their data from the hub), or a built-in one
defined from files shipped with the package, which works offline (BUILTIN_TASKS).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from orpo_cli.atomic import atomic_write_text
from orpo_cli.errors import UserError, stage
from orpo_cli.evaluate import EVAL_FILE
from orpo_cli.progress import Reporter
from orpo_cli.rundir import RunDir

ASSETS = Path(__file__).parent / "assets" / "benchmarks"


def _short_answers() -> dict[str, Any]:
    return {
        "task": "short_answers",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(ASSETS / "short_answers.jsonl")}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 32, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": True}],
        "metadata": {"version": 1.0},
    }


# Offline tasks shipped with orpo-tune: name -> (lm-eval task config, what it measures).
BUILTIN_TASKS = {
    "short_answers": (
        _short_answers,
        "40 short questions (capitals, sums, opposites, colours...) from builtin:short-answers, generated greedily; "
        "exact match of the whole answer, case and punctuation ignored: a model that answers in a sentence scores 0",
    ),
}


def parse_tasks(text: str) -> list[str]:
    """`--tasks a,b`: names, each once."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("--tasks: give one or more lm-eval task names, e.g. --tasks short_answers,ifeval")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--tasks: {', '.join(twice)} given twice; list each task once")
    return names


def check_lm_eval() -> None:
    if find_spec("lm_eval") is None:
        raise UserError("--tasks needs the Python package lm-eval, which is not installed: pip install 'orpo-tune[lm-eval]'")


def run_benchmarks(
    run: RunDir,
    tasks: list[str],
    *,
    base: bool = False,
    limit: int | None = None,
    batch_size: int = 8,
    reporter: Reporter | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, list[dict[str, Any]]]]]:
    """lm-eval's `tasks` on the tuned model (and with `base` on the base); RUN/eval.json gets `benchmarks`.

    Returns (what eval.json holds under `benchmarks`, the samples lm-eval logged: {tuned|base: {task: [...]}}).
    """
    from orpo_cli.adapters import NoAdapter
    from orpo_cli.generation import chat_template_in_use
    from orpo_cli.models.tuned import check_trained, inference_device, load_base, load_run, read_recipe

    check_lm_eval()
    reporter = reporter or Reporter()
    recipe = read_recipe(run.recipe)
    check_trained(run)
    device = inference_device(recipe)
    tuned = load_run(run, device=device)
    template = chat_template_in_use(tuned.tokenizer, recipe)
    tuned.tokenizer.chat_template = template  # what lm-eval's apply_chat_template renders with
    system = recipe.data.system_prompt
    specs = [BUILTIN_TASKS[t][0]() if t in BUILTIN_TASKS else t for t in tasks]
    reporter.note(f"lm-eval: {', '.join(tasks)} on {run.root} ({recipe.adapter.kind} on {recipe.model.name_or_path}, "
                  f"{device}); chat template {'of the run' if template else 'none (plain text)'}"
                  + (f", system prompt {system!r}" if system else "") + (f", first {limit} per task" if limit else ""))

    def measure(model: Any, adapter: Any, label: str) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        reporter.note(f"lm-eval: {label} model")
        out = _evaluate(model, adapter, tuned.tokenizer, specs, template is not None, system, limit, batch_size)
        return _scores(out), out.get("samples", {})

    result: dict[str, Any] = {"tasks": tasks, "limit": limit, "chat_template": template is not None,
                              "system_prompt": system}
    samples: dict[str, Any] = {}
    result["tuned"], samples["tuned"] = measure(tuned.model, tuned.adapter, "tuned")
    if base:
        off = tuned.adapter.disabled(tuned.model)
        model, adapter = (tuned.model, tuned.adapter) if off is not None else (load_base(recipe, device), NoAdapter())
        with off if off is not None else contextlib.nullcontext():
            result["base"], samples["base"] = measure(model, adapter, "base")
        result["diff"] = {
            task: {m: v - result["base"][task][m] for m, v in metrics.items() if m in result["base"].get(task, {})}
            for task, metrics in result["tuned"].items()
        }
    path = run.root / EVAL_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"run": str(run.root)}
    saved["benchmarks"] = result
    atomic_write_text(path, json.dumps(saved, indent=2) + "\n")
    return result, samples


def benchmark_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows for Reporter.table: each task's metrics, tuned (and base and the difference)."""
    has_base = "base" in result
    columns = ["task", "metric", "tuned"] + (["base", "tuned - base"] if has_base else [])
    rows: list[list[Any]] = []
    for task, metrics in result["tuned"].items():
        for metric, value in metrics.items():
            row: list[Any] = [task, metric, float(value)]
            if has_base:
                row += [float(result["base"][task][metric]), f"{result['diff'][task][metric]:+.4g}"]
            rows.append(row)
    return columns, rows


def _evaluate(model: Any, adapter: Any, tokenizer: Any, specs: list[Any], chat: bool, system: str | None,
              limit: int | None, batch_size: int) -> dict[str, Any]:
    import lm_eval

    with stage("running lm-evaluation-harness", blame="--tasks"), _quiet_lm_eval():
        lm = _wrapped(model, adapter, tokenizer, batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=specs, limit=limit, apply_chat_template=chat, system_instruction=system,
            log_samples=True, bootstrap_iters=0,
        )
    if out is None:
        raise UserError("--tasks: lm-eval returned no results")
    return out


def _wrapped(model: Any, adapter: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's HFLM on our model, every forward and generate inside the adapter's forward context (ReFT reads
    each row's prompt length from it; LoRA's is a no-op)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class TunedLM(HFLM):
        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            if not adapter.packs_pairs:  # an adapter that reads each row's prompt (ReFT)
                raise UserError(
                    "--tasks: this run's adapter edits the prompt's positions, and lm-eval's loglikelihood tasks "
                    "do not say where a prompt ends; use generate_until tasks (e.g. short_answers, ifeval)"
                )
            return super()._model_call(inps, attn_mask, labels)

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(context)
            batch = {"input_ids": context, "attention_mask": mask, "prompt_lengths": mask.sum(dim=1)}
            with adapter.forward_context(model, batch):
                return super()._model_generate(context, max_length, stop, **kwargs)

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TunedLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _scores(out: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results ("exact_match,none" -> "exact_match"; stderr left out)."""
    scores: dict[str, dict[str, float]] = {}
    for task, values in out["results"].items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            scores.setdefault(task, {})[metric if filt == "none" else f"{metric} ({filt})"] = float(value)
    return scores


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs every step at INFO/WARNING; keep our console to the lines that matter."""
    import logging

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
