"""The distributed strategy read once from accelerate (training/strategy.py): what the loop does under each."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from orpo_cli.errors import Interrupted, RunFailed
from orpo_cli.rundir import RunDir
from orpo_cli.training.checkpoint import latest_checkpoint
from orpo_cli.training.strategy import Strategy


def _accelerator(kind: DistributedType, zero_stage: int = 2) -> SimpleNamespace:
    """What Strategy reads of an Accelerator, for one process (no process group needed)."""
    return SimpleNamespace(
        distributed_type=kind, num_processes=1, process_index=0, is_main_process=True,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)),
        unwrap_model=lambda model: model, prepare=lambda *objs: objs, wait_for_everyone=lambda: None,
    )


@pytest.mark.parametrize(
    ("kind", "zero_stage", "shards", "resumable"),
    [
        (DistributedType.NO, 2, False, True),
        (DistributedType.MULTI_GPU, 2, False, True),
        (DistributedType.FSDP, 2, True, True),
        (DistributedType.DEEPSPEED, 2, False, False),
        (DistributedType.DEEPSPEED, 3, True, False),
    ],
)
def test_what_each_strategy_changes_is_decided_once(tmp_path, kind, zero_stage, shards, resumable):
    strategy = Strategy(_accelerator(kind, zero_stage))
    assert (strategy.shards_weights, strategy.resumable) == (shards, resumable)
    stop = strategy.stopped(3, RunDir(tmp_path / "run"))
    assert isinstance(stop, Interrupted if resumable else RunFailed)
    if not resumable:
        assert "deepspeed runs keep no checkpoint" in str(stop)


@pytest.mark.parametrize("kind", [DistributedType.NO, DistributedType.DEEPSPEED])
def test_a_checkpoint_is_written_and_restored_only_where_it_can_resume(tmp_path, kind):
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    strategy = Strategy(_accelerator(kind))
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    asked = []
    strategy.save_checkpoint(run, 1, model, optimizer, ["weight", "bias"],
                             lambda: asked.append(1) or {"x": torch.zeros(1)}, keep=2)
    found = latest_checkpoint(run)
    if not strategy.resumable:  # nothing written, and the loop's state (a collective) never gathered
        assert found is None and asked == []
        return
    assert found is not None and found[0] == 1 and asked == [1]
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    _, _, step, extra = strategy.prepare(fresh, fresh_optimizer, found[1], ["weight", "bias"])
    assert step == 1 and torch.equal(extra["x"], torch.zeros(1))
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
