"""`orpo-tune eval`: held-out numbers of a trained run, base vs tuned, eval.json, samples, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from orpo_cli.cli import app
from orpo_cli.evaluate import EVAL_METRICS

runner = CliRunner()
KEYS = {"accuracy", "mean_log_odds_ratio", "margin", "nll", "perplexity", "num_pairs"}
ANSWER_KEYS = {"answer_right", "answer_exact", "answer_questions"}


def _eval(*args):
    return runner.invoke(app, ["eval", *[str(a) for a in args]])


def _small_data(path: Path, rows: int = 3) -> Path:
    from orpo_cli.data.builtin_sets import demo_rows

    path.write_text("".join(json.dumps(r) + "\n" for r in demo_rows()[:rows]), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lora_eval(tiny_lora_run, tmp_path_factory):
    """`eval --base --json` on a copy of the tiny LoRA run: (run, parsed stdout)."""
    import shutil

    from orpo_cli.rundir import RunDir

    run = RunDir(tmp_path_factory.mktemp("eval") / "run")
    shutil.copytree(tiny_lora_run.root, run.root, ignore=shutil.ignore_patterns("checkpoints"))
    result = _eval(run.root, "--base", "--json")
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def test_orpo_helped_tuned_beats_base(lora_eval):
    _, out = lora_eval
    assert KEYS | {"base"} <= set(out)
    assert KEYS <= set(out["base"])
    assert out["accuracy"] >= 0.9
    assert abs(out["base"]["accuracy"] - 0.5) < 0.2  # a random-init model: near chance
    assert out["num_pairs"] == out["base"]["num_pairs"] == 125  # the demo's 10% held-out split
    assert out["margin"] > 0 > out["base"]["margin"] - 0.05
    assert out["mean_log_odds_ratio"] > out["base"]["mean_log_odds_ratio"]
    assert out["nll"] < out["base"]["nll"]  # SFT term: the chosen answers got likelier
    for side in (out, out["base"]):
        assert side["perplexity"] == pytest.approx(math.exp(side["nll"]))
    assert out["diff"]["accuracy"] == pytest.approx(out["accuracy"] - out["base"]["accuracy"])


def test_numbers_match_the_training_eval_of_the_same_split(lora_eval):
    """eval rebuilt the run's eval split from recipe.yaml and loaded the adapter the run trained: the numbers
    equal the engine's own last eval (tiny-lora: NLL on the response only) and, for the base, its step-0 eval
    (LoRA starts as the identity)."""
    run, out = lora_eval
    evals = [r for r in run.read_metrics() if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    # fp32 on a CPU: equal up to summation order; bf16 on a GPU: batches padded differently round differently.
    rel, acc = (1e-4, 1e-6) if not torch.cuda.is_available() else (5e-3, 0.03)
    assert out["accuracy"] == pytest.approx(last["eval_rewards/accuracies"], abs=acc)
    assert out["nll"] == pytest.approx(last["eval_nll_loss"], rel=rel)
    assert out["mean_log_odds_ratio"] == pytest.approx(last["eval_log_odds_chosen"], rel=rel * 10, abs=1e-5)
    assert out["or_loss"] == pytest.approx(-last["eval_log_odds_ratio"], rel=rel)
    assert out["base"]["accuracy"] == pytest.approx(first["eval_rewards/accuracies"], abs=acc)
    assert out["base"]["nll"] == pytest.approx(first["eval_nll_loss"], rel=rel)


def test_eval_json_written_and_equal_to_stdout(lora_eval):
    run, out = lora_eval
    saved = json.loads((run.root / "eval.json").read_text())
    assert saved == out
    assert not list(run.root.glob(".eval.json*"))  # the atomic write left no temporary behind


def test_table_data_file_and_samples(tiny_lora_run, copy_run, tmp_path):
    run = copy_run(tiny_lora_run)
    data = _small_data(tmp_path / "held.jsonl", rows=3)
    result = _eval(run.root, "--data", data, "--samples", 2, "--max-new-tokens", 6, "--base")
    assert result.exit_code == 0, result.output
    for label in ("preference accuracy", "chosen perplexity", "tuned - base", str(data)):
        assert label in result.stdout
    saved = json.loads((run.root / "eval.json").read_text())
    assert saved["num_pairs"] == 3 and saved["data"] == str(data)
    lines = (run.root / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2
    from orpo_cli.data.builtin_sets import demo_rows

    questions = {r["prompt"] for r in demo_rows()[:3]}
    for line in lines:
        sample = json.loads(line)
        assert set(sample) == {"prompt", "user", "chosen", "rejected", "base", "tuned"}
        assert sample["prompt"].startswith("<|bos|><|user|>") and sample["prompt"].endswith("<|assistant|>\n")
        assert sample["user"] in questions  # the user's message, cut out of the rendered prompt
    # Side by side where a person looks: each question with the base's and the tuned model's answer.
    table = result.stdout[result.stdout.index("greedy answers to 2 eval prompts"):]
    assert "base model" in table and "tuned model" in table
    for line in lines:
        sample = json.loads(line)
        assert sample["user"].split()[0] in table
        assert all(word in table for word in sample["tuned"].split()[:1])  # a random model may say nothing


def test_samples_name_the_user_message_only_when_the_frame_fits():
    from transformers import AutoTokenizer

    from orpo_cli.evaluate import _user_message_reader
    from orpo_cli.models.builtin import materialize_builtin
    from orpo_cli.recipe_loading import validate_recipe

    tokenizer = AutoTokenizer.from_pretrained(materialize_builtin("tiny-llama"))
    recipe = validate_recipe({"model": {"name_or_path": "builtin:tiny-llama"}, "data": {"train": "builtin:demo", "system_prompt": "Be kind."}})
    read = _user_message_reader(tokenizer, recipe)
    framed = "<|bos|><|system|>\nBe kind.<|end|>\n<|user|>\nWhat colour is the sky?<|end|>\n<|assistant|>\n"
    assert read(framed) == "What colour is the sky?"
    assert read(framed.replace("Be kind.", "Be brief.")) is None  # another system prompt: it cannot tell


def test_eval_on_a_4bit_run(tiny_qlora_run, copy_run, tmp_path):
    run = copy_run(tiny_qlora_run)
    data = _small_data(tmp_path / "held.jsonl", rows=4)
    result = _eval(run.root, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["num_pairs"] == 4 and "base" not in out
    assert "quantization 4bit" in result.stderr


def test_eval_reft_run_base_is_adapter_off(tiny_reft_run, copy_run, tmp_path):
    run = copy_run(tiny_reft_run)
    result = _eval(run.root, "--data", _small_data(tmp_path / "held.jsonl", rows=4), "--base", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["adapter"] == "reft"
    assert out["nll"] != out["base"]["nll"]  # the interventions are on for tuned, off for base
    _assert_base_is_the_plain_base_model(run, tmp_path / "held.jsonl", out["base"])


def test_eval_full_finetune_base_is_the_base_model_loaded_again(tiny_full_run, copy_run, tmp_path):
    run = copy_run(tiny_full_run)
    result = _eval(run.root, "--data", _small_data(tmp_path / "held.jsonl", rows=4), "--base", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["adapter"] == "full"
    assert out["nll"] != out["base"]["nll"]  # the tuned weights are not the base's
    _assert_base_is_the_plain_base_model(run, tmp_path / "held.jsonl", out["base"])


def _assert_base_is_the_plain_base_model(run, data, reported):
    """`reported` (eval's base numbers) equal the numbers of the base model loaded alone, with no adapter."""
    from orpo_cli.adapters.full import FullAdapter
    from orpo_cli.evaluate import eval_pairs, heldout_metrics
    from orpo_cli.models.tuned import inference_device, load_base, load_saved_tokenizer, read_recipe

    recipe = read_recipe(run.recipe)
    tokenizer = load_saved_tokenizer(run.tokenizer)
    pairs, _ = eval_pairs(recipe, tokenizer, data)
    device = inference_device(recipe)
    plain = heldout_metrics(
        load_base(recipe, device), FullAdapter(), pairs, device=device, pad_token_id=tokenizer.pad_token_id,
        batch_size=recipe.train.eval_batch_size or recipe.train.micro_batch_size,
    )
    assert set(plain) == set(reported)
    for key, value in plain.items():
        assert reported[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}"], "not a run directory"),
        (["{run}", "--data", "{tmp}/missing.jsonl"], "--data: no such file"),
    ],
)
def test_user_errors_are_one_line_exit_2(tiny_lora_run, copy_run, tmp_path, args, message):
    run = copy_run(tiny_lora_run)
    result = _eval(*[a.format(tmp=tmp_path / "nothing-here", run=run.root) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unfinished_run_is_a_user_error(tiny_lora_run, copy_run):
    import shutil

    run = copy_run(tiny_lora_run)
    shutil.rmtree(run.adapter)
    result = _eval(run.root)
    assert result.exit_code == 2 and "no trained adapter yet" in result.output


def test_metric_labels_cover_the_required_keys(lora_eval):
    """Every number eval.json holds has a label in EVAL_METRICS, and the table shows each under its label."""
    from orpo_cli.evaluate import eval_table

    _, out = lora_eval
    numbers = {k for k, v in out.items() if isinstance(v, int | float)}
    assert KEYS <= numbers
    assert numbers == set(EVAL_METRICS) - ANSWER_KEYS  # those come with --answers (test_answers_are_scored...)
    columns, rows = eval_table(out)
    assert columns == ["metric", "tuned", "base", "tuned - base"]
    shown = {row[0]: row for row in rows}
    for key in numbers:
        row = shown[EVAL_METRICS[key]]
        assert float(row[1]) == pytest.approx(out[key])
        assert float(row[2]) == pytest.approx(out["base"][key])


def test_log_odds_ratio_is_trls_in_metrics_and_eval_json_names_the_mean_log_odds_ratio():
    """Two pairs computed by hand: metrics.jsonl's log_odds_ratio is TRL's mean log sigmoid(log odds ratio),
    eval.json's mean_log_odds_ratio the mean log odds ratio itself, and the two differ."""
    from orpo_cli.evaluate import eval_numbers
    from orpo_cli.training.loss import ORPOTerms, odds_ratio
    from orpo_cli.training.metrics import MetricTally

    chosen, rejected = [-0.5, -2.0], [-1.0, -1.5]
    # log odds(p) = log p - log(1 - p) with log p the mean log-prob; the ratio is chosen's minus rejected's.
    ratios = [(c - math.log(-math.expm1(c))) - (r - math.log(-math.expm1(r))) for c, r in zip(chosen, rejected, strict=True)]
    assert ratios[0] == pytest.approx(0.9741, abs=1e-4) and ratios[1] == pytest.approx(-0.6071, abs=1e-4)
    mean_ratio = sum(ratios) / 2
    mean_log_sigmoid = sum(-math.log1p(math.exp(-x)) for x in ratios) / 2

    tally = MetricTally(torch.device("cpu"))
    c, r = torch.tensor(chosen), torch.tensor(rejected)
    l_or, log_odds = odds_ratio(c, r)
    zero = torch.zeros(())
    tally.add_pairs(ORPOTerms(loss=zero, nll=zero, or_loss=l_or.mean(), chosen_logps=c, rejected_logps=r,
                              log_odds=log_odds))
    tally.add_step(zero, zero)
    logged = tally.compute(lam=0.1)
    assert logged["log_odds_ratio"] == pytest.approx(mean_log_sigmoid, rel=1e-5)
    assert logged["log_odds_chosen"] == pytest.approx(mean_ratio, rel=1e-5)

    numbers = eval_numbers(logged, num_pairs=2)
    assert "log_odds_ratio" not in numbers
    assert numbers["mean_log_odds_ratio"] == pytest.approx(mean_ratio, rel=1e-5)
    assert numbers["or_loss"] == pytest.approx(-mean_log_sigmoid, rel=1e-5)
    assert abs(mean_ratio - mean_log_sigmoid) > 0.5  # two quantities, two names
    assert numbers["margin"] == pytest.approx(sum(chosen) / 2 - sum(rejected) / 2)


# ------------------------------------------------------------------------------------------ known answers
@pytest.mark.parametrize(
    ("reply", "answer", "contains", "exact"),
    [
        ("Brasilia.", "Brasília", True, True),  # case, accents and punctuation do not count
        ("The capital of Brazil is Brasília.", "Brasilia", True, False),
        ("A day has 24 hours.", "24", True, False),
        ("A day has 124 hours.", "24", False, False),  # whole words only
        ("The capital is new  delhi!", "New Delhi", True, False),
        ("The capital of Australia is Sydney.", "Canberra", False, False),
        ("anything", " ", False, False),
    ],
)
def test_score_answer(reply, answer, contains, exact):
    from orpo_cli.evaluate import score_answer

    assert score_answer(reply, answer) == (contains, exact)


def _run_with_answers(run, tmp_path) -> Path:
    """The run's recipe reads data.columns.answer; held-out rows that carry one (`--data`)."""
    import yaml

    recipe = yaml.safe_load(run.recipe.read_text())
    recipe["data"].setdefault("columns", {})["answer"] = "answer"
    run.recipe.write_text(yaml.safe_dump(recipe))
    rows = [{"prompt": q, "chosen": f"It is {a}.", "rejected": f"It is not {a}.", "answer": a}
            for q, a in (("What colour is a banana?", "yellow"), ("Where is Paris?", "France"), ("What is 3 plus 4?", "7"))]
    path = tmp_path / "held.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_answers_are_scored_and_marked_for_base_and_tuned(tiny_lora_run, copy_run, tmp_path, monkeypatch):
    import orpo_cli.evaluate as evaluate

    run = copy_run(tiny_lora_run)
    data = _run_with_answers(run, tmp_path)
    asked = []

    def replies(model, adapter, tokenizer, pairs, device, max_new_tokens, reporter, label):  # the tiny model says noise
        asked.append((label, len(pairs)))
        if label == "tuned":
            return [f"It is {p.answer}." for p in pairs]  # all right, none exactly
        return ["I do not know."] + [p.answer for p in pairs[1:]]  # the first wrong, the rest exactly right

    monkeypatch.setattr(evaluate, "_answers", replies)
    result = _eval(run.root, "--data", data, "--base", "--answers", "--samples", 3)
    assert result.exit_code == 0, result.output
    assert asked == [("tuned", 3), ("base", 3)]  # one generation per prompt, shared by samples and scores
    saved = json.loads((run.root / "eval.json").read_text())
    assert (saved["answer_right"], saved["answer_exact"], saved["answer_questions"]) == (1.0, 0.0, 3)
    assert saved["base"]["answer_right"] == saved["base"]["answer_exact"] == pytest.approx(2 / 3)
    assert saved["diff"]["answer_right"] == pytest.approx(1 / 3)
    from orpo_cli.evaluate import eval_table

    shown = {row[0]: row for row in eval_table(saved)[1]}  # each under its label in the table
    assert shown[EVAL_METRICS["answer_right"]][1:] == [1.0, pytest.approx(2 / 3), "+0.3333"]
    assert shown[EVAL_METRICS["answer_questions"]][1:] == ["3", "3", ""]
    assert "greedy answer contains the right" in result.stdout
    table = result.stdout[result.stdout.index("greedy answers to 3 eval prompts"):]
    assert "right answer" in table and "✗ I do not know." in table and "✓ It is yellow." in table
    assert "right answers (the answer in the reply): base 2/3, tuned 3/3" in result.stdout
    assert [json.loads(line)["answer"] for line in (run.root / "samples.jsonl").read_text().splitlines()] == [
        "yellow", "France", "7"]

    # Fewer samples than questions: every question is answered once, the samples are the first of them.
    asked.clear()
    result = _eval(run.root, "--data", data, "--answers", "--samples", 2)
    assert result.exit_code == 0, result.output
    assert asked == [("tuned", 3), ("base", 3)] and "base 1/2, tuned 2/2" in result.stdout
    assert json.loads((run.root / "eval.json").read_text())["answer_questions"] == 3

    # Without --answers: no answer numbers, and no generation beyond the samples asked for.
    asked.clear()
    result = _eval(run.root, "--data", data, "--samples", 1)
    assert result.exit_code == 0, result.output
    assert asked == [("tuned", 1), ("base", 1)] and "answer_right" not in json.loads((run.root / "eval.json").read_text())
    assert "base 0/1, tuned 1/1" in result.stdout


def test_answers_without_known_answers_is_one_line(tiny_lora_run, copy_run):
    run = copy_run(tiny_lora_run)
    result = _eval(run.root, "--answers")
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: --answers: none of the eval pairs carries a known answer; name the data column that holds it in "
        "data.columns.answer"
    ]
    assert not (run.root / "eval.json").exists()
