"""Held-out preference metrics: accuracy, mean log odds ratio, margins and NLL over a set of pairs.

`preference_metrics` (orpo_cli.training.metrics) is what the training loop logs (TRL's names);
`run_eval` is `orpo-tune eval`: the run's eval split rebuilt from its saved recipe, the tuned model and
(with --base) the base model with the adapter switched off, the numbers in RUN/eval.json, and optionally
sample answers in RUN/samples.jsonl.

eval.json names its numbers for what they are, not with TRL's names: `mean_log_odds_ratio` is the mean log
odds ratio, the quantity metrics.jsonl logs as `log_odds_chosen`; TRL's `log_odds_ratio` (the mean
log sigmoid of it) appears here as its negation, `or_loss`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from orpo_cli.adapters import Adapter, NoAdapter
from orpo_cli.atomic import atomic_write_text
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.errors import UserError
from orpo_cli.models.tuned import (
    check_trained,
    inference_device,
    load_base,
    load_run,
    load_saved_tokenizer,
    read_recipe,
)
from orpo_cli.progress import Reporter
from orpo_cli.recipe import DataSource, Recipe
from orpo_cli.rundir import RunDir
from orpo_cli.training.batching import longest_sequence
from orpo_cli.training.forward import batch_layout
from orpo_cli.training.metrics import preference_metrics

# ------------------------------------------------------------------------------------- orpo-tune eval
EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"

# The numbers `orpo-tune eval` reports, in table order, with their labels.
EVAL_METRICS = {
    "accuracy": "preference accuracy",
    "mean_log_odds_ratio": "mean log odds ratio (metrics.jsonl: log_odds_chosen)",
    "margin": "mean log-prob margin",
    "nll": "chosen NLL",
    "perplexity": "chosen perplexity",
    "or_loss": "odds-ratio loss L_OR (metrics.jsonl: -log_odds_ratio)",
    "chosen_logps": "chosen mean log-prob",
    "rejected_logps": "rejected mean log-prob",
    "num_pairs": "pairs",
    # with --answers, where the eval rows carry a known answer (data.columns.answer): greedy answers scored
    "answer_right": "greedy answer contains the right answer",
    "answer_exact": "greedy answer is exactly the right answer",
    "answer_questions": "questions with a known answer",
}
_COUNTS = ("num_pairs", "answer_questions")


def heldout_metrics(
    model: nn.Module,
    adapter: Adapter,
    pairs: Sequence[TokenizedPair],
    *,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """The held-out numbers a user asks for, over all `pairs` (see EVAL_METRICS).

    See `eval_numbers` for what each one is.
    """
    from orpo_cli.kernels import apply_speed_paths

    ordered = sorted(pairs, key=lambda p: len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)))
    dtype = next(model.parameters()).dtype
    # Inference: of the speed paths, only the prefix/packed layouts' block attention changes anything here.
    with apply_speed_paths(model, device=device, dtype=dtype, adapter=adapter, only=("block_attention",)):
        m = preference_metrics(
            model,
            adapter,
            ordered,  # by length, to pad less: the set-level sums do not depend on the order
            batch_size=batch_size,
            lam=1.0,
            nll_on_prompt=False,
            pad_token_id=pad_token_id,
            device=device,
            layout=batch_layout(adapter, model, longest_sequence(pairs)),
            progress=progress,
        )
    return eval_numbers(m, len(pairs))


def eval_numbers(m: dict[str, float], num_pairs: int) -> dict[str, float]:
    """eval.json's numbers (EVAL_METRICS) from the training metrics `m` (TRL's names) of `num_pairs` pairs.

    accuracy: share of pairs whose chosen response has the higher mean token log-prob; mean_log_odds_ratio:
    the paper's log odds ratio of chosen over rejected, averaged over pairs (TRL's `log_odds_chosen`);
    margin: mean of (chosen - rejected) mean log-probs; nll: token-level NLL of the chosen responses and
    perplexity = exp(nll); or_loss: the ORPO odds-ratio term L_OR = -mean log sigmoid(log odds ratio), i.e.
    minus TRL's `log_odds_ratio`.
    """
    nll = m["nll_loss"]
    return {
        "accuracy": m["rewards/accuracies"],
        "mean_log_odds_ratio": m["log_odds_chosen"],
        "margin": m["logps/chosen"] - m["logps/rejected"],
        "nll": nll,
        "perplexity": math.exp(min(nll, 700.0)),
        "or_loss": -m["log_odds_ratio"],
        "chosen_logps": m["logps/chosen"],
        "rejected_logps": m["logps/rejected"],
        "num_pairs": num_pairs,
    }


def eval_pairs(recipe: Recipe, tokenizer: Any, data: Path | None) -> tuple[list[TokenizedPair], str]:
    """The run's eval split, rebuilt from its recipe, or every pair of `data` mapped with the run's settings."""
    from orpo_cli.data.prepare import check_source, prepare_data

    if data is None:
        pairs = prepare_data(recipe.data, recipe.orpo, tokenizer).eval
        if not pairs:
            raise UserError(
                "the run has no eval split (data.eval_ratio is 0 and there is no data.eval); "
                "pass --data FILE with held-out pairs"
            )
        if recipe.data.eval is not None:
            return pairs, recipe.data.eval.path
        return pairs, f"{recipe.data.train.path} (held-out {recipe.data.eval_ratio:g} split, seed {recipe.data.seed})"
    if not str(data).startswith("builtin:") and not Path(data).is_file():
        raise UserError(f"--data: no such file: {data}")
    settings = recipe.data.model_copy(update={"train": DataSource(path=str(data)), "eval": None, "eval_ratio": 0.0})
    check_source(settings)
    return prepare_data(settings, recipe.orpo, tokenizer).train, str(data)


def run_eval(
    run: RunDir,
    *,
    data: Path | None = None,
    base: bool = False,
    samples: int = 0,
    answers: bool = False,
    batch_size: int | None = None,
    max_new_tokens: int = 64,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Evaluate a run (and its base with `base`), write RUN/eval.json (and RUN/samples.jsonl); return the result.

    `answers`: also answer every distinct eval question that has a known answer, greedily, and score the answers
    (`score_answer`) beside the preference metrics.
    """
    reporter = reporter or Reporter()
    recipe = read_recipe(run.recipe)
    check_trained(run)
    device = inference_device(recipe)
    # Data first: a bad --data fails in seconds, before a model loads.
    pairs, source = eval_pairs(recipe, load_saved_tokenizer(run.tokenizer), data)
    questions = _distinct_prompts([p for p in pairs if p.answer is not None], len(pairs)) if answers else []
    if answers and not questions:
        raise UserError(
            "--answers: none of the eval pairs carries a known answer; name the data column that holds it "
            "in data.columns.answer"
        )
    tuned = load_run(run, device=device)
    size = batch_size or recipe.train.eval_batch_size or recipe.train.micro_batch_size
    reporter.note(f"eval: {len(pairs)} pairs from {source}; adapter {recipe.adapter.kind}, base {recipe.model.name_or_path}"
                  f" (quantization {recipe.quantization.mode}) on {device}")

    def measure(model: nn.Module, adapter: Adapter, label: str) -> dict[str, float]:
        with _bar(reporter, f"eval {label}", len(pairs)) as advance:
            return heldout_metrics(
                model, adapter, pairs, batch_size=size, pad_token_id=tuned.tokenizer.pad_token_id, device=device,
                progress=advance,
            )

    result: dict[str, Any] = {"run": str(run.root), "data": source, "adapter": recipe.adapter.kind}
    result.update(measure(tuned.model, tuned.adapter, "tuned"))
    chosen = _distinct_prompts(pairs, samples)
    # One generation per prompt, shared by the samples and the answer scores.
    shown = {tuple(p.prompt_ids) for p in chosen}
    prompts = chosen + [q for q in questions if tuple(q.prompt_ids) not in shown]
    generated: dict[str, list[str]] = {}
    if prompts:
        generated["tuned"] = _answers(tuned.model, tuned.adapter, tuned.tokenizer, prompts, device, max_new_tokens,
                                      reporter, "tuned")
    if base or prompts:
        # The base model: the adapter switched off where it can be, else (full fine-tuning) loaded again.
        off = tuned.adapter.disabled(tuned.model)
        model, adapter = (tuned.model, tuned.adapter) if off is not None else (load_base(recipe, device), NoAdapter())
        with off if off is not None else contextlib.nullcontext():
            if base:
                result["base"] = measure(model, adapter, "base")
                result["diff"] = {k: result[k] - result["base"][k] for k in EVAL_METRICS if k in result and k not in _COUNTS}
            if prompts:
                generated["base"] = _answers(model, adapter, tuned.tokenizer, prompts, device, max_new_tokens,
                                             reporter, "base")
    if questions:
        by_prompt = {tuple(p.prompt_ids): i for i, p in enumerate(prompts)}
        for label, target in (("tuned", result), ("base", result.get("base"))):
            if target is not None:
                target.update(answer_scores(questions, [generated[label][by_prompt[tuple(q.prompt_ids)]]
                                                        for q in questions]))
        if "diff" in result:
            result["diff"].update({k: result[k] - result["base"][k] for k in ("answer_right", "answer_exact")})
    if samples:
        decode = tuned.tokenizer.decode
        user_message = _user_message_reader(tuned.tokenizer, recipe)
        lines = [
            json.dumps({
                "prompt": decode(p.prompt_ids),
                "user": user_message(decode(p.prompt_ids)),
                "chosen": decode(p.chosen_ids, skip_special_tokens=True),
                "rejected": decode(p.rejected_ids, skip_special_tokens=True),
                "base": b,
                "tuned": t,
                **({"answer": p.answer} if p.answer is not None else {}),
            }, ensure_ascii=False)
            # the samples are the first prompts answered; --answers may have answered more
            for p, b, t in zip(chosen, generated["base"][: len(chosen)], generated["tuned"][: len(chosen)], strict=True)
        ]
        atomic_write_text(run.root / SAMPLES_FILE, "".join(line + "\n" for line in lines))
        result["samples"] = str(run.root / SAMPLES_FILE)
    previous = run.root / EVAL_FILE
    if previous.is_file():  # what `eval --tasks` wrote (benchmarks.py) stays beside the preference metrics
        kept = json.loads(previous.read_text(encoding="utf-8")).get("benchmarks")
        if kept is not None:
            result["benchmarks"] = kept
    atomic_write_text(run.root / EVAL_FILE, json.dumps(result, indent=2) + "\n")
    return result


