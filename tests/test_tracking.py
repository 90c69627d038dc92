"""Tracking for real, offline: MLflow (a SQLite store, and an `mlflow server` this file starts on 127.0.0.1) read
back through MlflowClient, W&B in offline mode read back from its .wandb files; both hold metrics.jsonl's values,
and a run killed with SIGKILL and resumed is still one tracked run in each."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orpo_cli.cli import app
from orpo_cli.errors import UserError
from orpo_cli.recipe import TrackingSettings
from orpo_cli.recipe_loading import load_recipe
from orpo_cli.rundir import RunDir
from orpo_cli.tracking import TRACKING_FILE, check_tracking, eval_table, mlflow_tags, wandb_history

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "tiny-lora.yaml"
FAST = [
    "model.name_or_path=builtin:micro-llama",
    "data.train.max_rows=96",
    "orpo.max_length=64",
    "orpo.max_prompt_length=32",
    "train.micro_batch_size=4",
    "train.gradient_accumulation=1",
    "train.lr=1e-3",
    "train.log_every=1",
    "train.eval_every=4",
    "train.save_every=5",
    "adapter.dropout=0.1",
    "tracking.tags=[orpo,team=nlp]",
]
runner = CliRunner()
# Timing: measured twice for a step trained twice (before a kill and after --resume); every other number of a
# resumed run is bitwise the same.
TIMING = {"tokens_per_s"}


def _args(out: Path, steps: int, backends: str, uri: str, *extra: str) -> list[str]:
    args = ["train", str(RECIPE), "--output-dir", str(out), "--max-steps", str(steps)]
    for item in [*FAST, f"tracking.backends={backends}", f"tracking.mlflow.tracking_uri={uri}",
                 "tracking.project=orpo-tests", "tracking.wandb.mode=offline"]:
        args += ["--set", item]
    return args + list(extra)


def _lines(records: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """metrics.jsonl as {(train|eval, step): {metric: value}}, numbers only (as the trackers get them)."""
    out = {}
    for r in records:
        kind = "eval" if any(k.startswith("eval_") for k in r) else "train"
        out[(kind, r["step"])] = {k: float(v) for k, v in r.items()
                                  if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}
    return out


def _by_metric_and_step(lines: dict[tuple[str, int], dict[str, float]], skip=frozenset()) -> dict:
    return {(k, step): v for (_kind, step), values in lines.items() for k, v in values.items() if k not in skip}


def _mlflow_metrics(client, run_id: str, keys) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            out.setdefault((key, m.step), []).append(m.value)
    return out


def _wandb_history(run: RunDir) -> tuple[set[str], dict[tuple[str, int], list[float]]]:
    """Every history row of every .wandb file under RUN/wandb (one per process that logged), read by W&B's own
    reader; returns the run ids and {(metric, step): [values]}."""
    ids, out = set(), {}
    files = sorted((run.root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, "no .wandb file written"
    for path in files:
        ids.add(path.stem.removeprefix("run-"))
        for item in wandb_history(path):
            for key, value in item.items():
                if not key.startswith("_") and isinstance(value, int | float):
                    out.setdefault((key, item["_step"]), []).append(float(value))
    return ids, out


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    """One SQLite tracking store for this file (creating its tables takes MLflow ~10 s, so once)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


