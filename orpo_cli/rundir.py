"""The run directory: the contract between `train` and every command that reads its results.

RUN/recipe.yaml        the fully resolved recipe
RUN/metrics.jsonl      one JSON object per logged step (train metrics, eval_ metrics)
RUN/adapter/           the trained adapter (or the full model for adapter kind none)
RUN/tokenizer/         the tokenizer, with its chat template
RUN/checkpoints/step-N resumable checkpoints
RUN/tensorboard/       TensorBoard event files
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orpo_cli.errors import UserError


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
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

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
            return
        if self.root.exists() and any(self.root.iterdir()) and not force:
            raise UserError(
                f"output_dir: {self.root} exists and is not empty; pass --resume to continue it, "
                "--force to replace it, or --output-dir for a new one"
            )

    def prepare(self, *, resume: bool, force: bool) -> None:
        """Apply `check`'s rules: keep a run to resume, empty one that --force replaces, create the directory."""
        self.check(resume=resume, force=force)
        if resume:
            return
        if self.root.exists() and any(self.root.iterdir()):
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.is_file():
            return []
        return [
            json.loads(line) for line in self.metrics.read_text(encoding="utf-8").splitlines() if line.strip()
        ]

    def truncate_metrics(self, last_step: int) -> None:
        """Drop records logged after `last_step` (a resumed run logs them again)."""
        from orpo_cli.atomic import atomic_write_text

        kept = [r for r in self.read_metrics() if r.get("step", 0) <= last_step]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))


def open_run(path: Path) -> RunDir:
    """A finished or running run directory, for eval/export/generate; anything else is a user error."""
    run = RunDir(Path(path))
    if not run.recipe.is_file():
        raise UserError(
            f"{path}: not a run directory (no recipe.yaml); give the output_dir of `orpo-tune train`"
        )
    return run
