"""Bad input, table-driven: one clear line naming the problem, exit code 2, no traceback, nothing written."""

import errno
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from orpo_cli.cli import app
from orpo_cli.errors import DEBUG_ENV

ROOT = Path(__file__).parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "data"
runner = CliRunner()

BASE = """
model: {name_or_path: builtin:micro-llama}
orpo: {max_length: 64, max_prompt_length: 32}
data: {train: {path: DATA}}
train: {max_steps: 1, tensorboard: false}
"""

CONV = str(FIXTURES / "conversations.json")

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
    # ---- silent defaults: a recipe that lost its model or data never trains a demo
    ("empty-recipe", "", [], ["the recipe is empty", "model.name_or_path", "data.train"]),
    ("comments-only", "# model: {name_or_path: builtin:micro-llama}\n# data: {train: x}\n", [], ["the recipe is empty"]),
    ("no-model-section", BASE.replace("model: {name_or_path: builtin:micro-llama}\n", ""), [],
     ["model.name_or_path: required and missing"]),
    ("no-data-section", BASE.replace("data: {train: {path: DATA}}\n", ""), [], ["data.train: required and missing"]),
    ("model-without-name", BASE.replace("{name_or_path: builtin:micro-llama}", "{dtype: fp32}"), [],
     ["model.name_or_path: required and missing"]),
    ("data-without-train", BASE.replace("{train: {path: DATA}}", "{format: pairs}"), [],
     ["data.train: required and missing"]),
    # ---- a key given twice is never merged silently
    ("two-train-sections", BASE + "train: {lr: 1.0e-3}\n", [], ["recipe.yaml:6: duplicate key `train` (also on line 5)"]),
    ("lr-twice", BASE.replace("train: {max_steps: 1, tensorboard: false}", "train:\n  lr: 1.0e-3\n  max_steps: 1\n  lr: 2.0e-3"),
     [], ["recipe.yaml:8: duplicate key `train.lr` (also on line 6)"]),
    ("key-twice-in-flow", BASE.replace("max_steps: 1", "max_steps: 1, max_steps: 2"), [],
     ["duplicate key `train.max_steps`"]),
    # ---- hostile YAML: refused on the parser's events, before anything is built or copied
    ("billion-laughs", BASE + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10) if i else ', '.join(['lol'] * 10)}]\n" for i in range(9)
    ) + "seed: *a8\n", [], ["recipe.yaml:10: the recipe expands to more than 100,000 values"]),
    ("aliases-as-keys-of-merges", BASE + "x: &x {a: 1, b: 2}\ny: &y {<<: [*x, *x, *x], c: 3}\n" + "".join(
        f"z{i}: &z{i} [{', '.join([f'*z{i - 1}' if i else '*y'] * 12)}]\n" for i in range(6)), [],
     ["expands to more than 100,000 values"]),
    ("python-tag", BASE + "name: !!python/object/apply:os.system ['echo pwned']\n", [],
     ["recipe.yaml:6: the YAML tag !!python/object/apply:os.system is not allowed in a recipe"]),
    ("custom-tag", BASE.replace("max_steps: 1", "max_steps: !steps 1"), [], ["the YAML tag !steps is not allowed"]),
    ("binary-tag", BASE + "name: !!binary aGk=\n", [], ["the YAML tag !!binary is not allowed"]),
    ("tag-in-set", BASE, ["--set", "seed=!!python/name:os.system"], ["the YAML tag !!python/name:os.system"]),
    ("deep-list", BASE + "x: " + "[" * 3000 + "]" * 3000 + "\n", [], ["recipe.yaml:6: nested more than 32 levels"]),
    ("deep-mapping", BASE + "x: " + "{a: " * 200 + "1" + "}" * 200 + "\n", [], ["nested more than 32 levels"]),
    ("unhashable-key", BASE + "? [a, b]\n: 1\n", [], ["recipe.yaml:6:", "invalid YAML: found unhashable key"]),
    # ---- lengths beyond the model's context (micro-llama's config: max_position_embeddings 1024)
    ("max-length-beyond-context", BASE.replace("max_length: 64", "max_length: 2048"), [],
     ["orpo.max_length: 2048 tokens is longer than the context of builtin:micro-llama, 1024 positions"]),
    # ---- .inf / .nan in any field
    ("lr-inf", BASE.replace("max_steps: 1", "max_steps: 1, lr: .inf"), [], ["train.lr: must be a finite number"]),
    ("lr-nan", BASE.replace("max_steps: 1", "max_steps: 1, lr: .nan"), [], ["train.lr: must be a finite number"]),
    ("lambda-nan", BASE.replace("max_length: 64", "max_length: 64, lambda: .nan"), [],
     ["orpo.lambda: must be a finite number"]),
    ("betas-nan", BASE.replace("max_steps: 1", "max_steps: 1, adam_betas: [.nan, 0.999]"), [],
     ["train.adam_betas[0]: must be a finite number"]),
    ("epochs-inf", BASE.replace("max_steps: 1", "epochs: .inf"), [], ["train.epochs: must be a finite number"]),
    ("grad-norm-inf-override", BASE, ["--set", "train.max_grad_norm=.inf"], ["train.max_grad_norm: must be a finite"]),
    # ---- libraries refusing the user's input: one line naming the key, never their traceback
    ("lora-target-matches-nothing", BASE + "adapter: {kind: lora, target_modules: [q_prj]}\n", [],
     ["adapter.target_modules: 'q_prj' matches no module of builtin:micro-llama", "q_proj, up_proj, v_proj"]),
    ("lora-target-not-adaptable", BASE + "adapter: {kind: lora, target_modules: [q_proj, norm]}\n", [],
     ["adapter.target_modules: 'norm' names LlamaRMSNorm modules", "q_proj"]),
    ("attention-kernel-missing", BASE.replace("micro-llama}", "micro-llama, attn_implementation: flash_attention_2}"),
     [], ["model: transformers refused it", "FlashAttention2"]),
    # ---- data without the shape its format expects: the row, and what it looks like instead
    ("conversational-plain-strings", BASE.replace("DATA}}", "DATA}, format: conversational}"), [],
     ["row 1: column 'chosen' holds text, but data.format: conversational expects", "data.format: pairs"]),
    ("implicit-on-pairs", BASE.replace("DATA}}", "DATA}, format: implicit}"), [],
     ["no row of", "data.format: implicit", "look like data.format: pairs"]),
    ("pairs-on-message-lists", BASE.replace("DATA", CONV), [],
     ["column 'prompt' not in", "data.format: conversational"]),
    ("sharegpt-on-pairs", BASE.replace("DATA}}", "DATA}, format: sharegpt}"), [],
     ["data.columns.conversations: column 'conversations' not in"]),
]


