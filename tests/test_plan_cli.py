"""`orpo-tune plan` and train's plan check: the report offline, one JSON object, bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orpo_cli.cli import app
from orpo_cli.errors import UserError
from orpo_cli.plan.adapter_terms import LoraTerms
from orpo_cli.plan.gpus import GPUS, find_gpu
from orpo_cli.plan.memory import nf4_bytes
from orpo_cli.plan.report import SHIPPED_CONFIGS, model_config, shipped_config
from orpo_cli.plan.shapes import ModelShape, PairLengths, StepSetup
from orpo_cli.plan.step import levers, plan_step, verdict
from orpo_cli.plan.units import GIB, parse_memory

ROOT = Path(__file__).parents[1]
MISTRAL = ROOT / "recipes" / "mistral-7b-qlora-ultrafeedback.yaml"
runner = CliRunner()


def test_mistral_recipe_is_planned_offline_with_breakdown_and_verdict():
    result = runner.invoke(app, ["plan", str(MISTRAL), "--gpu-memory", "24GiB"])
    assert result.exit_code == 0, result.output
    out = result.output
    for words in ("shipped config", "4-bit linear weights (NF4 codes)", "4-bit constants", "optimizer state",
                  "layer inputs (32 checkpointed layers)", "training step peak", "eval pass peak", "verdict: fits"):
        assert words in out, words
    data = json.loads(runner.invoke(app, ["plan", str(MISTRAL), "--gpu-memory", "24GiB", "--json"]).output)
    assert data["verdict"] == "fits" and data["memory_bytes"] == 24 * GIB
    # the table and the JSON carry the same figures
    rank = data["per_rank"]
    assert f"{rank['train_peak'] / GIB:.3f}" in out
    assert f"{rank['weights']['4-bit linear weights (NF4 codes)'] / GIB:.3f}" in out
    # Mistral-7B's 4-bit linear weights: 6.98B weights x 0.5 B, and the fp32 rest (docs/qlora-memory.md section 1)
    assert abs(rank["weights"]["4-bit linear weights (NF4 codes)"] - 6_979_321_856 // 2) == 0
    assert data["parameters"] == 7_241_732_096


def test_plan_json_is_one_object_with_time_for_a_named_gpu():
    result = runner.invoke(app, ["plan", str(MISTRAL), "--gpu", "A100-80GB", "--pairs", "60000", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)  # one object: json.loads would refuse two
    assert data["gpu"]["name"] == "A100-80GB" and data["steps"] == 7500
    expected = data["flops_per_optimizer_step"] / (0.35 * 312e12)
    assert data["seconds_per_step"] == pytest.approx(expected)
    assert data["run_seconds"] == pytest.approx(expected * 7500)


def test_a_recipe_that_does_not_fit_gets_levers_that_fit():
    result = runner.invoke(app, ["plan", str(MISTRAL), "--gpu-memory", "24GiB", "--json",
                                 "--set", "train.gradient_checkpointing=false", "--set", "train.micro_batch_size=8"])
    data = json.loads(result.output)
    assert data["verdict"] == "does not fit"
    assert data["levers"][0]["change"] == "train.gradient_checkpointing: true"
    assert data["levers"][-1]["peak"] <= 0.9 * 24 * GIB
    assert all(a["peak"] > 0.9 * 24 * GIB for a in data["levers"][:-1])  # stops at the first that fits


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--gpu", "GTX-9999"], "unknown GPU"),
        (["--gpu-memory", "24 bananas"], "--gpu-memory"),
        (["--gpu-memory", "-3GiB"], "--gpu-memory"),
        (["--mfu", "1.5"], "--mfu"),
        (["--set", "model.name_or_path=someone/not-shipped-model"], "Hugging Face hub"),
        (["--set", "model.name_or_path=/nowhere/model"], "no such model directory"),
    ],
)
def test_plan_bad_input_is_one_line_exit_2(args, words):
    result = runner.invoke(app, ["plan", str(MISTRAL), *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.output


def test_parse_memory_and_gpus():
    assert parse_memory("24GiB") == 24 * 2**30
    assert parse_memory("80 GB") == 80 * 10**9
    assert parse_memory("16000MiB") == 16000 * 2**20
    for bad in ("24", "GiB", "24 GiBs", ""):
        with pytest.raises(UserError):
            parse_memory(bad)
    assert find_gpu("rtx-4090").memory_bytes == 24 * GIB
    assert all(g.bf16_flops > 1e13 and g.source for g in GPUS.values())


def test_verdicts():
    assert verdict(90, 100) == "fits"
    assert verdict(95, 100) == "tight"
    assert verdict(100, 100) == "tight"
    assert verdict(101, 100) == "does not fit"


def test_nf4_constants_are_bitsandbytes_layout():
    # 4,096 x 4,096: 262,144 blocks of 64 -> uint8 absmax, 1,024 nested fp32 scales, two code tables, an offset
    codes, constants = nf4_bytes(4096 * 4096, double_quant=True)
    assert codes == 4096 * 4096 // 2
    assert constants == 262_144 + 4 * 1024 + 1024 + 4 + 64
    assert nf4_bytes(4096 * 4096, double_quant=False)[1] == 4 * 262_144 + 64


def test_shipped_configs_are_the_models_the_docs_name():
    counts = {file: ModelShape.from_config(shipped_config(file)).num_parameters for file in set(SHIPPED_CONFIGS.values())}
    assert round(counts["Mistral-7B-v0.1.json"] / 1e9, 2) == 7.24
    assert round(counts["Meta-Llama-3-8B.json"] / 1e9, 2) == 8.03
    assert round(counts["Qwen2-1.5B.json"] / 1e9, 2) == 1.54
    assert round(counts["SmolLM2-135M-Instruct.json"] / 1e6) == 135
    config, source = model_config("Qwen/Qwen2-1.5B-Instruct")
    assert "shipped" in source and config["hidden_size"] == 1536


def test_levers_follow_the_issue_order_and_empty_when_it_fits():
    shape = ModelShape.from_config(shipped_config("Mistral-7B-v0.1.json"))
    setup = StepSetup(pairs=(PairLengths(1, 2047, 2047),) * 4, quantization="none", adapter=LoraTerms(),
                      optimizer="adamw", gradient_accumulation=2)
    assert plan_step(shape, setup).peak > 24 * GIB

    def changes(memory_gib: float) -> list[str]:
        found = levers(shape, setup, int(memory_gib * GIB), 2048, 512)
        assert not found or found[-1].peak <= 0.9 * memory_gib * GIB
        return [lever.change.split(":")[0] for lever in found]

    gc, micro, length = "train.gradient_checkpointing", "train.micro_batch_size", "orpo.max_length"
    assert changes(24) == [gc, micro]
    assert changes(19) == [gc, micro, micro, length]  # a shorter max_length only where it finishes the job
    assert changes(16) == [gc, micro, micro, "train.optimizer", "quantization.mode"]
    assert changes(5) == [gc, micro, micro, "train.optimizer", "quantization.mode", "distributed.strategy"]
    assert changes(10_000) == []


@pytest.mark.parametrize(
    ("overrides", "recompute"),
    [
        (["train.gradient_checkpointing=false"], True),
        (["train.gradient_checkpointing=true"], False),
        (["train.gradient_checkpointing=false", "distributed.strategy=ddp"], True),
        (["train.gradient_checkpointing=false", "distributed.strategy=fsdp"], False),
        (["train.gradient_checkpointing=false", "distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=3"],
         False),
        (["train.gradient_checkpointing=false", "distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"],
         True),
    ],
)
def test_the_plan_recomputes_where_training_does(overrides, recompute):
    """The recomputation is one of the speed paths verified on a CPU only (orpo_cli/kernels): on a CPU training
    recomputes norms and MLP activations unless whole layers are checkpointed, the strategy shards the weights (FSDP,
    ZeRO-3) or train.speed_paths is off; a CUDA run never does. The recipe's plan says the same, and the table
    says which."""
    from orpo_cli.plan.report import step_setup
    from orpo_cli.recipe_loading import load_recipe

    recipe = load_recipe(MISTRAL, overrides)
    shape = ModelShape.from_config(shipped_config("Mistral-7B-v0.1.json"))
    assert step_setup(recipe, shape, cuda=False, world_size=2).recompute is recompute
    assert step_setup(recipe, shape, cuda=True, world_size=2).recompute is False
    off = load_recipe(MISTRAL, [*overrides, "train.speed_paths=off"])
    assert step_setup(off, shape, cuda=False, world_size=2).recompute is False
    result = runner.invoke(app, ["plan", str(MISTRAL), "--nproc", "2", *(a for o in overrides for a in ("--set", o))])
    assert result.exit_code == 0, result.output
    assert "norms and MLP activations recomputed off" in result.output  # the plan of a GPU step


@pytest.mark.parametrize(
    "changes",
    [{"gradient_checkpointing": True}, {"strategy": "fsdp", "world_size": 2},
     {"strategy": "deepspeed", "zero_stage": 3, "world_size": 2}],
)
def test_a_setup_cannot_recompute_where_training_does_not(changes):
    pairs = (PairLengths(1, 63, 63),)
    with pytest.raises(ValueError, match="recompute=False"):
        StepSetup(pairs=pairs, **changes)
    assert not StepSetup(pairs=pairs, recompute=False, **changes).recompute
    assert StepSetup(pairs=pairs, strategy="deepspeed", zero_stage=2, world_size=2).recompute  # ZeRO-2: whole weights


def test_train_on_cpu_reports_the_plan_in_one_line(tmp_path):
    import torch

    from orpo_cli.plan.report import check_before_training
    from orpo_cli.recipe_loading import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name_or_path: builtin:micro-llama}\ndata: {train: builtin:demo}\n"
                      "orpo: {max_length: 64, max_prompt_length: 32}\ntrain: {max_steps: 1, tensorboard: false}\n")
    lines: list[str] = []
    check_before_training(load_recipe(recipe), world_size=1, device=torch.device("cpu"), echo=lines.append)
    assert len(lines) == 1 and lines[0].startswith("plan: predicted peak") and "CPU" in lines[0]
    # through `train`: the line is there, and --no-plan-check leaves it out
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(out), "--set", "model.device=cpu",
                                 "--set", "train.eval_every=null", "--set", "data.eval_ratio=0"])
    assert result.exit_code == 0, result.output
    assert sum(line.startswith("plan: predicted peak") for line in result.output.splitlines()) == 1
    result = runner.invoke(app, ["train", str(recipe), "--output-dir", str(out), "--force", "--no-plan-check",
                                 "--set", "model.device=cpu", "--set", "train.eval_every=null",
                                 "--set", "data.eval_ratio=0"])
    assert result.exit_code == 0 and "plan: predicted peak" not in result.output, result.output


def test_train_on_cuda_refuses_a_recipe_far_over_free_memory(monkeypatch):
    """The CUDA branch with the device's answer faked: 2 GiB free refuses the Mistral QLoRA recipe, 40 GiB passes."""
    import torch

    from orpo_cli.plan.report import check_before_training
    from orpo_cli.recipe_loading import load_recipe

    recipe = load_recipe(MISTRAL)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GIB, 24 * GIB))
    with pytest.raises(UserError, match="predicted to need .* levers, in order: .*--no-plan-check"):
        check_before_training(recipe, world_size=1, device=cuda, echo=print)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GIB, 48 * GIB))
    lines: list[str] = []
    check_before_training(recipe, world_size=1, device=cuda, echo=lines.append)
    assert len(lines) == 1 and "40.00 GiB free" in lines[0]


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_is_planned_offline(recipe):
    result = runner.invoke(app, ["plan", str(recipe), "--gpu", "A100-80GB", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rank = data["per_rank"]
    assert data["verdict"] in ("fits", "tight", "does not fit")
    assert rank["train_peak"] == rank["weight_bytes"] + rank["trainable"] + rank["gradients"] + rank["optimizer"] + (
        rank["activation_bytes"] + max(rank["head_transient"], rank["recompute"] + rank["backward"]) + rank["mask"]
        + sum(rank["cuda"].values())
    )
    assert data["seconds_per_step"] > 0
