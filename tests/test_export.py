"""`orpo-tune export`: merged LoRA (also from a 4-bit run), full fine-tuning, bundles, atomicity, errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from orpo_cli.cli import app
from orpo_cli.export import PAUSE_ENV

ROOT = Path(__file__).parents[1]
runner = CliRunner()
VERIFIED = re.compile(r"max \|Δlogit\| = (\S+) <= tolerance (\S+)")

# Run in a separate process: plain transformers, nothing of orpo_cli, prints the logits as JSON.
_LOAD_PLAIN = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    logits = model(input_ids=ids).logits[0]
print(json.dumps({"dtype": str(next(model.parameters()).dtype), "logits": logits.tolist(),
                  "modules": sorted({type(m).__name__ for m in model.modules()})}))
"""


def _export(*args):
    return runner.invoke(app, ["export", *[str(a) for a in args]])


def _verified(output: str) -> tuple[float, float]:
    match = VERIFIED.search(output)
    assert match, output
    return float(match.group(1)), float(match.group(2))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _probe_ids(run) -> list[int]:
    from orpo_cli.data.prepare import prepare_data
    from orpo_cli.models.tuned import load_saved_tokenizer, read_recipe

    recipe = read_recipe(run.recipe)
    pair = prepare_data(recipe.data, recipe.orpo, load_saved_tokenizer(run.tokenizer)).eval[7]
    return pair.prompt_ids + pair.chosen_ids


def _base_plus_adapter_logits(run, ids: list[int]) -> torch.Tensor:
    """What the export promises to equal: the full-precision base with the run's adapter, unmerged."""
    from orpo_cli.adapters import build_adapter
    from orpo_cli.models.tuned import load_base, read_recipe

    recipe = read_recipe(run.recipe)
    adapter = build_adapter(recipe.adapter)
    model = adapter.load(load_base(recipe, torch.device("cpu"), full_precision=True), run.adapter).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


