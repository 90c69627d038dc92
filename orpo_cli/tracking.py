"""Run tracking in MLflow and Weights & Biases, through each library's own client, beside TensorBoard.

Each backend is an accelerate tracker (`accelerate.tracking.GeneralTracker`), so the loop's one
`accelerator.log(record, step)` reaches TensorBoard, MLflow and W&B alike, on rank 0 only. What a tracked run
holds:

    parameters   the resolved recipe, flattened (model.name_or_path, train.lr, ...)
    metrics      every line of metrics.jsonl, train and eval, under TRL's names, at its step
    system       device, dtype, processes and the versions of the stack (MLflow tags, W&B config `system`)
    artifacts    at the end: the adapter (RUN/adapter/), the curves PNG, the eval table (step 0 vs last) and the
                 resolved recipe

RUN/tracking.json keeps each backend's run id, so that `train --resume` continues the same tracked run. On
--resume each backend is first brought level with metrics.jsonl (the lines it lacks are sent: MLflow is asked which
it holds, W&B online says where it stopped, W&B offline's earlier .wandb files are read, because a process killed
with SIGKILL loses what W&B had not yet written); the steps trained again after the checkpoint are then not sent
twice, so each backend keeps one value per metric and step. Resumed training is bitwise the same, so the values
are metrics.jsonl's, but for `tokens_per_s` of a step trained twice: the first measurement.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from accelerate.tracking import GeneralTracker

from orpo_cli.atomic import atomic_write_text
from orpo_cli.errors import UserError
from orpo_cli.recipe import TrackingSettings
from orpo_cli.rundir import RunDir

TRACKING_FILE = "tracking.json"
EVAL_TABLE_FILE = "eval_table.json"
CURVES_FILE = "training-curves.png"
# The packages whose versions a tracked run records (with the tracker's own).
STACK = ("orpo-tune", "torch", "transformers", "peft", "accelerate", "trl", "bitsandbytes", "datasets", "tokenizers")
_MLFLOW_BATCH = 100  # MLflow's most parameters (and tags) per log_batch call


# ------------------------------------------------------------------------------------ checks, before training
def check_tracking(settings: TrackingSettings) -> None:
    """What would fail once training had started, checked in a moment: W&B online without credentials, an
    MLflow server that does not answer. (Missing packages are refused by the recipe itself.)"""
    if "wandb" in settings.backends and wandb_mode(settings) == "online" and not _wandb_credentials():
        raise UserError(
            "tracking.backends: wandb is online but no W&B credentials were found (WANDB_API_KEY, or `wandb login`"
            " for ~/.netrc); log in, or set tracking.wandb.mode: offline to write RUN/wandb/ for a later `wandb sync`"
        )
    if "mlflow" in settings.backends:
        uri = settings.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
        if urlparse(uri).scheme in {"http", "https"}:
            _check_server(uri)


def wandb_mode(settings: TrackingSettings) -> str:
    mode = settings.wandb.mode or os.environ.get("WANDB_MODE", "online")
    return "offline" if mode in {"offline", "dryrun"} else mode


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import netrc

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _check_server(uri: str) -> None:
    """An `mlflow server` answers GET /health with OK."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
            response.read()
    except urllib.error.HTTPError:
        return  # it answers: a proxy or a server without /health, not ours to judge
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"tracking.mlflow.tracking_uri: no MLflow server answers at {uri} ({reason}); start it "
            "(mlflow server --host 127.0.0.1 --port 5000) or fix the URI"
        ) from None


