"""The run directory: the contract between `train` and every command that reads its results.

RUN/recipe.yaml        the fully resolved recipe
RUN/metrics.jsonl      one JSON object per logged step (train metrics, eval_ metrics)
RUN/adapter/           the trained adapter (or the full model for adapter kind full)
RUN/tokenizer/         the tokenizer, with its chat template
RUN/speed_paths.json   the speed paths the run applied and skipped (and why)
RUN/checkpoints/step-N resumable checkpoints
RUN/tensorboard/       TensorBoard event files
RUN/orpo-tune.lock     while a verb writes into the run: which process (run_lock.py)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orpo_cli.errors import UserError
from orpo_cli.run_lock import LOCK_NAME


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def speed_paths(self) -> Path:
        return self.root / "speed_paths.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    def holds_anything(self) -> bool:
        """Whether the directory holds anything but its lock (a run that has begun writing)."""
        return self.root.is_dir() and any(child.name != LOCK_NAME for child in self.root.iterdir())

    def check(self, *, resume: bool, force: bool) -> None:
        """The --resume / --force rules, checked without touching anything: --resume continues a run,
        --force replaces one, and without either a previous run is never overwritten."""
        if resume and force:
            raise UserError("--resume and --force contradict each other: pick one")
        if resume:
            if not self.recipe.is_file():
                raise UserError(
                    f"--resume: {self.root} holds no run to resume (no recipe.yaml); drop --resume"
                )
            if not self._any_finished_checkpoint():
                raise UserError(
                    f"--resume: {self.root} holds no complete checkpoint (the run stopped before its first "
                    f"one was written); nothing to continue from: start it again with --force (replaces "
                    f"{self.root}) instead of --resume"
                )
            return
        if self.root.exists() and self.holds_anything() and not force:
            raise UserError(
                f"output_dir: {self.root} exists and is not empty; pass --resume to continue it, "
                "--force to replace it, or --output-dir for a new one"
            )

    def prepare(self, *, resume: bool, force: bool) -> None:
        """Apply `check`'s rules: keep a run to resume, empty one that --force replaces, create the directory."""
        self.check(resume=resume, force=force)
        if resume:
            return
        if self.root.is_dir():
            for child in self.root.iterdir():
                if child.name == LOCK_NAME:  # the lock of the process replacing the run: this one's
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        self.root.mkdir(parents=True, exist_ok=True)

    def _any_finished_checkpoint(self) -> bool:
        """A checkpoint that got as far as its manifest (written last); its digests are checked on resume."""
        if not self.checkpoints.is_dir():
            return False
        return any(
            child.name.startswith("step-") and (child / "manifest.json").is_file()
            for child in self.checkpoints.iterdir()
        )

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every whole record. A line a kill cut short (the last one, without its newline) is not a record."""
        if not self.metrics.is_file():
            return []
        records = []
        for number, line in enumerate(self.metrics.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # cut short by a kill mid-write: the step is logged again on --resume
            if not isinstance(record, dict):
                raise UserError(f"{self.metrics}:{number}: not a metrics record; the file was edited by hand?")
            records.append(record)
        return records

    def truncate_metrics(self, last_step: int) -> None:
        """Keep each record of the steps up to `last_step` once (a resumed run logs the later ones again): the
        records after it and a line cut short go, and of a step recorded twice the later record stays. A step's
        train record and its eval record are two records."""
        from orpo_cli.atomic import atomic_write_text

        last: dict[tuple[Any, bool], int] = {}
        records = self.read_metrics()
        for index, record in enumerate(records):  # of a step logged twice, the later record is the run's
            last[(record.get("step", 0), any(str(k).startswith("eval_") for k in record))] = index
        kept = [
            r for i, r in enumerate(records)
            if isinstance(r.get("step", 0), int) and r.get("step", 0) <= last_step
            and last[(r.get("step", 0), any(str(k).startswith("eval_") for k in r))] == i
        ]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))


def run_holding(path: Path) -> Path | None:
    """The run directory `path` is, or lies inside (the nearest one up its parents), else None."""
    path = Path(path).expanduser().absolute()
    for candidate in (path, *path.parents):
        if _is_run(candidate):
            return candidate
    resolved = path.resolve()
    if resolved != path:
        return run_holding(resolved)
    return None


def run_below(path: Path, limit: int = 20_000) -> Path | None:
    """A run directory inside `path` (a directory), found by a walk that stops at the first one (and after
    `limit` directories, when it says `path` itself, so as not to walk a whole disk), else None."""
    import os

    seen = 0
    for current, _dirs, _ in os.walk(path):  # symbolic links are not followed
        here = Path(current)
        if _is_run(here):
            return here
        seen += 1
        if seen >= limit:
            return Path(path)
    return None


def _is_run(path: Path) -> bool:
    """What marks a directory as a run's (or a run's beginning): its lock, its metrics, its resolved recipe
    beside a tokenizer, adapter or checkpoints, or step-N checkpoints."""
    try:
        if not path.is_dir():
            return False
        run = RunDir(path)
        if (path / LOCK_NAME).is_file() or run.metrics.is_file():
            return True
        if run.recipe.is_file() and any(p.is_dir() for p in (run.tokenizer, run.adapter, run.checkpoints)):
            return True
        return run.checkpoints.is_dir() and any(c.name.startswith("step-") for c in run.checkpoints.iterdir())
    except OSError:
        return False


def open_run(path: Path) -> RunDir:
    """A finished or running run directory, for eval/export/generate; anything else is a user error."""
    run = RunDir(Path(path))
    if not run.recipe.is_file():
        raise UserError(
            f"{path}: not a run directory (no recipe.yaml); give the output_dir of `orpo-tune train`"
        )
    return run
