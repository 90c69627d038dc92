"""How many processes a run has, the checks that need only that, and `--nproc N` through torchrun's launcher.

`orpo-tune train RECIPE --nproc N` runs `torch.distributed.run` (the code behind `torchrun`) inside this
process: it starts N workers, each `python -m orpo_cli train <the resolved recipe>`, watches them, and
stops them all when one fails or a signal arrives. A worker knows it was launched from the environment
torchrun sets (LOCAL_RANK, WORLD_SIZE, ...), so `torchrun ... -m orpo_cli train RECIPE` and
`accelerate launch -m orpo_cli train RECIPE` started by a user run exactly the same code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orpo_cli.errors import QuietExit, UserError
from orpo_cli.recipe import Recipe
from orpo_cli.rundir import RunDir
from orpo_cli.training.checkpoint import WORLD_SIZE_KEY

# Seconds the launcher gives workers, after SIGINT/SIGTERM, to finish their step and checkpoint before it
# kills them (torchrun's own default, 30 s, is shorter than one checkpoint of a large model).
STOP_TIMEOUT_S = 600


@dataclass(frozen=True)
class Machines:
    """The machines of a run, as given on the command line: one unless --nnodes says otherwise."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of machine 0


@dataclass(frozen=True)
class Processes:
    """The processes of a run, known before anything heavy is imported or loaded."""

    per_machine: int
    machines: int
    launched: bool  # this process is a worker started by torchrun, accelerate launch or `--nproc`
    cuda: bool  # the workers train on CUDA GPUs

    @property
    def world_size(self) -> int:
        return self.per_machine * self.machines

    @property
    def needs_launch(self) -> bool:
        return not self.launched and self.world_size > 1