# ------------------------------------------------------------------------------------------------ recipe
def test_a_backend_whose_package_is_missing_is_refused_in_one_line_at_validation(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = runner.invoke(app, ["validate", str(RECIPE), "--set", "tracking.backends=[tensorboard,wandb]"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "tracking.backends" in lines[0] and "pip install 'orpo-tune[wandb]'" in lines[0]
    # mlflow is installed: the same recipe with it passes
    ok = runner.invoke(app, ["validate", str(RECIPE), "--set", "tracking.backends=[tensorboard,mlflow]"])
    assert ok.exit_code == 0, ok.output


def test_train_tensorboard_and_tracking_backends_say_one_thing():
    def recipe(*overrides):
        return load_recipe(RECIPE, list(overrides))

    assert recipe().tracking.backends == ["tensorboard"] and recipe().train.tensorboard
    off = recipe("train.tensorboard=false", "tracking.backends=[tensorboard,mlflow]")
    assert off.tracking.backends == ["mlflow"] and not off.train.tensorboard
    left_out = recipe("tracking.backends=[mlflow]")
    assert not left_out.train.tensorboard
    with pytest.raises(UserError, match="train.tensorboard: true"):
        recipe("train.tensorboard=true", "tracking.backends=[mlflow]")
    with pytest.raises(UserError, match="listed twice"):
        recipe("tracking.backends=[mlflow,mlflow]")
    assert mlflow_tags(["orpo", "team=nlp", "a=b=c"]) == {"orpo": "true", "team": "nlp", "a": "b=c"}


def test_missing_credentials_or_server_are_one_line_before_training(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    online = TrackingSettings(backends=["wandb"])
    with pytest.raises(UserError, match="no W&B credentials"):
        check_tracking(online)
    check_tracking(TrackingSettings(backends=["wandb"], wandb={"mode": "offline"}))  # offline needs none
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    check_tracking(online)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=f"no MLflow server answers at http://127.0.0.1:{port}"):
        check_tracking(TrackingSettings(backends=["mlflow"], mlflow={"tracking_uri": f"http://127.0.0.1:{port}"}))
    # through the CLI: exit 2, one line, and no run directory
    result = runner.invoke(app, _args(tmp_path / "run", 2, "[mlflow]", f"http://127.0.0.1:{port}"))
    assert result.exit_code == 2 and "no MLflow server answers" in result.output
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- a killed and resumed run
@pytest.mark.slow
def test_mlflow_and_wandb_hold_metrics_jsonl_and_a_killed_run_resumes_the_same_tracked_run(tmp_path, mlflow_db):
    from mlflow import MlflowClient

    steps, out = 14, tmp_path / "run"
    run = RunDir(out)
    proc = subprocess.Popen([sys.executable, "-m", "orpo_cli", *_args(out, steps, "[mlflow,wandb]", mlflow_db)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 240
    # killed past its first checkpoint (step 5), in the steps that --resume trains again
    while not any(r.get("step", 0) >= 7 for r in run.read_metrics()):
        assert proc.poll() is None, "the run ended before step 7"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = _lines(run.read_metrics())
    ids = json.loads((out / TRACKING_FILE).read_text())
    assert set(ids) == {"mlflow", "wandb"}

    resumed = runner.invoke(app, _args(out, steps, "[mlflow,wandb]", mlflow_db, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / TRACKING_FILE).read_text()) == ids  # the same tracked runs
    final = _lines(run.read_metrics())
    assert {s for kind, s in final if kind == "train"} == set(range(1, steps + 1))
    assert max(s for kind, s in killed if kind == "train") > 5, "the kill fell before the steps trained twice"
    # What each backend must hold: one value per metric and step, metrics.jsonl's; the timing of a step trained
    # twice is either measurement (the killed process's where it had logged the line).
    expected = _by_metric_and_step(final)
    timing_before = _by_metric_and_step(killed)
    assert _by_metric_and_step(final, TIMING) == {k: v for k, v in expected.items() if k[0] not in TIMING}

    def same(held):
        assert held.keys() == expected.keys() and all(len(v) == 1 for v in held.values())
        for key, (value,) in held.items():
            assert value == expected[key] or (key[0] in TIMING and value == timing_before.get(key)), key


    client = MlflowClient(mlflow_db)
    experiment = client.get_experiment_by_name("orpo-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]  # still one run
    mlrun = runs[0]
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "tiny-lora"
    assert mlrun.data.tags["team"] == "nlp" and mlrun.data.tags["orpo"] == "true"
    assert mlrun.data.params["train.lr"] == "0.001" and mlrun.data.params["model.name_or_path"] == "builtin:micro-llama"
    assert mlrun.data.tags["system.device"] == "cpu" and mlrun.data.tags["system.dtype"] == "float32"
    assert mlrun.data.tags["system.torch"] and mlrun.data.tags["system.mlflow"] and mlrun.data.tags["system.wandb"]
    keys = {k for k, _ in expected}
    assert {"loss", "rewards/accuracies", "eval_loss", "eval_log_odds_chosen", "tokens_per_s"} <= keys
    same(_mlflow_metrics(client, mlrun.info.run_id, keys))
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"adapter", "training-curves.png", "eval_table.json", "recipe.yaml"} <= artifacts
    assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(mlrun.info.run_id, "adapter")}
    table = json.loads(Path(client.download_artifacts(mlrun.info.run_id, "eval_table.json", str(tmp_path))).read_text())
    assert table == eval_table(run)
    assert table["columns"] == ["metric", "step 0", f"step {steps}"]

    wandb_ids, history = _wandb_history(run)
    assert wandb_ids == {ids["wandb"]["run_id"]}  # one run id, in the killed and the resumed process's files
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2
    same({k: v for k, v in history.items() if k[0] in keys})


# ------------------------------------------------------------------------------------------ mlflow server
@pytest.mark.slow
def test_a_run_tracked_on_an_mlflow_server(tmp_path, mlflow_db):
    from mlflow import MlflowClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", mlflow_db, "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, "mlflow server exited"
                assert time.time() < deadline, "mlflow server did not answer within 120 s"
                time.sleep(0.5)
        out = tmp_path / "run"
        result = runner.invoke(app, _args(out, 4, "[tensorboard,mlflow]", uri, "--set", "tracking.project=served",
                                          "--set", "tracking.run_name=on-server"))
        assert result.exit_code == 0, result.output
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
        assert len(runs) == 1 and runs[0].info.run_name == "on-server" and runs[0].info.status == "FINISHED"
        expected = _by_metric_and_step(_lines(RunDir(out).read_metrics()))
        held = _mlflow_metrics(client, runs[0].info.run_id, {k for k, _ in expected})
        assert held == {k: [v] for k, v in expected.items()}
        assert "adapter" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
        assert list((out / "tensorboard").rglob("events.out.tfevents.*"))  # and TensorBoard beside it
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
