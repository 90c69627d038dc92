"""`orpo-tune plot`: a PNG of the curves from metrics.jsonl."""

import json

import pytest
from typer.testing import CliRunner

from orpo_cli.cli import app

runner = CliRunner()


def _run_dir(tmp_path, records):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: run\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_plot_writes_a_png_with_every_panel(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    records = []
    for step in range(0, 21, 5):
        records.append(
            {
                "step": step,
                "eval_loss": 3 - step / 10,
                "eval_rewards/accuracies": 0.5 + step / 50,
                "eval_logps/chosen": -3 + step / 20,
                "eval_logps/rejected": -3.0,
            }
        )
        if step:
            records.append(
                {
                    "step": step,
                    "loss": 3 - step / 9,
                    "nll_loss": 2.5 - step / 10,
                    "log_odds_ratio": -0.6,
                    "log_odds_chosen": step / 10,
                    "rewards/accuracies": 0.6,
                    "rewards/margins": 0.01 * step,
                    "logps/chosen": -3 + step / 20,
                    "logps/rejected": -3.1,
                }
            )
    run = _run_dir(tmp_path, records)
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    png = run / "training-curves.png"
    image = matplotlib.image.imread(str(png))
    assert image.shape[0] >= 600 and image.shape[1] >= 1200
    assert image.std() > 0.05  # curves drawn, not a blank canvas
    # Every panel has a curve, and every metric written to metrics.jsonl is drawn, train and eval alike.
    (figure,) = figures
    axes = [ax for ax in figure.axes if ax.get_title()]
    assert len(axes) == 6 and all(ax.lines for ax in axes)
    drawn = [(list(line.get_xdata()), list(line.get_ydata())) for ax in axes for line in ax.lines]
    for key in {k for r in records for k in r} - {"step"}:
        points = [(r["step"], r[key]) for r in records if key in r]
        assert ([p[0] for p in points], [p[1] for p in points]) in drawn, key


def test_plot_without_metrics_is_a_clear_error(tmp_path):
    run = _run_dir(tmp_path, [])
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 2 and "no metrics" in result.output
