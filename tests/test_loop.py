"""The training loop: deterministic data order, exact resume, run-directory rules."""

from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from orpo_cli.cli import app
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.recipe import TrainSettings
from orpo_cli.rundir import RunDir
from orpo_cli.training.batching import micro_batches
from orpo_cli.training.loop import plan_steps

runner = CliRunner()

# A micro model on a slice of the demo set: a few seconds per run.
MICRO = [
    "model.name_or_path=builtin:micro-llama",
    "data.train.max_rows=96",
    "orpo.max_length=64",
    "orpo.max_prompt_length=32",
    "train.micro_batch_size=4",
    "train.gradient_accumulation=2",
    "train.scheduler=constant",
    "train.warmup_steps=0",
    "train.lr=1e-3",
    "train.log_every=1",
    "train.eval_every=3",
    "train.save_every=3",
    "train.tensorboard=false",
    "adapter.dropout=0.1",  # dropout makes the RNG state part of what must be restored
]
RECIPE = Path(__file__).parents[1] / "recipes" / "tiny-lora.yaml"


def _train(out: Path, *extra: str):
    args = ["train", str(RECIPE), "--output-dir", str(out)]
    for item in MICRO:
        args += ["--set", item]
    result = runner.invoke(app, args + list(extra))
    assert result.exit_code == 0, result.output
    return result


def _pairs(n: int) -> list[TokenizedPair]:
    return [TokenizedPair([i], [i + 1], [i + 2]) for i in range(n)]


def test_plan_steps_counts_epochs_and_accumulation():
    train = TrainSettings(micro_batch_size=4, gradient_accumulation=2, epochs=2)
    assert plan_steps(30, train) == (8, 8)
    assert plan_steps(30, TrainSettings(micro_batch_size=4, gradient_accumulation=2, max_steps=5)) == (8, 5)


def test_micro_batches_resume_at_any_index_and_reshuffle_each_epoch():
    pairs = _pairs(10)
    full = micro_batches(pairs, 3, seed=7, start=0)
    first = [next(full) for _ in range(12)]  # 4 per epoch: 3 epochs
    resumed = micro_batches(pairs, 3, seed=7, start=5)
    assert [next(resumed) for _ in range(7)] == first[5:]
    epoch0 = sorted(p.prompt_ids[0] for batch in first[:4] for p in batch)
    assert epoch0 == list(range(10))  # every pair once per epoch
    assert first[:4] != first[4:8]  # a new order each epoch


def test_micro_batches_shard_across_ranks_without_overlap():
    pairs = _pairs(12)
    ranks = [micro_batches(pairs, 2, seed=1, start=0, rank=r, world_size=3) for r in range(3)]
    seen = [p.prompt_ids[0] for _ in range(2) for it in ranks for p in next(it)]
    assert sorted(seen) == list(range(12))


def test_resume_after_a_checkpoint_is_bitwise_equal(tmp_path):
    _train(tmp_path / "straight", "--max-steps", "6")
    _train(tmp_path / "split", "--max-steps", "3")
    assert (tmp_path / "split/checkpoints/step-3/manifest.json").is_file()
    result = _train(tmp_path / "split", "--max-steps", "6", "--resume")
    assert "resumed from step-3" in result.output
    a = load_file(str(tmp_path / "straight/adapter/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split/adapter/adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].equal(b[key]), key
    straight = (tmp_path / "straight/metrics.jsonl").read_text().splitlines()
    split = (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    assert [line.split('"tokens_per_s"')[0] for line in straight] == [
        line.split('"tokens_per_s"')[0] for line in split
    ]


def test_run_directory_contents_and_metric_names(tmp_path):
    import json

    out = tmp_path / "run"
    _train(out, "--max-steps", "3")
    for name in (
        "recipe.yaml",
        "metrics.jsonl",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "tokenizer/tokenizer.json",
        "checkpoints/step-3/trainable.safetensors",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    assert evals[0]["step"] == 0  # before any update
    train = [r for r in records if "rewards/accuracies" in r]
    for key in (
        "loss",
        "nll_loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "log_odds_ratio",
        "log_odds_chosen",
        "lr",
        "tokens_per_s",
    ):
        assert key in train[-1], key
    assert [r["step"] for r in train] == [1, 2, 3]


def test_existing_run_directory_is_refused_without_resume_or_force(tmp_path):
    out = tmp_path / "run"
    _train(out, "--max-steps", "1")
    before = (out / "metrics.jsonl").read_text()
    args = ["train", str(RECIPE), "--output-dir", str(out)] + [a for s in MICRO for a in ("--set", s)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "metrics.jsonl").read_text() == before
    _train(out, "--max-steps", "1", "--force")


def test_resume_with_a_changed_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    _train(out, "--max-steps", "1")
    args = ["train", str(RECIPE), "--output-dir", str(out), "--resume"] + [
        a for s in MICRO for a in ("--set", s)
    ]
    result = runner.invoke(app, args + ["--set", "orpo.lambda=0.5"])
    assert result.exit_code == 2 and "orpo.lambda" in result.output


def test_resume_may_lower_the_learning_rate(tmp_path):
    """After a diverged run the remedy is a smaller step from the last good checkpoint: --resume takes a new
    train.lr, says so, records it, and every step after the checkpoint uses it."""
    import yaml

    out = tmp_path / "run"
    _train(out, "--max-steps", "3")
    result = _train(out, "--max-steps", "5", "--resume", "--set", "train.lr=2.5e-4", "--set", "train.max_grad_norm=0.5")
    assert "--resume: train.lr changes from 0.001 to 0.00025" in result.output
    assert "--resume: train.max_grad_norm changes from 1.0 to 0.5" in result.output
    lrs = {r["step"]: r["lr"] for r in RunDir(out).read_metrics() if "lr" in r}
    assert [lrs[s] for s in (1, 2, 3)] == [1e-3] * 3
    assert [lrs[s] for s in (4, 5)] == [2.5e-4] * 2  # constant schedule: the new lr from the first resumed step
    saved = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["lr"] == 2.5e-4


@pytest.mark.parametrize("option", [["--set", "model.device=cuda"]])
def test_cuda_without_gpu_is_a_clear_error(tmp_path, option):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = runner.invoke(app, ["train", str(RECIPE), "--output-dir", str(tmp_path / "r"), *option])
    assert result.exit_code == 2 and "no CUDA GPU" in result.output
    assert not (tmp_path / "r").exists()