def _empty_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    return path


def _one_error_line(result) -> str:
    """The one `error:` line of a command that refused its input: no traceback, no second error line."""
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize(("text", "extra", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_train_rejects_bad_input_in_one_line(tmp_path, monkeypatch, text, extra, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: another test may have imported it already
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if "flash_attention_2" in text and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("DATA", str(FIXTURES / "pairs.jsonl")) if "nowhere" not in text else text)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(out), *extra])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    for word in words:
        assert word in line, (word, result.output)
    assert not out.exists(), "nothing may be written for bad input"


def test_empty_dataset(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("DATA", str(_empty_file(tmp_path))))
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "empty" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i} about {i * 7919 % 1000}", "chosen": f"good answer {i * 31 % 977}",
             "rejected": f"bad answer {i * 17 % 991}"} for i in range(n)]


def _jsonl(n: int) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in _rows(n)).encode()


def _corrupt_gzip(n: int) -> bytes:
    import gzip

    data = bytearray(gzip.compress(_jsonl(n), mtime=0))
    for i in range(len(data) * 2 // 3, len(data) * 2 // 3 + 16):
        data[i] ^= 0xFF
    return bytes(data)


def _not_utf8() -> bytes:
    data = _jsonl(100)
    at = data.index(b"\"good answer 821\"")  # line 59's chosen (58 * 31 % 977)
    return data[:at] + b"\xff\xfe" + data[at:]


def _csv(n: int, spoil=lambda text: text) -> bytes:
    return spoil("prompt,chosen,rejected\n" + "".join(f"q{i},good {i},bad {i}\n" for i in range(n))).encode()


def _corrupt_parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_rows(400)), path, row_group_size=100, compression="zstd")
    data = bytearray(path.read_bytes())
    start = pq.ParquetFile(path).metadata.row_group(2).column(1).data_page_offset
    for i in range(start + 30, start + 60):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


