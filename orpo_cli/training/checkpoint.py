"""Resumable checkpoints without pickle: trainable weights, optimizer state and RNG in safetensors + JSON.

A checkpoint is written to a temporary directory and renamed into place, with a manifest of SHA-256
digests written last; `latest_checkpoint` skips (with a warning) one that is incomplete or corrupted.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from orpo_cli.adapters import trainable_state
from orpo_cli.atomic import atomic_dir, remove_stale_temporaries
from orpo_cli.errors import UserError
from orpo_cli.rundir import RunDir
from orpo_cli.storage import file_sha256

WORLD_SIZE_KEY = "engine/world_size"  # the processes that wrote a checkpoint, in its state.safetensors

_STEP = re.compile(r"^step-(\d+)$")
_FILES = (
    "trainable.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "state.safetensors",
    "state.json",
)


def save_checkpoint(
    run: RunDir,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    keep: int,
) -> Path:
    """Write checkpoint `step` of `model`'s trainable weights and `optimizer` (see write_checkpoint)."""
    return write_checkpoint(run, step, trainable_state(model), optimizer.state_dict(), tensors, keep)


def write_checkpoint(
    run: RunDir,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically from state dicts (trainable weights by name, an optimizer
    `state_dict()`), with this process's RNG state, and keep only the newest `keep` checkpoints."""
    target = run.checkpoint(step)
    with atomic_dir(target, replace=True) as tmp:
        save_file(_contiguous(weights), str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        state = {"rng/torch": torch.get_rng_state(), **{k: v.detach().cpu() for k, v in tensors.items()}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # Only this process's device: asking for every GPU's state would open a CUDA context on each.
            state["rng/cuda"] = torch.cuda.get_rng_state()
        save_file(_contiguous(state), str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "python_rng": _py_rng_state()}))
        digests = {name: file_sha256(tmp / name) for name in _FILES}
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "sha256": digests}, indent=1))
    for old in list_checkpoints(run)[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return target


def list_checkpoints(run: RunDir) -> list[tuple[int, Path]]:
    """Checkpoint directories by step, oldest first (complete or not)."""
    if not run.checkpoints.is_dir():
        return []
    found = []
    for child in run.checkpoints.iterdir():
        m = _STEP.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run: RunDir) -> tuple[int, Path] | None:
    """The newest checkpoint whose manifest and digests check out; broken ones are skipped with a warning."""
    remove_stale_temporaries(run.checkpoints)
    for step, path in reversed(list_checkpoints(run)):
        problem = _verify(path)
        if problem is None:
            return step, path
        warnings.warn(f"skipping checkpoint {path.name}: {problem}", stacklevel=2)
    return None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[int, dict[str, torch.Tensor]]:
    """Restore weights, optimizer and RNG from `path`; returns the step and the extra tensors saved with it."""
    step, weights, optimizer_state, state = read_checkpoint(path)
    params = dict(model.named_parameters())
    missing = [name for name in weights if name not in params]
    if missing:
        raise ValueError(f"checkpoint {path} has weights this model lacks: {missing[:3]}")
    for name, value in weights.items():
        if value.shape != params[name].shape:
            raise UserError(
                f"--resume: {path}: {name} is {list(value.shape)} in the checkpoint but {list(params[name].shape)} in "
                "the model the recipe builds; resume with the run's own recipe and model"
            )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(optimizer_state)
    return step, state


def read_checkpoint(
    path: Path,
) -> tuple[int, dict[str, torch.Tensor], dict[str, Any], dict[str, torch.Tensor]]:
    """Read checkpoint `path` and restore this process's RNG from it.

    Returns (step, trainable weights by name, optimizer state_dict, the extra tensors saved with it).
    """
    weights = load_file(str(path / "trainable.safetensors"))
    meta = json.loads((path / "optimizer.json").read_text())
    optimizer_state = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), meta)
    state = load_file(str(path / "state.safetensors"))
    torch.set_rng_state(state.pop("rng/torch"))
    cuda_state = state.pop("rng/cuda", None)
    legacy = [state.pop(k) for k in sorted(k for k in list(state) if re.fullmatch(r"rng/cuda\d+", k))]
    if torch.cuda.is_available():
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
        elif legacy:  # checkpoints that saved every GPU's state
            torch.cuda.set_rng_state_all(legacy)
    info = json.loads((path / "state.json").read_text())
    version, internal, gauss = info["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return int(info["step"]), weights, optimizer_state, state


def _verify(path: Path) -> str | None:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "incomplete (no manifest)"
    try:
        digests = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for name in _FILES:
        file = path / name
        if not file.is_file():
            return f"missing {name}"
        if file_sha256(file) != digests.get(name):
            return f"{name} does not match its digest (corrupted)"
    return None


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors by `index/slot` (`index/slot/key` inside a nested slot), the rest as JSON.

    bitsandbytes' 8-bit and paged optimizers keep their quantized state in one nested slot
    (`__bnb_optimizer_quant_state__`: state1, absmax1, qmap1, ...), so slots may be dicts of tensors.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}

    def put(prefix: str, slots: dict[str, Any], plain: dict[str, Any]) -> None:
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{key}"] = value.detach().cpu().contiguous().clone()
            elif isinstance(value, dict):
                put(f"{prefix}/{key}", value, plain.setdefault(key, {}))
            else:
                plain[key] = value

    for idx, slots in state_dict["state"].items():
        put(str(idx), slots, scalars.setdefault(str(idx), {}))
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for idx, slots in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(slots)
    for name, value in tensors.items():
        idx, *path = name.split("/")
        node = state.setdefault(int(idx), {})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def _py_rng_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


