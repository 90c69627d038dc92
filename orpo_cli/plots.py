"""Training curves an ORPO user looks at, drawn from a run's metrics.jsonl into one PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orpo_cli.errors import UserError
from orpo_cli.rundir import RunDir

PLOT_NAME = "training-curves.png"

# (title, [(metric key without eval_ prefix, label)])
_PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("ORPO loss", [("loss", "loss")]),
    ("NLL (SFT term)", [("nll_loss", "nll")]),
    ("log odds ratio", [("log_odds_chosen", "mean log odds"), ("log_odds_ratio", "mean log σ(log odds)")]),
    ("mean log-prob of responses", [("logps/chosen", "chosen"), ("logps/rejected", "rejected")]),
    ("preference accuracy", [("rewards/accuracies", "accuracy")]),
    ("reward margin (λ·Δ log-prob)", [("rewards/margins", "margin")]),
]


def check_plot_out(run: RunDir, out: Path | None) -> bool:
    """Refuse an --out that would write over or inside a run's files; return whether the PNG goes into `run`
    (then `plot` holds the run's lock while it writes). Inside a run, a PNG goes only directly into its own
    directory: its adapter, checkpoints, tokenizer and records are train's."""
    from orpo_cli.rundir import run_holding

    if out is None:
        return True
    out = Path(out)
    holder = run_holding(out.parent)
    if holder is None or out.is_dir():  # (a directory is refused by plot_run, which says so)
        return False
    own = holder is not None and holder.resolve() == run.root.resolve() and out.parent.resolve() == holder.resolve()
    if own and out.suffix.lower() == ".png" and not out.is_dir():
        return True
    raise UserError(
        f"--out {out}: inside the run directory {holder}, whose files plot must not replace; write the PNG "
        f"outside it, or give a .png name directly in {run.root} (default {run.root / PLOT_NAME})"
    )


def plot_run(run: RunDir, out: Path | None = None) -> Path:
    """Write the curves of `run` to a PNG (default RUN/training-curves.png) and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(
            "plotting needs matplotlib: pip install 'orpo-tune[plot]' (or pip install matplotlib)"
        ) from None
    records = run.read_metrics()
    if not records:
        raise UserError(f"{run.root}: no metrics.jsonl records to plot yet")
    out = out or run.root / PLOT_NAME
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the PNG's file name, e.g. {out / PLOT_NAME}")
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, (title, series) in zip(axes.flat, _PANELS, strict=True):
        for key, label in series:
            for prefix, style, phase in (("", "-", "train"), ("eval_", "o--", "eval")):
                xs, ys = _series(records, prefix + key)
                if xs:
                    ax.plot(xs, ys, style, label=f"{phase} {label}", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{run.root.name}: ORPO training curves")
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [float(p[1]) for p in points]