# (id, file name, its bytes (or a function writing it), words of the error line)
DATA_CASES = [
    ("gzip-corrupt-midway", "d.jsonl.gz", lambda: _corrupt_gzip(6000),
     ["data.train.path: FILE: corrupt gzip stream after line ", r"re:after line [1-9]\d{3} of its text"]),
    ("gzip-cut-short", "d.jsonl.gz", lambda: __import__("gzip").compress(_jsonl(400))[:500],
     ["FILE: corrupt gzip stream", "EOFError: Compressed file ended"]),
    ("gzip-that-is-not", "d.jsonl.gz", lambda: _jsonl(10), ["FILE: corrupt gzip stream", "Not a gzipped file"]),
    ("not-utf8", "d.jsonl", _not_utf8, ["data.train.path: FILE:59: not UTF-8 text (byte"]),
    ("lone-surrogate-jsonl", "d.jsonl", lambda: _jsonl(20).replace(b'"good answer 279"', b'"good \\ud800"'),
     ["FILE:10: row 10 holds text that is not valid Unicode"]),
    ("lone-surrogate-json", "d.json", lambda: json.dumps(_rows(20)).replace('"good answer 279"', '"\\udfff"').encode(),
     ["FILE: row 10 holds text that is not valid Unicode"]),
    ("csv-unquoted-comma", "d.csv", lambda: _csv(50, lambda t: t.replace("q7,good 7", "q7, with a comma,good 7")),
     ["FILE:9: row 8 has 4 fields and the header 3 (prompt, chosen, rejected)"]),
    ("csv-field-missing", "d.csv", lambda: _csv(50, lambda t: t.replace("q9,good 9,bad 9", "q9,good 9")),
     ["FILE:11: row 10 has 2 fields and the header 3"]),
    ("parquet-corrupt-page", "d.parquet", _corrupt_parquet,
     ["data.train.path: FILE: rows 201-300 (row group 2) cannot be read"]),
]


@pytest.mark.parametrize(("name", "make", "words"), [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_data_that_cannot_be_read_names_the_file_and_the_line(tmp_path, name, make, words):
    path = tmp_path / name
    if make.__code__.co_argcount:
        make(path)
    else:
        path.write_bytes(make())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("DATA", str(path)))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(out)])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    for word in words:  # "re:" words are patterns (where the exact line depends on zlib's output)
        found = re.search(word[3:], line) if word.startswith("re:") else word.replace("FILE", str(path)) in line
        assert found, (word, line)
    assert not out.exists()


def test_generate_stops_at_the_models_context_with_a_note_and_refuses_a_prompt_that_fills_it():
    words = " ".join(f"w{i}" for i in range(300))  # 735 tokens of micro-llama's 1024 positions
    result = runner.invoke(app, ["generate", "builtin:micro-llama", "--prompt", words, "--max-new-tokens", "2000"])
    assert result.exit_code == 0, result.output
    assert "note: answers stop at 289 new tokens, not 2000: the prompt takes 735 of the model's 1024" in result.output
    longer = " ".join(f"w{i}" for i in range(900))
    result = runner.invoke(app, ["generate", "builtin:micro-llama", "--prompt", longer, "--max-new-tokens", "20"])
    assert result.exit_code == 2
    assert "the prompt is 2504 tokens and the model's context is 1024 positions" in _one_error_line(result)
    # a chat that outgrows the context says so and goes on
    chat = runner.invoke(app, ["generate", "builtin:micro-llama", "--interactive", "--max-new-tokens", "3"],
                         input=f"hi\n{longer}\n/reset\nhello\n")
    assert chat.exit_code == 0, chat.output
    assert chat.output.count("error: the prompt is") == 1 and chat.output.count("> ") >= 4, chat.output  # to the end


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