def _distinct_prompts(pairs: Sequence[TokenizedPair], n: int) -> list[TokenizedPair]:
    """The first `n` pairs with distinct prompts (one_to_many data, or repeated questions, give several)."""
    seen: set[tuple[int, ...]] = set()
    out = []
    for pair in pairs:
        key = tuple(pair.prompt_ids)
        if key not in seen and len(out) < n:
            seen.add(key)
            out.append(pair)
    return out


def read_samples(run: RunDir) -> list[dict[str, str]]:
    """The rows of RUN/samples.jsonl (written by `run_eval` with samples)."""
    path = run.root / SAMPLES_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def samples_table(samples: Sequence[dict[str, str]]) -> tuple[list[str], list[list[str]]]:
    """Columns and rows for Reporter.table: each eval prompt with the base's and the tuned model's answer.

    Where the samples carry a known answer, a column shows it and each answer is marked right (✓) or wrong (✗)
    by `score_answer`.
    """
    known = any("answer" in s for s in samples)

    def shown(s: dict[str, str], label: str) -> str:
        text = s[label].strip()
        if "answer" not in s:
            return text
        return f"{'✓' if score_answer(s[label], s['answer'])[0] else '✗'} {text}"

    columns = ["prompt"] + (["right answer"] if known else []) + ["base model", "tuned model"]
    return columns, [
        [s.get("user") or s["prompt"]] + ([s.get("answer", "")] if known else []) + [shown(s, "base"), shown(s, "tuned")]
        for s in samples
    ]


