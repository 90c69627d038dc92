"""The command layer through Typer's runner: exit codes, messages, no tracebacks."""

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from orpo_cli import __version__
from orpo_cli.cli import app

ROOT = Path(__file__).parents[1]
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version():
    result = _run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_no_args_shows_help():
    result = _run()
    assert "train" in result.output and "validate" in result.output


def test_validate_prints_resolved_yaml_with_override():
    result = _run("validate", ROOT / "recipes/tiny-lora.yaml", "--set", "train.lr=3e-4")
    assert result.exit_code == 0, result.output
    assert "lr: 0.0003" in result.output
    assert yaml.safe_load(result.output)["orpo"]["lambda"] == 0.1


def test_validate_typo_exits_2_with_suggestion_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  lr: 1.0e-5\n")
    result = _run("validate", bad)
    assert result.exit_code == 2
    assert "did you mean `train`" in result.output
    assert "Traceback" not in result.output


def test_validate_lr_string_names_train_lr(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    result = _run("validate", bad)
    assert result.exit_code == 2 and "train.lr" in result.output and "Traceback" not in result.output


def test_validate_lambda_and_beta(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("orpo: {lambda: 0.1, beta: 0.1}\n")
    result = _run("validate", bad)
    assert result.exit_code == 2 and "beta" in result.output


def test_missing_recipe_file(tmp_path):
    result = _run("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "no such recipe file" in result.output


def test_schema_is_json_with_descriptions():
    result = _run("schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "orpo" in schema["properties"]
    assert "lambda" in json.dumps(schema)


def test_init_writes_a_valid_commented_recipe(tmp_path):
    for template in ("lora", "qlora", "reft", "full"):
        out = tmp_path / f"{template}.yaml"
        result = _run("init", "--template", template, "--out", out)
        assert result.exit_code == 0, result.output
        text = out.read_text()
        assert text.count("# ") > 40  # every field carries its description
        check = _run("validate", out)
        assert check.exit_code == 0, check.output
    again = _run("init", "--out", tmp_path / "lora.yaml")
    assert again.exit_code == 2 and "exists" in again.output
    assert _run("init", "--template", "nope", "--out", tmp_path / "x.yaml").exit_code == 2


def test_init_states_the_model_and_the_data_and_the_starter_trains(tmp_path):
    out = tmp_path / "lora.yaml"
    assert _run("init", "--out", out).exit_code == 0
    data = yaml.safe_load(out.read_text())
    assert data["model"]["name_or_path"] == "builtin:tiny-llama"
    assert data["data"]["train"]["path"] == "builtin:demo"
    result = _run("train", out, "--output-dir", tmp_path / "run", "--max-steps", "1",
                  "--set", "model.name_or_path=builtin:micro-llama", "--set", "train.tensorboard=false",
                  "--set", "data.train.max_rows=64")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "adapter").is_dir()


def test_reft_template_carries_the_measured_settings(tmp_path):
    # docs/reft.md, "Choosing the settings": f1+l1 at lr 3e-3 and lambda 1 matched LoRA on the real model
    out = tmp_path / "reft.yaml"
    assert _run("init", "--template", "reft", "--out", out).exit_code == 0
    data = yaml.safe_load(out.read_text())
    assert (data["adapter"]["positions"], data["train"]["lr"], data["orpo"]["lambda"]) == ("f1+l1", 3.0e-3, 1.0)


def test_qlora_template_sets_4bit(tmp_path):
    out = tmp_path / "q.yaml"
    _run("init", "--template", "qlora", "--out", out)
    data = yaml.safe_load(out.read_text())
    assert data["quantization"]["mode"] == "4bit" and data["adapter"]["kind"] == "lora"


def test_help_screens_look_like_an_ordinary_typer_app():
    """Flags carry no type, arguments and values read as click metavars (RUN_DIR, PATH, INTEGER), as in
    typer < 0.27 (0.27 writes `<path>` and `{run_dir}`, 0.29 adds `<bool>` to every flag)."""
    import re

    for args in (["--help"], ["eval", "--help"], ["train", "--help"]):
        result = runner.invoke(app, args, env={"COLUMNS": "120", "TERMINAL_WIDTH": "120"})
        assert result.exit_code == 0, result.output
        assert not re.search(r"<(bool|path|int|str|float|text)>", result.output), result.output
        assert "{" not in result.output.split("\n", 3)[1], result.output
    screen = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "120"}).output
    assert "Usage: orpo-tune eval [OPTIONS] RUN_DIR" in " ".join(screen.split())
    assert re.search(r"--json\s+Print one JSON object", screen), screen
    assert re.search(r"--samples\s+INTEGER", screen), screen