# ------------------------------------------------------------------------------------------ merged LoRA
def test_qlora_export_loads_with_plain_transformers_in_another_process(tiny_qlora_run, tmp_path):
    out = tmp_path / "merged"
    result = _export(tiny_qlora_run.root, "--out", out)
    assert result.exit_code == 0, result.output
    diff, tolerance = _verified(result.output)
    assert diff <= tolerance and tolerance < 1e-3  # fp32 (the builtin base's own dtype)
    assert "4bit nf4 base" in result.output  # says that it merged into the full-precision base
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md",
                 "orpo-tune-recipe.yaml"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["use_cache"] is True
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tokenizer_config or (out / "chat_template.jinja").is_file()
    assert not (out / "recipe.yaml").exists()  # an export must not pass for a run directory

    ids = _probe_ids(tiny_qlora_run)
    proc = subprocess.run([sys.executable, "-c", _LOAD_PLAIN, str(out), json.dumps(ids)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["dtype"] == "torch.float32"
    assert not any("4bit" in m or "Lora" in m for m in loaded["modules"])  # merged, full precision, no PEFT
    exported = torch.tensor(loaded["logits"])
    reference = _base_plus_adapter_logits(tiny_qlora_run, ids)
    assert float((exported - reference).abs().max()) <= tolerance

    # A second export to the same DIR without --force is refused and leaves the first intact.
    before = _digest(out / "model.safetensors")
    again = _export(tiny_qlora_run.root, "--out", out)
    assert again.exit_code == 2 and "exists" in again.output and "--force" in again.output
    assert _digest(out / "model.safetensors") == before
    assert (out / "README.md").is_file()


def test_lora_export_dtype_force_and_model_card(tiny_lora_run, copy_run, tmp_path):
    run = copy_run(tiny_lora_run)
    (run.root / "eval.json").write_text(json.dumps({"accuracy": 0.9731, "nll": 7.0, "num_pairs": 125,
                                                    "base": {"accuracy": 0.4123, "nll": 7.5, "num_pairs": 125}}))
    out = tmp_path / "merged"
    first = _export(run.root, "--out", out, "--dtype", "fp32")
    assert first.exit_code == 0, first.output
    card = (out / "README.md").read_text()
    for text in ("builtin:tiny-llama", "lora", "0.9731", "0.4123", "name: tiny-lora", "from_pretrained"):
        assert text in card, text
    fp32_digest = _digest(out / "model.safetensors")

    second = _export(run.root, "--out", out, "--dtype", "bf16", "--force")  # --force replaces it
    assert second.exit_code == 0, second.output
    diff, tolerance = _verified(second.output)
    assert 0 < diff <= tolerance < 1e-3  # the merge is checked in fp32, whatever the dtype
    assert "load back as the merge rounded to bf16 (max |Δlogit| = 0)" in second.output
    rounding = re.search(r"rounding to bf16: max \|Δlogit\| (\S+), RMS (\S+)", second.output)
    assert rounding and float(rounding.group(1)) > 100 * diff  # bf16's rounding shows, reported apart
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert _digest(out / "model.safetensors") != fp32_digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_full_finetune_export_saves_the_model(tiny_full_run, tmp_path):
    run = tiny_full_run
    out = tmp_path / "full"
    result = _export(run.root, "--out", out)
    assert result.exit_code == 0, result.output
    diff, tolerance = _verified(result.output)
    assert diff <= tolerance
    from safetensors.torch import load_file

    trained = load_file(str(next(run.adapter.glob("*.safetensors"))))
    exported = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(exported[name], trained[name])



def test_full_fine_tuning_and_no_adapter_are_two_things(tiny_full_run, tiny_lora_run, tmp_path):
    """A full fine-tuning run loads with FullAdapter (the base's own weights train, and export says so); its
    merged export loads with NoAdapter, which only runs forward passes: no attach, save, load or merge."""
    from orpo_cli.adapters import NoAdapter
    from orpo_cli.adapters.full import FullAdapter
    from orpo_cli.models.tuned import load_merged, load_run

    out = tmp_path / "full"
    result = _export(tiny_full_run.root, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"export: loading the fully fine-tuned weights of {tiny_full_run.root}" in result.output
    assert "(full fine-tuning: every weight trained)" in (out / "README.md").read_text()
    trained = load_run(tiny_full_run).adapter
    assert isinstance(trained, FullAdapter) and trained.trains_base and trained.name == "full"
    plain = load_merged(out).adapter
    assert isinstance(plain, NoAdapter) and not isinstance(plain, FullAdapter)
    assert not any(hasattr(plain, name) for name in ("attach", "save", "load", "merge", "trains_base"))
    # An adapter beside the base is merged into it, and named as the recipe names it.
    lora = tmp_path / "lora"
    result = _export(tiny_lora_run.root, "--out", lora)
    assert result.exit_code == 0, result.output
    assert "in full precision (fp32) to merge the lora adapter into it" in result.output
    assert "fully fine-tuned" not in result.output
    card = (lora / "README.md").read_text()
    assert "merged into the weights" in card and "full fine-tuning" not in card


# ------------------------------------------------------------------------------------------ bundles
def test_reft_export_is_a_bundle(tiny_reft_run, tmp_path):
    out = tmp_path / "bundle"
    result = _export(tiny_reft_run.root, "--out", out)
    assert result.exit_code == 0, result.output
    assert "cannot be merged" in result.output and "orpo-tune generate" in result.output
    diff, tolerance = _verified(result.output)
    assert diff <= tolerance
    manifest = json.loads((out / "orpo-bundle.json").read_text())
    assert manifest["adapter"] == "reft" and manifest["base_copied"] is True
    for name in ("adapter/reft_config.json", "adapter/reft_adapter.safetensors", "tokenizer/tokenizer.json",
                 "orpo-tune-recipe.yaml", "base/config.json", "base/model.safetensors", "README.md"):
        assert (out / name).is_file(), name


class _UnmergeableLora:
    """LoRA posing as an adapter that cannot be merged: the bundle path must only use the Adapter interface."""

    mergeable = False

    def __init__(self, settings):
        from orpo_cli.adapters.lora import LoraAdapter

        self._inner = LoraAdapter(settings)

    def __getattr__(self, name):
        if name == "merge":
            raise AssertionError("merge called on a non-mergeable adapter")
        return getattr(self._inner, name)


def test_bundle_path_is_generic_over_the_adapter_interface(tiny_lora_run, tmp_path, monkeypatch):
    import orpo_cli.adapters as adapters

    real = adapters.build_adapter
    monkeypatch.setattr(adapters, "build_adapter", lambda s: _UnmergeableLora(s) if s.kind == "lora" else real(s))
    out = tmp_path / "bundle"
    result = _export(tiny_lora_run.root, "--out", out, "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert "--dtype bf16 is ignored for a bundle" in result.output
    assert (out / "orpo-bundle.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    diff, tolerance = _verified(result.output)
    assert diff <= tolerance
    answer = runner.invoke(app, ["generate", str(out), "--prompt", "What colour is the sky?", "--max-new-tokens", "5"])
    assert answer.exit_code == 0, answer.output


# ------------------------------------------------------------------------------------------ atomicity
def test_killed_export_leaves_no_directory(tiny_lora_run, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, PAUSE_ENV: "300"}  # export waits inside its temporary directory
    proc = subprocess.Popen([sys.executable, "-m", "orpo_cli", "export", str(tiny_lora_run.root), "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob(".killed.tmp-*/model.safetensors")):
            assert proc.poll() is None, "export exited before it was killed"
            assert time.monotonic() < deadline, "export never started writing"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert list(tmp_path.glob(".killed.tmp-*"))  # the half-written temporary, hidden

    # The next export goes through and clears the dead process's temporary.
    result = _export(tiny_lora_run.root, "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".killed.tmp-*"))


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{run}", "--out", "{tmp}/x", "--dtype", "fp64"], "--dtype: 'fp64' is not one of"),
        (["{tmp}", "--out", "{tmp}/x"], "not a run directory"),
        (["{run}", "--out", "{run}", "--force"], "would replace the run directory"),
        (["{run}", "--out", "{parent}", "--force"], "would replace the run directory"),
    ],
)
def test_user_errors_are_one_line_exit_2(tiny_lora_run, tmp_path, args, message):
    fill = {"run": tiny_lora_run.root, "tmp": tmp_path, "parent": tiny_lora_run.root.parent}
    result = _export(*[a.format(**fill) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert tiny_lora_run.recipe.is_file()


def test_model_card_header_names_the_hub_base_license_and_dataset():
    """Every export's README.md starts with the hub's metadata: the published base and its license for the
    packaged built-in, a hub dataset by id, nothing invented for the tiny built-ins and local data."""
    from orpo_cli.export import hub_header
    from orpo_cli.recipe_loading import load_recipe

    root = Path(__file__).parents[1] / "recipes"
    real = load_recipe(root / "smollm2-demo.yaml", ["data.train.path=trl-lib/ultrafeedback_binarized"])
    assert hub_header(real, library="gguf") == (
        "---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: gguf\ntags: [orpo, orpo-tune, gguf]\n"
        "license: apache-2.0\ndatasets: [trl-lib/ultrafeedback_binarized]\n---\n\n")
    tiny = load_recipe(root / "tiny-lora.yaml", [])
    assert hub_header(tiny, library="transformers") == "---\nlibrary_name: transformers\ntags: [orpo, orpo-tune]\n---\n\n"