# ----------------------------------------------------------------------------------------------- facts
def system_facts(*, device: str, dtype: str, processes: int, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Where and with what the run trained: device, dtype, processes, Python and the installed versions."""
    facts = {"device": device, "dtype": dtype, "processes": str(processes), "python": platform.python_version()}
    if device.startswith("cuda"):
        import torch

        facts["gpu"] = torch.cuda.get_device_name()
    for package in (*STACK, *extra):
        try:
            facts[package] = version(package)
        except PackageNotFoundError:
            pass
    return facts


def trackers_for(
    settings: TrackingSettings,
    run: RunDir,
    *,
    run_name: str,
    facts: dict[str, str],
    resume: bool,
    note: Callable[[str], None] = print,
) -> list[str | GeneralTracker]:
    """accelerate's `log_with`: "tensorboard" and one tracker object per other backend. They open nothing
    until `Accelerator.init_trackers` starts them (on rank 0, once the run directory exists)."""
    out: list[str | GeneralTracker] = []
    for backend in settings.backends:
        if backend == "tensorboard":
            out.append("tensorboard")
        else:
            kind = {"mlflow": MlflowTracker, "wandb": WandbTracker}[backend]
            out.append(kind(settings, run, run_name=settings.run_name or run_name, facts=facts, resume=resume,
                            note=note))
    return out


def end_tracking(trackers: list[Any], error: BaseException | None = None) -> None:
    """Close the tracked runs of a run that stopped early: MLflow KILLED (interrupted) or FAILED, W&B failed."""
    from orpo_cli.errors import Interrupted

    for tracker in trackers:
        if isinstance(tracker, _RunTracker):
            tracker.abort(interrupted=isinstance(error, Interrupted))


# ------------------------------------------------------------------------------------------ the trackers
class _RunTracker(GeneralTracker):
    """What MLflow and W&B share: the run id kept in RUN/tracking.json, the lines not to log twice on --resume."""

    name = "tracker"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, settings: TrackingSettings, run: RunDir, *, run_name: str, facts: dict[str, str],
                 resume: bool, note: Callable[[str], None]):
        super().__init__()
        self.settings, self.run, self.run_name, self.facts = settings, run, run_name, facts
        self.resume, self.note = resume, note
        self.logged_until = {"train": -1, "eval": -1}  # steps a killed process already sent, per kind of line
        self.finished = False

    @property
    def tracker(self) -> Any:
        return None

    def start(self) -> None:
        saved = read_tracking(self.run).get(self.name) if self.resume else None
        self.open(saved)
        if saved is None:
            return
        # Bring the resumed run level with metrics.jsonl (not yet truncated to the checkpoint: every line the
        # killed process wrote), sending what the backend lacks; the steps trained again are then not sent twice.
        held = self.held_steps()
        for record in self.run.read_metrics():
            kind, step = _kind(record), int(record.get("step", 0))
            if step not in held[kind]:
                self.send(_numbers(record), step)
                held[kind].add(step)
            self.logged_until[kind] = max(self.logged_until[kind], step)

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        step = int(step or 0)
        if step <= self.logged_until[_kind(values)]:
            return  # this run already holds this line (from before the kill)
        self.send(_numbers(values), step)

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.settings.artifacts:
            self.upload(eval_table(self.run))
        self.close()

    def abort(self, *, interrupted: bool) -> None:
        if not self.finished:
            self.finished = True
            self.close(interrupted=interrupted, failed=not interrupted)

    def remember(self, entry: dict[str, Any]) -> None:
        """Keep this backend's run id in RUN/tracking.json (beside the other backends')."""
        data = read_tracking(self.run)
        data[self.name] = entry
        atomic_write_text(self.run.root / TRACKING_FILE, json.dumps(data, indent=2) + "\n")

    # what each backend does
    def open(self, saved: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def held_steps(self) -> dict[str, set[int]]:
        """The steps of the train and the eval lines the resumed run already holds."""
        raise NotImplementedError

    def send(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def upload(self, table: dict[str, Any] | None) -> None:
        raise NotImplementedError

    def close(self, *, interrupted: bool = False, failed: bool = False) -> None:
        raise NotImplementedError


class MlflowTracker(_RunTracker):
    """An MLflow run, through `mlflow.MlflowClient` (no global active run)."""

    name = "mlflow"

    def open(self, saved: dict[str, Any] | None) -> None:
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = (saved or {}).get("tracking_uri") or self.settings.mlflow.tracking_uri or mlflow.get_tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        if saved is not None:
            self.run_id = saved["run_id"]
            try:
                self.client.get_run(self.run_id)
            except MlflowException as err:
                raise UserError(
                    f"--resume: the MLflow run {self.run_id} of {self.run.root / TRACKING_FILE} is not at {uri} "
                    f"({err.error_code}); restore it, or remove the file to track the rest in a new run"
                ) from None
            self.client.update_run(self.run_id, status="RUNNING")
            self.note(f"mlflow: continuing run {self.run_id} at {uri}")
            return
        experiment = self.client.get_experiment_by_name(self.settings.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.settings.project)
        created = self.client.create_run(experiment_id, run_name=self.run_name, tags=mlflow_tags(self.settings.tags))
        self.run_id = created.info.run_id
        self.remember({"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": uri})
        self.note(f"mlflow: run {self.run_id} in experiment {self.settings.project!r} at {uri}")

    def held_steps(self) -> dict[str, set[int]]:
        # A line is logged in one call, so its loss says whether MLflow holds it.
        return {kind: {m.step for m in self.client.get_metric_history(self.run_id, key)}
                for kind, key in (("train", "loss"), ("eval", "eval_loss"))}

    def store_init_configuration(self, values: dict) -> None:
        from mlflow.entities import Param, RunTag

        have = self.client.get_run(self.run_id).data.params
        params = {k: str(v)[:6000] for k, v in values.items()}
        new = [Param(k, v) for k, v in params.items() if k not in have]
        changed = [f"{k}: {have[k]} -> {v}" for k, v in params.items() if k in have and have[k] != v]
        tags = [RunTag(f"system.{k}", v) for k, v in self.facts.items()]
        if changed:  # MLflow's parameters never change: a --resume that changes one says so in a tag
            tags.append(RunTag("orpo-tune.resumed_with", "; ".join(changed)[:5000]))
        for i in range(0, max(len(new), len(tags)), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + _MLFLOW_BATCH], tags=tags[i : i + _MLFLOW_BATCH])

    def send(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step) for k, v in metrics.items()])

    def upload(self, table: dict[str, Any] | None) -> None:
        if self.run.adapter.is_dir():
            self.client.log_artifacts(self.run_id, str(self.run.adapter), "adapter")
        for path in (self.run.root / CURVES_FILE, self.run.recipe):
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        if table is not None:
            self.client.log_dict(self.run_id, table, EVAL_TABLE_FILE)

    def close(self, *, interrupted: bool = False, failed: bool = False) -> None:
        status = "KILLED" if interrupted else "FAILED" if failed else "FINISHED"
        self.client.set_terminated(self.run_id, status)


class WandbTracker(_RunTracker):
    """A W&B run, through `wandb.init` (online, or offline into RUN/wandb/ for `wandb sync`)."""

    name = "wandb"

    def open(self, saved: dict[str, Any] | None) -> None:
        import wandb

        mode = wandb_mode(self.settings)
        run_id = saved["run_id"] if saved else secrets.token_hex(4)  # W&B's own ids: 8 lowercase letters/digits
        if saved is None:  # before init: a kill during it still resumes this id
            self.remember({"run_id": run_id, "project": self.settings.project, "entity": self.settings.wandb.entity})
        self.wb = wandb.init(
            project=self.settings.project, entity=self.settings.wandb.entity, name=self.run_name,
            tags=self.settings.tags or None, id=run_id, resume="allow", mode=mode, dir=str(self.run.root),
            config={"system": self.facts}, allow_val_change=True,
        )
        self.mode, self.run_id = mode, run_id
        verb = "continuing" if saved else "run"
        where = f"offline in {self.run.root / 'wandb'} (upload: wandb sync)" if mode == "offline" else self.wb.url
        self.note(f"wandb: {verb} {run_id} in project {self.settings.project!r}, {where}")

    def held_steps(self) -> dict[str, set[int]]:
        if self.mode == "online":  # the server says where the run it resumed stopped
            return {"train": set(range(self.wb.step)), "eval": set(range(self.wb.step))}
        # Offline, the earlier processes' .wandb files say it, read by W&B's own reader. A process killed with
        # SIGKILL may have lost its last lines (or all of them) in W&B's buffers: those are sent again here.
        held: dict[str, set[int]] = {"train": set(), "eval": set()}
        for path in sorted((self.run.root / "wandb").glob(f"offline-run-*-{self.run_id}/run-{self.run_id}.wandb")):
            if path.parent.name == Path(self.wb.dir).parent.name:
                continue  # this process's own
            for item in wandb_history(path):
                keys = [k for k in item if not k.startswith("_")]
                for kind in {"eval" if k.startswith("eval_") else "train" for k in keys}:
                    held[kind].add(int(item["_step"]))
        return held

    def store_init_configuration(self, values: dict) -> None:
        self.wb.config.update(_nested(values), allow_val_change=True)

    def send(self, metrics: dict[str, float], step: int) -> None:
        self.wb.log(metrics, step=step)

    def upload(self, table: dict[str, Any] | None) -> None:
        import wandb

        media: dict[str, Any] = {}
        if table is not None:
            media["eval_table"] = wandb.Table(columns=table["columns"], data=table["rows"])
        curves = self.run.root / CURVES_FILE
        if curves.is_file():
            try:
                media["training_curves"] = wandb.Image(str(curves))
            except Exception:  # noqa: BLE001 - wandb.Image needs Pillow, an optional dependency of wandb
                self.wb.save(str(curves), base_path=str(self.run.root), policy="now")
        if media:
            self.wb.log(media)
        if self.run.adapter.is_dir():
            artifact = wandb.Artifact(_artifact_name(f"{self.run_name}-adapter"), type="model")
            artifact.add_dir(str(self.run.adapter))
            artifact.add_file(str(self.run.recipe))
            self.wb.log_artifact(artifact)

    def close(self, *, interrupted: bool = False, failed: bool = False) -> None:
        self.wb.finish(exit_code=130 if interrupted else 1 if failed else 0)


# --------------------------------------------------------------------------------------------- helpers
def read_tracking(run: RunDir) -> dict[str, Any]:
    path = run.root / TRACKING_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def eval_table(run: RunDir) -> dict[str, Any] | None:
    """train's closing table, from metrics.jsonl: every eval_ metric at step 0 (or the first eval) and the last."""
    evals = [r for r in run.read_metrics() if _kind(r) == "eval"]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    keys = [k for k in last if k.startswith("eval_")]
    return {
        "columns": ["metric", f"step {first['step']}", f"step {last['step']}"],
        "rows": [[k.removeprefix("eval_"), first.get(k), last.get(k)] for k in keys],
    }


def wandb_history(path: Path) -> list[dict[str, Any]]:
    """The history rows (metric -> value, with `_step`) of one .wandb file, read by W&B's own reader
    (`wandb leet inspect --json`, offline)."""
    import shutil
    import subprocess
    import sys

    sibling = Path(sys.executable).parent / "wandb"
    tool = str(sibling) if sibling.is_file() else shutil.which("wandb") or "wandb"
    done = subprocess.run([tool, "leet", "inspect", "--json", str(path)], capture_output=True, text=True,
                          timeout=300, check=False)
    rows = []
    for line in done.stdout.splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("type") == "history":
            rows.append(record["history"]["item"])
    return rows


def mlflow_tags(tags: list[str]) -> dict[str, str]:
    """tracking.tags in MLflow: KEY=VALUE sets KEY, a bare word is set to true."""
    return dict(tag.split("=", 1) if "=" in tag else (tag, "true") for tag in tags)


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


def _kind(record: dict[str, Any]) -> str:
    return "eval" if any(k.startswith("eval_") for k in record) else "train"


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": x} -> {"train": {"lr": x}}: the recipe's own shape, for W&B's config."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _artifact_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:128]