# ---------------------------------------------------------------------------------- the file system
def _train(tmp_path: Path, out: Path, *extra: str, env: dict[str, str] | None = None):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("DATA", str(FIXTURES / "pairs.jsonl")))
    return runner.invoke(app, ["train", str(recipe), "--output-dir", str(out), *extra], env=env)


def test_output_dir_that_is_a_file_or_under_one(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    result = _train(tmp_path, a_file)
    assert result.exit_code == 2
    assert _one_error_line(result) == f"error: output_dir: {a_file} is a file, not a directory; give a directory"
    result = _train(tmp_path, a_file / "run")
    assert result.exit_code == 2
    assert f"output_dir: {a_file / 'run'}: {a_file} is a file, not a directory" in _one_error_line(result)
    assert a_file.read_text() == "mine"


def test_cache_that_is_a_file_names_the_setting(tmp_path):
    a_file = tmp_path / "cache"
    a_file.write_text("")
    result = _train(tmp_path, tmp_path / "run", env={"ORPO_TUNE_CACHE": str(a_file)})
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert f"{a_file} is a file, not a directory" in line and "ORPO_TUNE_CACHE" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, "no space left on the device while writing the run directory; free some space"),
        (errno.EDQUOT, "disk quota exceeded while writing the run directory"),
        (errno.EROFS, "read-only file system while writing the run directory"),
    ],
    ids=["disk-full", "quota", "read-only"],
)
def test_a_full_or_read_only_disk_is_one_line_and_leaves_no_half_run(tmp_path, monkeypatch, code, words):
    import orpo_cli.atomic as atomic

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))  # as write() raises it: no file name

    monkeypatch.setattr(atomic, "atomic_write_text", fail)
    out = tmp_path / "run"
    result = _train(tmp_path, out)
    assert result.exit_code == 2
    assert _one_error_line(result) == f"error: output_dir: {words}" + _one_error_line(result).split(words)[1]
    assert not out.exists(), "a run directory that could not be written is not left half-written"


def test_permission_denied_names_the_path(tmp_path, monkeypatch):
    from orpo_cli.rundir import RunDir

    def refuse(self, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.root))

    monkeypatch.setattr(RunDir, "prepare", refuse)
    out = tmp_path / "run"
    result = _train(tmp_path, out)
    assert result.exit_code == 2
    assert _one_error_line(result).startswith(f"error: output_dir: {out}: permission denied; make it writable")
    assert not out.exists()


def test_a_corrupt_local_model_is_one_line_naming_the_key(tmp_path):
    from orpo_cli.models.builtin import resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("builtin:micro-llama"), model)
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:64])  # a download cut short
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("builtin:micro-llama", str(model)).replace("DATA", str(FIXTURES / "pairs.jsonl")))
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert line.startswith("error: model: ") and "refused it: SafetensorError" in line, line
    assert not (tmp_path / "run").exists()


def test_weights_that_do_not_fit_the_config_name_the_tensor_and_both_shapes(tmp_path):
    from orpo_cli.models.builtin import resolve_model_path

    model = tmp_path / "model"
    shutil.copytree(resolve_model_path("builtin:micro-llama"), model)
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] += 8  # 64 -> 72: every MLP weight now disagrees with the file
    (model / "config.json").write_text(json.dumps(config))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("builtin:micro-llama", str(model)).replace("DATA", str(FIXTURES / "pairs.jsonl")))
    shapes = "model.layers.0.mlp.down_proj.weight is [32, 64] in model.safetensors but [32, 72] by config.json"
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert line.startswith(f"error: model.name_or_path: {model}: the weights do not fit") and shapes in line, line
    assert "(and 5 more tensors)" in line
    assert not (tmp_path / "run").exists()
    result = runner.invoke(app, ["generate", str(model), "--prompt", "hi"])
    assert result.exit_code == 2 and shapes in _one_error_line(result), result.output


