"""What a run shows a person: a progress bar on a terminal, plain log lines otherwise, and summary tables."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# Columns shown in log lines and tables, in order, with short labels.
_SHOWN = {
    "loss": "loss",
    "nll_loss": "nll",
    "log_odds_ratio": "log_odds_ratio",
    "rewards/accuracies": "acc",
    "rewards/margins": "margin",
    "tokens_per_s": "tok/s",
}


class Reporter:
    """Progress and metrics for one process; silent on every rank but the main one."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task: Any = None
        self._last: dict[str, Any] = {}
        self._t0 = time.perf_counter()

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)

    def start(self, total_steps: int, done: int) -> None:
        if not self.enabled or not self.console.is_terminal:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=done, info="")

    def advance(self, step: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        text = "  ".join(
            f"{label} {_fmt(record[key])}" for key, label in _SHOWN.items() if record.get(key) is not None
        )
        if self._progress is not None:
            self._progress.update(self._task, info=text)
        else:
            self.console.print(f"step {step:>6}  {text}", highlight=False, soft_wrap=True)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = "  ".join(
            f"{label} {_fmt(metrics['eval_' + key])}"
            for key, label in _SHOWN.items()
            if "eval_" + key in metrics
        )
        line = f"eval @ step {step}: {text}"
        (self._progress.console if self._progress else self.console).print(
            line, highlight=False, soft_wrap=True
        )

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def table(self, title: str, columns: list[str], rows: list[list[Any]], *, text: bool = False) -> None:
        """Numbers right-aligned after a first label column; `text`: every column left-aligned (answers)."""
        if not self.enabled:
            return
        table = Table(title=title, title_justify="left", show_lines=text)
        for i, col in enumerate(columns):
            table.add_column(col, justify="left" if i == 0 or text else "right")
        for row in rows:
            table.add_row(*[_fmt(c) if not isinstance(c, str) else c for c in row])
        self.console.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)
