"""orpo_cli.rundir: the --resume / --force rules, checked before anything is written, both ways."""

import pytest

from orpo_cli.errors import UserError
from orpo_cli.rundir import RunDir


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
        (("x",), True, True, False, ["recipe.yaml", "x"]),  # --resume keeps it
    ],
)
def test_check_allows_and_prepare_applies(tmp_path, files, recipe, resume, force, kept):
    run = _run(tmp_path, files=files, recipe=recipe)
    run.check(resume=resume, force=force)
    run.prepare(resume=resume, force=force)
    assert sorted(p.name for p in run.root.iterdir()) == kept