def test_recipe_that_is_not_utf8(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(BASE.encode() + b"name: caf\xe9\n")
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "not UTF-8 text" in _one_error_line(result)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- our own bugs
def _boom(*args, **kwargs):
    raise ZeroDivisionError("division by zero, as a bug would")


def test_a_bug_before_the_run_directory_exists_is_one_line_naming_the_stage_and_the_log(tmp_path, monkeypatch):
    import orpo_cli.data.prepare as data

    monkeypatch.setattr(data, "_chat_template", _boom)  # the first step, cached data or not
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    out = tmp_path / "run"
    result = _train(tmp_path, out)
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert line.startswith("error: internal error while preparing the data: ZeroDivisionError: division by zero")
    assert "bug in orpo-tune" in line and "--debug" in line
    log = Path(line.split("the full traceback is in ")[1].split(" (rerun")[0])
    assert log.is_file() and "Traceback" in log.read_text() and "_boom" in log.read_text()
    assert not out.exists()


def test_a_bug_during_training_writes_its_traceback_to_the_run_directory(tmp_path, monkeypatch):
    import orpo_cli.training.loop as engine

    monkeypatch.setattr(engine, "orpo_forward", _boom)
    out = tmp_path / "run"
    result = _train(tmp_path, out)
    assert result.exit_code == 1, result.output
    line = _one_error_line(result)
    assert line.startswith("error: internal error while training: ZeroDivisionError")
    assert f"the full traceback is in {out / 'error.log'}" in line
    assert "ZeroDivisionError" in (out / "error.log").read_text()


@pytest.mark.parametrize("how", ["--debug", DEBUG_ENV])
def test_debug_prints_the_traceback(tmp_path, monkeypatch, how):
    import orpo_cli.data.prepare as data

    monkeypatch.setattr(data, "_chat_template", _boom)  # the first step, cached data or not
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(BASE.replace("DATA", str(FIXTURES / "pairs.jsonl")))
    args = ["train", str(recipe), "--output-dir", str(tmp_path / "run")]
    if how == "--debug":
        monkeypatch.setenv(DEBUG_ENV, "0")  # --debug sets it to 1 in this process: restored after the test
        result = runner.invoke(app, ["--debug", *args])
    else:
        result = runner.invoke(app, args, env={DEBUG_ENV: "1"})
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output and "_boom" in result.output
    assert sum(line.startswith("error: internal error") for line in result.output.splitlines()) == 1


def test_a_library_error_raised_by_our_own_code_is_not_blamed_on_the_user():
    from orpo_cli.adapters.reft.adapter import row_prompt_lengths
    from orpo_cli.errors import InternalError, UserError, stage

    mismatched = {"attention_mask": torch.ones(3, 4), "prompt_lengths": torch.tensor([1, 2])}
    with pytest.raises(InternalError, match="attaching: ValueError: ReFT: 3 rows"):
        with stage("attaching", blame="adapter"):
            row_prompt_lengths(mismatched)  # raised by orpo-tune's own code: a bug, not the user's value
    with pytest.raises(UserError, match=r"^adapter: json refused it: JSONDecodeError"):
        with stage("attaching", blame="adapter"):
            json.loads("{")


# --------------------------------------------------------------------- the verbs that read a run
@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> Path:
    """A one-step run of the micro model, the input the other verbs read."""
    work = tmp_path_factory.mktemp("micro-run")
    recipe = work / "recipe.yaml"
    recipe.write_text(BASE.replace("DATA", str(FIXTURES / "pairs.jsonl")))
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(work / "run")])
    assert result.exit_code == 0, result.output
    return work / "run"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def _fake_run(path: Path) -> None:
    """Another run's directory, as far as its records go."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')


# (id, how to spoil a copy of the run, the command (RUN, OUT and FILE filled in), words of the error line)
VERB_CASES = [
    ("eval-truncated-adapter", lambda run: _truncate(run / "adapter" / "adapter_model.safetensors"),
     ["eval", "RUN", "--data", "PAIRS"], ["RUN/adapter: safetensors refused it: SafetensorError"]),
    ("eval-broken-adapter-config", lambda run: (run / "adapter" / "adapter_config.json").write_text("{"),
     ["eval", "RUN", "--data", "PAIRS"], ["RUN/adapter: json refused it: JSONDecodeError"]),
    ("eval-saved-recipe-key-twice", lambda run: _append(run / "recipe.yaml", "seed: 1\nseed: 2\n"),
     ["eval", "RUN", "--data", "PAIRS"], ["recipe.yaml:", "duplicate key `seed`"]),
    ("eval-data-of-another-format", None, ["eval", "RUN", "--data", "CONV"],
     ["column 'prompt' not in", "data.format: conversational"]),
    ("generate-truncated-adapter", lambda run: _truncate(run / "adapter" / "adapter_model.safetensors"),
     ["generate", "RUN", "--prompt", "hi"], ["RUN/adapter: safetensors refused it"]),
    ("export-adapter-weights-missing", lambda run: (run / "adapter" / "adapter_model.safetensors").unlink(),
     ["export", "RUN", "--out", "OUT"], ["RUN/adapter: not a complete LoRA adapter (no adapter_model.safetensors)"]),
    ("export-out-under-a-file", None, ["export", "RUN", "--out", "FILE/export"], ["FILE is a file, not a directory"]),
    ("plot-out-in-missing-dir", None, ["plot", "RUN", "--out", "OUT/curves.png"],
     ["OUT/curves.png: no such file or directory"]),
    ("plot-out-is-a-directory", None, ["plot", "RUN", "--out", "RUN"], ["--out RUN is a directory"]),
    # ---- no verb writes inside a run directory (the adapter, checkpoints, tokenizer: hours of training)
    ("export-out-is-the-adapter", None, ["export", "RUN", "--out", "RUN/adapter", "--force"],
     ["--out RUN/adapter: inside the run directory RUN"]),
    ("export-out-in-the-checkpoints", None, ["export", "RUN", "--out", "RUN/checkpoints/x"],
     ["--out RUN/checkpoints/x: inside the run directory RUN"]),
    ("export-out-is-the-tokenizer", None, ["export", "RUN", "--out", "RUN/tokenizer", "--force"],
     ["inside the run directory RUN"]),
    ("export-out-in-another-run", lambda run: _fake_run(run.parent / "old"), ["export", "RUN", "--out",
     "TMP/old/merged"], ["--out TMP/old/merged: inside the run directory TMP/old"]),
    ("export-out-holds-another-run", lambda run: _fake_run(run.parent / "runs" / "old"),
     ["export", "RUN", "--out", "TMP/runs", "--force"], ["--out TMP/runs: holds the run directory TMP/runs/old"]),
    ("plot-out-in-the-adapter", None, ["plot", "RUN", "--out", "RUN/adapter/curves.png"],
     ["inside the run directory RUN"]),
    ("plot-out-over-the-metrics", None, ["plot", "RUN", "--out", "RUN/metrics.jsonl"],
     ["--out RUN/metrics.jsonl: inside the run directory RUN"]),
    ("init-out-is-a-directory", None, ["init", "--out", "RUN"], ["--out RUN is a directory"]),
    ("init-out-under-a-file", None, ["init", "--out", "FILE/recipe.yaml"], ["FILE is a file, not a directory"]),
]


@pytest.mark.parametrize(("spoil", "args", "words"), [c[1:] for c in VERB_CASES], ids=[c[0] for c in VERB_CASES])
def test_verbs_reject_bad_input_in_one_line(micro_run, tmp_path, spoil, args, words):
    run = tmp_path / "run"
    shutil.copytree(micro_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    if spoil is not None:
        spoil(run)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    out = tmp_path / "out"
    names = {"RUN": str(run), "OUT": str(out), "FILE": str(a_file), "PAIRS": str(FIXTURES / "pairs.jsonl"),
             "CONV": CONV, "TMP": str(tmp_path)}

    def fill(text: str) -> str:
        for key, value in names.items():
            text = text.replace(key, value)
        return text

    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    others = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = runner.invoke(app, [fill(a) for a in args])
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    for word in words:
        assert fill(word) in line, (fill(word), line)
    assert not out.exists() and a_file.read_text() == "mine"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, "nothing written into the run"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == others, "nor anywhere else"


def test_a_missing_package_is_named():
    from orpo_cli.errors import UserError, stage

    with pytest.raises(UserError, match=r"^train.optimizer: needs the Python package no_such_pkg_xyz, which is not"):
        with stage("building the optimizer", blame="train.optimizer"):
            import no_such_pkg_xyz  # noqa: F401
