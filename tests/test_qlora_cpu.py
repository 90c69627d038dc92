"""4-bit (QLoRA) on a CPU: gradients stay right after eval passes, and odd layer widths run end to end.

bitsandbytes (0.49+) on an AVX512-BF16 CPU repacks a 4-bit weight into an inference-only layout the first
time the layer runs in eval mode without grad; training after that reads the packed bytes as NF4 and the
gradients through those matmuls are wrong, and widths that are not a multiple of 32 crash the repacking.
models.loading.keep_4bit_weights_unpacked keeps the standard layout; these tests hold it to that.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from orpo_cli.adapters.lora import LoraAdapter
from orpo_cli.cli import app
from orpo_cli.models.builtin import materialize_builtin
from orpo_cli.models.loading import keep_4bit_weights_unpacked, load_model
from orpo_cli.recipe import LoraSettings, ModelSettings, QuantizationSettings

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

ROOT = Path(__file__).parents[1]
runner = CliRunner()
CPU = torch.device("cpu")
NF4 = QuantizationSettings(mode="4bit", quant_type="nf4", double_quant=True)


def _lora_grads_after_eval(model_dir: str, *, eval_passes: int, keep_unpacked: bool = True, tokens: int = 24) -> dict:
    """LoRA gradients of one training step on a 4-bit model, after `eval_passes` eval-mode forwards, and
    the same step on the same model with every 4-bit weight dequantized into an fp32 nn.Linear."""
    settings = ModelSettings(name_or_path=model_dir)
    quantized = load_model(settings, NF4, CPU, torch.float32)
    if not keep_unpacked:  # what bitsandbytes does on its own: the test must see the difference
        for module in quantized.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = True
    reference = load_model(settings, QuantizationSettings(mode="none"), CPU, torch.float32)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            dense = reference.get_submodule(name)
            w = module.weight
            dense.weight.data = bnb.functional.dequantize_4bit(w.data, w.quant_state).to(torch.float32)

    lora = LoraSettings(kind="lora", r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    models = {}
    for key, base in (("4bit", quantized), ("fp32", reference)):
        torch.manual_seed(0)
        peft_model = LoraAdapter(lora).attach(base, quantized=key == "4bit", gradient_checkpointing=False)
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:  # B starts at zero, which would make every lora_A gradient zero
                torch.manual_seed(hash(pname) % 2**31)
                p.data.normal_(0, 0.05)
        models[key] = peft_model

    torch.manual_seed(1)
    ids = torch.randint(3, 400, (2, tokens))
    grads = {}
    for key, model in models.items():
        model.eval()
        with torch.no_grad():
            for _ in range(eval_passes if key == "4bit" else 0):
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads[key] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads


def _max_relative_error(grads: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, ref in grads["fp32"].items():
        got = grads["4bit"][name]
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
        if err > worst:
            worst, where = err, name
    return worst, where


@pytest.mark.parametrize("eval_passes", [0, 1, 3])
def test_4bit_lora_gradients_equal_dequantized_fp32_after_eval_passes(eval_passes, orpo_cache):
    grads = _lora_grads_after_eval(str(materialize_builtin("tiny-llama")), eval_passes=eval_passes)
    assert grads["4bit"].keys() == grads["fp32"].keys() and len(grads["fp32"]) == 4 * 7 * 2
    worst, where = _max_relative_error(grads)
    assert worst < 1e-4, f"{where}: relative gradient error {worst:.3g}"


@pytest.mark.real
@pytest.mark.slow
def test_4bit_lora_gradients_on_the_real_model_after_an_eval_pass(smollm2_dir):
    """The same on SmolLM2-135M (30 layers, widths 576/192/1536, all multiples of 32: bitsandbytes would pack
    them): one eval pass, then a training step's LoRA gradients against the dequantized fp32 model."""
    grads = _lora_grads_after_eval(str(smollm2_dir), eval_passes=1, tokens=12)
    assert len(grads["fp32"]) == 30 * 7 * 2
    worst, where = _max_relative_error(grads)
    assert worst < 1e-4, f"{where}: relative gradient error {worst:.3g}"


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs"
)
def test_the_real_model_gradient_check_fails_when_bitsandbytes_repacks(smollm2_dir):
    grads = _lora_grads_after_eval(str(smollm2_dir), eval_passes=1, keep_unpacked=False, tokens=12)
    worst, _ = _max_relative_error(grads)
    assert worst > 0.1


@pytest.mark.skipif(
    not bnb.functional.has_avx512bf16(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs"
)
def test_the_gradient_check_fails_when_bitsandbytes_repacks(tmp_path, orpo_cache):
    """The check above can fail: with repacking allowed, the same comparison is far off (or crashes)."""
    model_dir = _odd_width_model(tmp_path, intermediate_size=384)  # 384 = 12 x 32 = 6 x 64: repacking accepts it
    grads = _lora_grads_after_eval(str(model_dir), eval_passes=1, keep_unpacked=False)
    worst, _ = _max_relative_error(grads)
    assert worst > 0.1


def test_keep_unpacked_counts_every_4bit_layer(orpo_cache):
    model = load_model(ModelSettings(name_or_path="builtin:micro-llama"), NF4, CPU, torch.float32)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert keep_4bit_weights_unpacked(torch.nn.Linear(2, 2)) == 0


def _odd_width_model(tmp_path: Path, intermediate_size: int) -> Path:
    """builtin:tiny-llama's tokenizer and shape with another MLP width, as a local model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = materialize_builtin("tiny-llama")
    out = tmp_path / f"llama-mlp{intermediate_size}"
    config = AutoConfig.from_pretrained(source)
    config.intermediate_size = intermediate_size
    torch.manual_seed(7)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith((".jinja", "special_tokens_map.json")):
            shutil.copyfile(f, out / f.name)
    return out


@pytest.mark.slow
def test_4bit_model_with_mlp_width_172_trains_evaluates_exports_generates(tmp_path, orpo_cache):
    model_dir = _odd_width_model(tmp_path, intermediate_size=172)  # llama2.c's stories widths; 172 % 32 != 0
    run = tmp_path / "run"
    train = runner.invoke(app, [
        "train", str(ROOT / "recipes" / "tiny-qlora.yaml"),
        "--set", f"model.name_or_path={model_dir}", "--set", f"output_dir={run}",
        "--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.save_every=4",
        "--set", "data.eval_ratio=0.02", "--set", "train.tensorboard=false",
    ])
    assert train.exit_code == 0, train.output
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval_" in line]
    assert len(evals) >= 2  # evaluated between training steps, then trained on

    result = runner.invoke(app, ["eval", str(run), "--json"])
    assert result.exit_code == 0, result.output
    assert 0.0 <= json.loads(result.stdout)["accuracy"] <= 1.0

    out = tmp_path / "merged"
    export = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert export.exit_code == 0, export.output
    assert re.search(r"max \|Δlogit\| = \S+ <= tolerance", export.output)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 172

    for target in (run, out):
        generated = runner.invoke(app, ["generate", str(target), "--prompt", "Hello", "--max-new-tokens", "4"])
        assert generated.exit_code == 0, generated.output