def plan_processes(recipe: Recipe, machines: Machines | None = None) -> Processes:
    """Processes per machine and machines: from the launcher's environment inside a worker, else from
    `distributed.num_processes` (auto: one per visible GPU, one on CPU) and the command line."""
    import torch

    machines = machines or Machines()
    setting = recipe.model.device
    cuda = setting == "cuda" or (setting == "auto" and torch.cuda.is_available())
    wanted = recipe.distributed.num_processes
    if launched_by_launcher():
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if wanted != "auto" and wanted != local:
            raise UserError(
                f"distributed.num_processes is {wanted} but the launcher started {local} processes on this "
                "machine; make them agree (or set distributed.num_processes: auto)"
            )
        return Processes(per_machine=local, machines=max(1, world // local), launched=True, cuda=cuda)
    if machines.nnodes > 1 and not machines.rdzv_endpoint:
        raise UserError(
            "--nnodes > 1 needs --rdzv-endpoint HOST:PORT (machine 0's address, the same on every machine)"
        )
    if not 0 <= machines.node_rank < machines.nnodes:
        raise UserError(
            f"--node-rank {machines.node_rank}: must be 0..{machines.nnodes - 1} for --nnodes {machines.nnodes}"
        )
    per_machine = wanted if wanted != "auto" else (max(1, torch.cuda.device_count()) if cuda else 1)
    return Processes(per_machine=per_machine, machines=machines.nnodes, launched=False, cuda=cuda)


def launched_by_launcher() -> bool:
    """True in a worker started by torchrun / accelerate launch / `orpo-tune train --nproc`."""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def check_processes(recipe: Recipe, procs: Processes, *, resume: bool, run: RunDir) -> None:
    """Cheap checks of the distributed setup (one line each, exit 2), before anything is loaded."""
    import torch

    dist = recipe.distributed
    strategy = dist.strategy
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if procs.cuda and gpus == 0:
        raise UserError(
            "model.device: cuda requested but no CUDA GPU is visible; set model.device: cpu (or auto)"
        )
    if procs.cuda and procs.per_machine > gpus:
        asked = "--nproc / distributed.num_processes" if not procs.launched else "the launcher"
        raise UserError(
            f"{asked}: {procs.per_machine} processes on this machine need one CUDA GPU each, but only {gpus} "
            f"{'is' if gpus == 1 else 'are'} visible; ask for at most {gpus}, or set model.device: cpu"
        )
    configured = _accelerate_launch_strategy()
    if configured not in (None, strategy):
        raise UserError(
            f"accelerate launch was configured for {configured} but distributed.strategy is {strategy}; the "
            f"recipe decides: set distributed.strategy: {configured}, or launch without that accelerate config"
        )
    if strategy in ("fsdp", "deepspeed") and not procs.cuda:
        raise UserError(
            f"distributed.strategy: {strategy} needs CUDA GPUs, and this run trains on the CPU; "
            "use strategy ddp (or auto) on CPU"
        )
    if strategy == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                "distributed.strategy: deepspeed needs the deepspeed package: `pip install deepspeed`; or use "
                "strategy fsdp with fsdp.sharding_strategy: shard_grad_op (the same sharding as ZeRO-2)"
            )
        if dist.deepspeed.zero_stage == 3 and recipe.quantization.mode != "none":
            raise UserError(
                f"distributed.deepspeed.zero_stage: 3 does not combine with {recipe.quantization.mode} quantized "
                "weights (ZeRO-3 cannot shard bitsandbytes weights); use zero_stage: 2, or strategy fsdp for QLoRA"
            )
        if resume:
            raise UserError(
                "--resume: deepspeed runs keep no resumable checkpoint (ZeRO holds the optimizer state in "
                "per-rank shards); for resumable sharded runs use strategy fsdp (shard_grad_op = ZeRO-2)"
            )
    if strategy == "fsdp" and recipe.quantization.mode == "8bit":
        raise UserError(
            "quantization.mode: 8bit does not combine with fsdp; use 4bit (QLoRA) or strategy ddp"
        )
    if strategy == "fsdp":
        from orpo_cli.adapters import build_adapter

        refusal = build_adapter(recipe.adapter).fsdp_refusal
        if refusal is not None:
            raise UserError(refusal)
    if resume:
        saved = saved_world_size(run)
        if saved is not None and saved != procs.world_size:
            raise UserError(
                f"--resume: {run.root} was trained by {saved} process{'es' if saved != 1 else ''} and this launch "
                f"has {procs.world_size}; resume with the same number (e.g. --nproc {saved} on one machine): "
                "the data order and the global batch depend on it"
            )


def _accelerate_launch_strategy() -> str | None:
    """The strategy an `accelerate launch` config asked for (through the environment it sets), if any."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return None


def saved_world_size(run: RunDir) -> int | None:
    """World size recorded in the newest complete checkpoint (1 for checkpoints older than the record)."""
    from safetensors import safe_open

    from orpo_cli.training.checkpoint import latest_checkpoint

    found = latest_checkpoint(run)
    if found is None:
        return None
    with safe_open(str(found[1] / "state.safetensors"), framework="pt") as fh:
        return int(fh.get_tensor(WORLD_SIZE_KEY)) if WORLD_SIZE_KEY in fh.keys() else 1


def launch(recipe: Recipe, procs: Processes, machines: Machines, *, resume: bool, force: bool) -> None:
    """Run `procs.per_machine` workers of the resolved recipe on this machine through torchrun's launcher.

    Returns when they all finished; raises QuietExit with the workers' exit code otherwise (they printed why).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from orpo_cli.atomic import atomic_write_text

    args = ["--nproc-per-node", str(procs.per_machine), "--max-restarts", "0"]
    args += ["--shutdown-timeout", os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_TIMEOUT_S))]
    # SIGINT is ours (see _forward_sigint); torchrun handles the rest: SIGTERM from a scheduler reaches the
    # workers once, and they stop at a common step and checkpoint as on Ctrl-C.
    args += ["--signals-to-handle", "SIGTERM,SIGHUP,SIGQUIT"]
    if machines.nnodes == 1 and not machines.rdzv_endpoint:
        args += ["--standalone"]
    else:
        host, _, port = (machines.rdzv_endpoint or "").rpartition(":")
        if not host or not port.isdigit():
            raise UserError(
                f"--rdzv-endpoint {machines.rdzv_endpoint!r}: expected HOST:PORT, e.g. 10.0.0.1:29500"
            )
        args += ["--nnodes", str(machines.nnodes), "--node-rank", str(machines.node_rank)]
        args += ["--master-addr", host, "--master-port", port]
    # Share this machine's cores among its workers (torchrun would give each a single thread).
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs.per_machine)))
    with tempfile.TemporaryDirectory(prefix="orpo-tune-launch-") as tmp, _env("OMP_NUM_THREADS", threads):
        # The workers read the recipe exactly as validated here, overrides and --nproc applied.
        resolved = Path(tmp) / f"{recipe.name or 'run'}.yaml"
        atomic_write_text(resolved, recipe.to_yaml())
        worker = ["-m", "orpo_cli", "train", str(resolved)]
        worker += ["--resume"] if resume else []
        worker += ["--force"] if force else []
        _quiet_launcher_logs()
        with _forward_sigint() as interrupted:
            try:
                run(parse_args(args + worker))
            except SignalException:  # SIGTERM/SIGHUP: forwarded to the workers, which stopped at one step
                raise QuietExit(130) from None
            except ChildFailedError as err:
                raise QuietExit(130 if interrupted.is_set() else _exit_code(err)) from None


@contextlib.contextmanager
def _forward_sigint() -> Iterator[threading.Event]:
    """Pass each SIGINT (Ctrl-C) on to the workers, as if they had their own terminal; yields whether one came.

    torchrun starts workers in their own sessions, so the terminal's Ctrl-C reaches only this process; its
    own handling would forward the first one and turn a second into SIGTERM. Forwarding each keeps the
    one-process meaning: the first stops after the current step with a checkpoint, a second at once.
    """
    import psutil

    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals can only be caught there
        yield interrupted
        return

    def forward(_signum: int, _frame: object) -> None:
        interrupted.set()
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                os.kill(child.pid, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, forward)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the workers started inside the block only."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _exit_code(err: object) -> int:
    """The exit code of the lowest failed rank; a worker killed by a signal counts as 128 + signal."""
    failures = getattr(err, "failures", {})
    if not failures:
        return 1
    code = failures[min(failures)].exitcode
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        print(f"error: worker rank {min(failures)} was killed by {name}", file=sys.stderr, flush=True)
        return 128 - code
    return code or 1


def _quiet_launcher_logs() -> None:
    """torch.distributed.elastic logs a banner per worker failure; the workers already said what went wrong."""
    import logging

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
