"""orpo_cli.rundir and run_lock: the --resume / --force rules, checked before anything is written, both ways; the
lock that lets one process at a time write a run; records that hold each step once."""

import os
import subprocess
import sys

import pytest

from orpo_cli.errors import UserError
from orpo_cli.run_lock import LOCK_NAME, _created, acquire, read_holder, release, writing_run
from orpo_cli.rundir import RunDir, run_below, run_holding


def _run(tmp_path, *, files=(), recipe=False) -> RunDir:
    run = RunDir(tmp_path / "run")
    if files or recipe:
        run.root.mkdir()
    for name in files:
        (run.root / name).write_text("x")
    if recipe:
        run.recipe.write_text("name: r\n")
    return run


@pytest.mark.parametrize(
    ("files", "recipe", "resume", "force", "error"),
    [
        ((), False, True, True, "--resume and --force contradict each other: pick one"),
        (("x",), False, False, False, "exists and is not empty; pass --resume to continue it"),
        (("x",), False, True, False, "holds no run to resume (no recipe.yaml); drop --resume"),
        ((), False, True, False, "holds no run to resume (no recipe.yaml); drop --resume"),
    ],
)
def test_check_refuses_and_touches_nothing(tmp_path, files, recipe, resume, force, error):
    run = _run(tmp_path, files=files, recipe=recipe)
    before = sorted(p.name for p in run.root.iterdir()) if run.root.exists() else None
    with pytest.raises(UserError, match=error.replace("(", r"\(").replace(")", r"\)")):
        run.check(resume=resume, force=force)
    with pytest.raises(UserError):
        run.prepare(resume=resume, force=force)
    assert (sorted(p.name for p in run.root.iterdir()) if run.root.exists() else None) == before


@pytest.mark.parametrize(
    ("files", "recipe", "resume", "force", "kept"),
    [
        ((), False, False, False, []),  # a new run
        (("x",), False, False, True, []),  # --force empties it
        (("x",), True, True, False, ["checkpoints", "recipe.yaml", "x"]),  # --resume keeps it
    ],
)
def test_check_allows_and_prepare_applies(tmp_path, files, recipe, resume, force, kept):
    run = _run(tmp_path, files=files, recipe=recipe)
    if resume:
        run.checkpoint(1).mkdir(parents=True)
        (run.checkpoint(1) / "manifest.json").write_text("{}")
    run.check(resume=resume, force=force)
    run.prepare(resume=resume, force=force)
    assert sorted(p.name for p in run.root.iterdir()) == kept


# ------------------------------------------------------------------------------------------- the lock
def _lock(run: RunDir, **fields) -> None:
    import json
    import socket

    record = {"pid": os.getpid(), "host": socket.gethostname(), "verb": "train", "started": 0.0, **fields}
    run.root.mkdir(parents=True, exist_ok=True)
    (run.root / LOCK_NAME).write_text(json.dumps(record))


def test_a_live_holder_is_named_and_a_dead_or_reused_pid_is_stale(tmp_path):
    run = _run(tmp_path, recipe=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(run, pid=sleeper.pid, verb="eval", pid_created=_created(sleeper.pid))
        with pytest.raises(UserError, match=rf"in use by `orpo-tune eval` \(pid {sleeper.pid} on "):
            acquire(run.root, "plot")
        _lock(run, pid=sleeper.pid, pid_created=_created(sleeper.pid) - 3600)  # the pid now names another process
        mine = acquire(run.root, "plot")
        assert mine is not None and read_holder(run.root / LOCK_NAME)["pid"] == os.getpid()
        release(run.root, mine)
        assert not (run.root / LOCK_NAME).exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    _lock(run, pid=sleeper.pid)  # gone (killed and reaped): stale
    with writing_run(run.root, "eval"):
        assert read_holder(run.root / LOCK_NAME)["verb"] == "eval"
    assert not (run.root / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_refused_naming_the_file(tmp_path):
    run = _run(tmp_path, recipe=True)
    _lock(run, pid=12345, host="gpu-node-7")
    with pytest.raises(UserError, match=rf"pid 12345 on gpu-node-7.*delete {run.root / LOCK_NAME}"):
        acquire(run.root, "train")


def test_the_directory_a_refused_writer_created_is_removed_and_force_keeps_the_lock(tmp_path):
    run = RunDir(tmp_path / "new" / "run")
    with pytest.raises(UserError), writing_run(run.root, "train"):
        run.check(resume=True, force=False)
    assert not (tmp_path / "new").exists()
    with writing_run(run.root, "train"):
        (run.root / "x").write_text("old")
        assert run.holds_anything()
        run.prepare(resume=False, force=True)  # --force replaces the run, not its writer's lock
        assert sorted(p.name for p in run.root.iterdir()) == [LOCK_NAME]
        assert not run.holds_anything()
    assert not (tmp_path / "new").exists()  # emptied by --force, and the directories it created go with the lock


# ------------------------------------------------------------------------------------ metrics records
def test_metrics_keep_each_step_once_and_drop_a_line_cut_short(tmp_path):
    run = _run(tmp_path, recipe=True)
    lines = [
        '{"step": 0, "eval_loss": 1.0}', '{"step": 1, "loss": 9.0}', '{"step": 2, "loss": 9.0}',
        '{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 2.0}', '{"step": 2, "eval_loss": 2.0}',
        '{"step": 3, "loss": 3.0}', '{"step": 4, "lo',
    ]
    run.metrics.write_text("\n".join(lines))
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2, 1, 2, 2, 3]  # the cut line is no record
    run.truncate_metrics(2)
    assert run.read_metrics() == [
        {"step": 0, "eval_loss": 1.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
        {"step": 2, "eval_loss": 2.0},
    ]


def test_resume_needs_a_checkpoint_that_got_to_its_manifest(tmp_path):
    run = _run(tmp_path, recipe=True)
    (run.checkpoint(2)).mkdir(parents=True)
    with pytest.raises(UserError, match="no complete checkpoint.*--force"):
        run.check(resume=True, force=False)
    (run.checkpoint(2) / "manifest.json").write_text("{}")
    run.check(resume=True, force=False)


@pytest.mark.parametrize(
    ("inside", "found"),
    [("run", "run"), ("run/adapter", "run"), ("run/checkpoints/step-2/x", "run"), ("elsewhere/x", None)],
)
def test_run_holding_finds_the_run_a_path_is_in(tmp_path, inside, found):
    run = _run(tmp_path, recipe=True)
    run.metrics.write_text("")
    (tmp_path / "elsewhere").mkdir()
    assert run_holding(tmp_path / inside) == (tmp_path / found if found else None)
    assert run_below(tmp_path) == run.root and run_below(tmp_path / "elsewhere") is None