def samples_right(samples: Sequence[dict[str, str]]) -> str | None:
    """'base right 5/8, tuned right 7/8' over the samples with a known answer, or None where none has one."""
    known = [s for s in samples if "answer" in s]
    if not known:
        return None
    right = {label: sum(score_answer(s[label], s["answer"])[0] for s in known) for label in ("base", "tuned")}
    return (f"right answers (the answer in the reply): base {right['base']}/{len(known)}, "
            f"tuned {right['tuned']}/{len(known)}")


def _normal(text: str) -> str:
    """Lower case, accents and punctuation dropped, whitespace collapsed: what answer matching compares."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w\s]", " ", text).split())


def score_answer(generated: str, answer: str) -> tuple[bool, bool]:
    """(contains, exact): whether the reply holds the answer as whole words, and whether it is nothing else.

    Both compare case-, accent- and punctuation-blind: "Brasília." is exactly "Brasilia"; "24 hours" contains
    "24" but "124" does not.
    """
    reply, wanted = _normal(generated), _normal(answer)
    if not wanted:
        return False, False
    contains = re.search(rf"(?<!\w){re.escape(wanted)}(?!\w)", reply) is not None
    return contains, reply == wanted


def answer_scores(questions: Sequence[TokenizedPair], replies: Sequence[str]) -> dict[str, float]:
    """eval.json's answer numbers: the share of `replies` that contain / exactly are their question's answer."""
    scored = [score_answer(reply, q.answer or "") for q, reply in zip(questions, replies, strict=True)]
    return {
        "answer_right": sum(c for c, _ in scored) / len(scored),
        "answer_exact": sum(e for _, e in scored) / len(scored),
        "answer_questions": len(scored),
    }


def _user_message_reader(tokenizer: Any, recipe: Recipe) -> Callable[[str], str | None]:
    """A function from a decoded prompt to the user's message in it, or None when it cannot tell.

    The prompt format is rendered once around a marker (chat template, system prompt and all, as
    generation.render_prompt renders it): what comes before and after the marker frames every single-turn
    prompt with the recipe's system prompt, so cutting both off leaves the user's message.
    """
    from orpo_cli.generation import chat_template_in_use, conversation, render_prompt

    marker = "QQMARKQQ"
    template = chat_template_in_use(tokenizer, recipe)
    try:
        framed = tokenizer.decode(render_prompt(tokenizer, conversation(marker, recipe.data.system_prompt), template))
    except UserError:
        return lambda _prompt: None
    head, found, tail = framed.partition(marker)

    def read(prompt: str) -> str | None:
        if not found or not prompt.startswith(head) or not prompt.endswith(tail) or len(prompt) < len(head) + len(tail):
            return None
        return prompt[len(head) : len(prompt) - len(tail)]

    return read


def eval_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows for Reporter.table: tuned, and with a base evaluation base and the difference."""
    has_base = "base" in result
    columns = ["metric", "tuned"] + (["base", "tuned - base"] if has_base else [])
    rows: list[list[Any]] = []
    for key, label in EVAL_METRICS.items():
        if key not in result:
            continue
        value = result[key]
        row: list[Any] = [label, _shown(key, value)]
        if has_base:
            row += [_shown(key, result["base"][key]), "" if key in _COUNTS else _signed(result["diff"][key])]
        rows.append(row)
    return columns, rows


def _shown(key: str, value: Any) -> Any:
    return str(value) if key in _COUNTS else float(value)


def _signed(value: float) -> str:
    return f"{value:+.4g}"


def _answers(
    model: nn.Module,
    adapter: Adapter,
    tokenizer: Any,
    pairs: Sequence[TokenizedPair],
    device: torch.device,
    max_new_tokens: int,
    reporter: Reporter,
    label: str,
) -> list[str]:
    from orpo_cli.generation import generate_batch

    with _bar(reporter, f"samples {label}", len(pairs)) as advance:
        return generate_batch(
            model, adapter, tokenizer, [p.prompt_ids for p in pairs], device=device, max_new_tokens=max_new_tokens,
            progress=advance,
        )


@contextlib.contextmanager
def _bar(reporter: Reporter, label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on a terminal (nothing otherwise); yields `advance(n)`."""
    if not reporter.enabled or not reporter.console.is_terminal:
        yield lambda _n: None
        return
    with Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=reporter.console, transient=True,
    ) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)
