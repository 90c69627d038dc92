"""`orpo-tune eval RUN --tasks ...`: lm-evaluation-harness on the tuned and the base model, offline, with the
built-in short_answers task: the prompts are the run's (chat template, system prompt), the answers are the model's
own greedy answers with the adapter on and off, the scores are exact match over them."""

from __future__ import annotations

import json
import re
import string

import pytest
from typer.testing import CliRunner

from orpo_cli.benchmarks import ASSETS, parse_tasks, run_benchmarks
from orpo_cli.cli import app
from orpo_cli.errors import UserError

runner = CliRunner()
LIMIT = 6


def _exact(answer: str, target: str) -> float:
    def norm(s: str) -> str:
        return s.lower().translate(str.maketrans("", "", string.punctuation)).strip()

    return float(norm(answer) == norm(target))


def test_lm_eval_sees_the_runs_prompts_and_scores_the_models_own_answers(tiny_lora_run, copy_run):
    from orpo_cli.generation import chat_template_in_use, conversation, generate_batch, render_prompt
    from orpo_cli.models.tuned import load_run, read_recipe

    run = copy_run(tiny_lora_run)
    (run.root / "eval.json").write_text(json.dumps({"run": "x", "accuracy": 0.5}))  # the preference eval's
    result, samples = run_benchmarks(run, ["short_answers"], base=True, limit=LIMIT)

    recipe = read_recipe(run.recipe)
    tuned = load_run(run)
    template = chat_template_in_use(tuned.tokenizer, recipe)
    assert template is not None and result["chat_template"] is True
    docs = [json.loads(line) for line in (ASSETS / "short_answers.jsonl").read_text().splitlines()][:LIMIT]
    prompts = [render_prompt(tuned.tokenizer, conversation(d["question"], recipe.data.system_prompt), template)
               for d in docs]
    ours = {"tuned": generate_batch(tuned.model, tuned.adapter, tuned.tokenizer, prompts, device=tuned.device,
                                    max_new_tokens=32)}
    with tuned.adapter.disabled(tuned.model):
        ours["base"] = generate_batch(tuned.model, tuned.adapter, tuned.tokenizer, prompts, device=tuned.device,
                                      max_new_tokens=32)
    assert ours["tuned"] != ours["base"]  # the adapter changes the answers: a check that can tell them apart
    for label in ("tuned", "base"):
        logged = sorted(samples[label]["short_answers"], key=lambda s: int(s["doc_id"]))
        assert len(logged) == LIMIT
        for sample, doc, prompt, answer in zip(logged, docs, prompts, ours[label], strict=True):
            context = sample["arguments"][0][0]
            # the prompt lm-eval sent is the one training rendered: chat template, system prompt, BOS once
            assert tuned.tokenizer(context, add_special_tokens=False)["input_ids"] == prompt
            assert sample["target"] == doc["answer"]
            # its answer is the model's own greedy answer (adapter on / off), cut at the task's stop "\n"
            assert sample["resps"][0][0].strip() == answer.split("\n")[0].strip()
        expected = sum(_exact(s["resps"][0][0], s["target"]) for s in logged) / LIMIT
        assert result[label]["short_answers"]["exact_match"] == pytest.approx(expected)
    assert result["diff"]["short_answers"]["exact_match"] == pytest.approx(
        result["tuned"]["short_answers"]["exact_match"] - result["base"]["short_answers"]["exact_match"])
    saved = json.loads((run.root / "eval.json").read_text())
    assert saved["accuracy"] == 0.5 and saved["benchmarks"] == json.loads(json.dumps(result))  # kept beside


def test_eval_tasks_prints_base_and_tuned_side_by_side(tiny_lora_run, copy_run):
    run = copy_run(tiny_lora_run)
    result = runner.invoke(app, ["eval", str(run.root), "--tasks", "short_answers", "--base", "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert re.search(r"task\s+.\s+metric\s+.\s+tuned\s+.\s+base\s+.\s+tuned - base", result.output)
    assert re.search(r"short_answers\s+.\s+exact_match", result.output)
    saved = json.loads((run.root / "eval.json").read_text())["benchmarks"]
    assert saved["tasks"] == ["short_answers"] and saved["limit"] == 2 and set(saved) >= {"tuned", "base", "diff"}


def test_bad_task_options_are_one_line(tiny_lora_run, copy_run, monkeypatch):
    run = copy_run(tiny_lora_run)
    for args, words in [
        (["--tasks", "short_answers", "--samples", "2"], "--samples applies to the preference eval"),
        (["--tasks", " , "], "--tasks: give one or more"),
        (["--tasks", "short_answers,short_answers"], "given twice"),
        (["--limit", "3"], "--limit applies to --tasks"),
        (["--tasks", "short_answers", "--limit", "0"], "--limit: must be at least 1"),
    ]:
        result = runner.invoke(app, ["eval", str(run.root), *args])
        assert result.exit_code == 2, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1 and words in result.output, (args, result.output)
    assert parse_tasks("a, b") == ["a", "b"]
    with pytest.raises(UserError):
        parse_tasks("")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    monkeypatch.setattr("orpo_cli.benchmarks.find_spec", importlib.util.find_spec)
    result = runner.invoke(app, ["eval", str(run.root), "--tasks", "short_answers"])
    assert result.exit_code == 2 and "pip install 'orpo-tune[lm-eval]'" in result.output
    assert not (run.root / "eval.json").exists()
