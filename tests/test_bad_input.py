"""Bad input, table-driven: one clear line naming the problem, exit code 2, no traceback, nothing written."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from orpo_cli.cli import app

ROOT = Path(__file__).parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "data"
runner = CliRunner()

BASE = """
model: {name_or_path: builtin:micro-llama}
orpo: {max_length: 64, max_prompt_length: 32}
data: {train: {path: DATA}}
train: {max_steps: 1, tensorboard: false}
"""

# (id, recipe text with DATA replaced, extra CLI args, expected words in the error line)
CASES = [
    ("malformed-yaml", "train:\n  lr: 1\n bad: [\n", [], ["invalid YAML"]),
    ("unknown-key", BASE + "trian: {lr: 1}\n", [], ["did you mean `train`"]),
    ("wrong-type", BASE.replace("max_steps: 1", "max_steps: 1, lr: fast"), [], ["train.lr"]),
    ("negative-lr", BASE.replace("max_steps: 1", "max_steps: 1, lr: -1.0"), [], ["train.lr"]),
    ("negative-lambda", BASE.replace("max_length: 64", "max_length: 64, lambda: -1"), [], ["orpo.lambda"]),
    ("rank-zero", BASE + "adapter: {kind: reft, rank: 0}\n", [], ["adapter.rank"]),
    (
        "prompt-not-shorter",
        BASE.replace("max_prompt_length: 32", "max_prompt_length: 64"),
        [],
        ["max_prompt_length"],
    ),
    (
        "micro-batch-zero",
        BASE.replace("max_steps: 1", "max_steps: 1, micro_batch_size: 0"),
        [],
        ["micro_batch_size"],
    ),
    ("missing-data-file", BASE.replace("DATA", "nowhere/missing.jsonl"), [], ["no such file"]),
    ("missing-column", BASE + "", ["--set", "data.columns.chosen=best"], ["best", "prompt"]),
    (
        "model-path-missing",
        BASE.replace("builtin:micro-llama", "./models/none-here"),
        [],
        ["model.name_or_path"],
    ),
    (
        "hub-id-offline",
        BASE.replace("builtin:micro-llama", "no-such-org/no-such-model-xyz"),
        [],
        ["model.name_or_path"],
    ),
    ("unknown-builtin", BASE.replace("micro-llama", "tiny-lama"), [], ["tiny-llama"]),
    ("reft-layer-too-deep", BASE + "adapter: {kind: reft, layers: [7]}\n", [], ["layer 7", "2 layers"]),
]


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


@pytest.mark.parametrize(("text", "extra", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_train_rejects_bad_input_in_one_line(tmp_path, monkeypatch, text, extra, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("DATA", str(FIXTURES / "pairs.jsonl")) if "nowhere" not in text else text)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(out), *extra])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) >= 1
    for word in words:
        assert word in result.output, (word, result.output)
    assert not out.exists(), "nothing may be written for bad input"


def test_empty_dataset(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("DATA", str(_empty_file(tmp_path))))
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "empty" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_non_string_value_names_the_row(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"prompt": "hi", "chosen": "hello", "rejected": "go away"}\n{"prompt": "a", "chosen": 3, "rejected": "b"}\n'
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("DATA", str(data)))
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "chosen" in result.output and "row 2" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--set", "model.device=cuda"], ["cuda"]),
        (["--nproc", "8", "--set", "model.device=cuda"], ["GPU"]),
        (["--set", "quantization.mode=8bit"], ["quantization.mode"]),
    ],
    ids=["cuda", "nproc-8", "8bit-on-cpu"],
)
def test_hardware_requests_that_cannot_run_here(tmp_path, extra, words):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("DATA", str(FIXTURES / "pairs.jsonl")))
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run"), *extra])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert any(w in result.output for w in words), result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("verb", [["eval"], ["export", "--out", "OUT"], ["generate", "--prompt", "hi"]])
def test_commands_refuse_a_directory_that_is_not_a_run(tmp_path, verb):
    args = [verb[0], str(tmp_path)] + [a.replace("OUT", str(tmp_path / "out")) for a in verb[1:]]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()
