"""Shared fixtures: a private cache for the whole session, and tiny trained runs built once and reused.

The runs are real `orpo-tune train` runs (recipes/tiny-*.yaml through `start_run`), short and without
TensorBoard. They are shared by every test file: a test that writes into a run directory (eval.json,
samples.jsonl, a deleted adapter) should work on a copy from the `copy_run` fixture instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# One CPU thread per process, for this process and every subprocess a test starts (they inherit it): the
# built-in models are so small that OpenMP's thread handoffs cost more than the work, and under any other
# load on the machine (a 2-core CI runner, torchrun ranks, a second test process) two spinning threads per
# process make CPU tests ~10x slower. Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from orpo_cli.rundir import RunDir  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).parents[1]
RUN_STEPS = 40  # enough for the tiny demo to reach eval accuracy >= 0.9 (≈0.3 s a step on a CPU)
# Runs that only need a trained adapter: fewer steps, and a 24-pair eval split (evaluated at both ends).
_SHORT = ("train.max_steps=10", "train.eval_every=10", "train.save_every=10", "data.eval_ratio=0.02")


@pytest.fixture(scope="session", autouse=True)
def orpo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ORPO_TUNE_CACHE (built-in models, prepared data) in a session temporary directory, never ~/.cache.

    Subprocesses started by tests inherit it through the environment.
    """
    cache = tmp_path_factory.mktemp("orpo-tune-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ORPO_TUNE_CACHE", str(cache))
        yield cache


def train_tiny_run(out: Path, recipe: str, *overrides: str) -> RunDir:
    """Train recipes/`recipe` into `out`: RUN_STEPS steps, evaluated at step 0 and at the end, no TensorBoard."""
    from orpo_cli.recipe_loading import load_recipe
    from orpo_cli.training.setup import start_run

    settings = [
        f"train.max_steps={RUN_STEPS}",
        f"train.eval_every={RUN_STEPS}",
        f"train.save_every={RUN_STEPS}",
        "train.tensorboard=false",
        f"output_dir={out}",
        *overrides,
    ]
    return start_run(load_recipe(ROOT / "recipes" / recipe, settings), resume=False, force=False)


def _copy_run(run: RunDir, dest: Path) -> RunDir:
    target = Path(dest) / run.root.name
    shutil.copytree(run.root, target, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    return RunDir(target)


@pytest.fixture
def copy_run(tmp_path: Path):
    """`copy_run(run)`: a private copy (without checkpoints) of a shared run, in this test's tmp_path."""
    return lambda run: _copy_run(run, tmp_path)


@pytest.fixture(scope="session")
def tiny_lora_run(tmp_path_factory: pytest.TempPathFactory, orpo_cache: Path) -> RunDir:
    """recipes/tiny-lora.yaml trained for RUN_STEPS steps: eval accuracy >= 0.9, base near chance."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny-lora") / "run", "tiny-lora.yaml")


@pytest.fixture(scope="session")
def tiny_qlora_run(tmp_path_factory: pytest.TempPathFactory, orpo_cache: Path) -> RunDir:
    """recipes/tiny-qlora.yaml (LoRA on a 4-bit NF4 base), 10 steps, a 2% eval split (4-bit is slow on a CPU)."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny-qlora") / "run", "tiny-qlora.yaml", *_SHORT)


@pytest.fixture(scope="session")
def tiny_reft_run(tmp_path_factory: pytest.TempPathFactory, orpo_cache: Path) -> RunDir:
    """recipes/tiny-reft.yaml, 10 steps (enough to move the interventions off their init), a 2% eval split."""
    return train_tiny_run(tmp_path_factory.mktemp("tiny-reft") / "run", "tiny-reft.yaml", *_SHORT)


@pytest.fixture(scope="session")
def tiny_full_run(tmp_path_factory: pytest.TempPathFactory, orpo_cache: Path) -> RunDir:
    """recipes/tiny-lora.yaml with `adapter: {kind: full}` (full fine-tuning), 3 steps, a 2% eval split."""
    return train_tiny_run(
        tmp_path_factory.mktemp("tiny-full") / "run",
        "tiny-lora.yaml",
        "adapter={kind: full}",
        "train.lr=1e-3",
        *_SHORT,
        "train.max_steps=3",
        "train.eval_every=3",
        "train.save_every=3",
    )


# ------------------------------------------------------------------------------------------ the real model
SMOLLM2 = "builtin:smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir(orpo_cache: Path) -> Path:
    """builtin:smollm2-135m-instruct built (once per session) into the session cache; skipped without the
    package that carries its GGUF file."""
    from orpo_cli.errors import UserError
    from orpo_cli.models.builtin import materialize_builtin

    try:
        return materialize_builtin(SMOLLM2.removeprefix("builtin:"))
    except UserError as err:
        pytest.skip(f"the real model is not available: {err}")


@pytest.fixture
def smollm2_four_layers(smollm2_dir: Path) -> torch.nn.Module:
    """The real SmolLM2-135M's first four layers (the real weights' numerics, in seconds) with LoRA r=8 on every
    linear layer (random, seeded, non-zero B), fp32 and sdpa: a fresh model per test."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32, attn_implementation="sdpa")
    base.config.num_hidden_layers = 4
    base.model.layers = base.model.layers[:4]
    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))


@pytest.fixture(scope="session")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> RunDir:
    """recipes/smollm2-demo.yaml for a few steps, on builtin:short-answers (a preference of style the instruct model
    starts out against: the bare answer over a chatty one), evaluated at step 0 and at the end on the ~14 held-out
    pairs."""
    return train_tiny_run(
        tmp_path_factory.mktemp("smollm2") / "run",
        "smollm2-demo.yaml",
        "data.train.path=builtin:short-answers",
        "data.columns.answer=null",
        "orpo.lambda=0.1",
        "train.max_steps=6",
        "train.eval_every=6",
        "train.save_every=6",
        "train.lr=1e-3",  # the demo's 2e-4 needs ~15 steps to turn; 1e-3 turns it in 6
        "data.train.max_rows=240",
        "data.eval_ratio=0.05",
    )


@pytest.fixture(scope="session")
def smollm2_reft_run(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> RunDir:
    """recipes/smollm2-demo.yaml with LoReFT instead of LoRA, one step, evaluated at step 0 and after it."""
    return train_tiny_run(
        tmp_path_factory.mktemp("smollm2-reft") / "run",
        "smollm2-demo.yaml",
        "adapter={kind: reft, layers: [3, 15, 27], positions: f2+l2, rank: 4}",
        "train.max_steps=1",
        "train.eval_every=1",
        "train.save_every=1",
        "train.lr=1e-2",
        "data.train.max_rows=80",
        "data.eval_ratio=0.1",
    )
