"""The step's speed paths in one list: what each changes, where it was verified, and applying them to a model.

A speed path replaces part of what the model's (or PEFT's) own code runs in a training step by code that
computes the same numbers, bit for bit or to the last bits, faster or in less memory. Each is declared here
with where it has been verified: the devices and dtypes its tests ran on, and the model types whose code it
was written against. :func:`apply_speed_paths` installs, on one model, every path declared for that device,
dtype and model type (none with ``train.speed_paths: off``), and says what it applied and what it skipped and
why; nothing is installed anywhere else (no path is installed to fall through to the original code). The
result's :meth:`SpeedPaths.undo` takes every path off again, including the one process-wide name each of
rotary and block attention replaces (put back once no model uses it), so that after a run transformers'
functions are the originals, and a second model in the process never runs a path installed on the first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from orpo_cli.kernels import block_attention, gated_mlp, recompute, rms_norm, rotary

Setting = Literal["auto", "off"]

_CPU_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class SpeedPath:
    """One speed path: its name in the log line, what its count counts, where it was verified, and how it is
    installed on a model and taken off it."""

    name: str
    unit: str  # what the count counts ("layers", "norms", ...)
    devices: tuple[str, ...]  # the device types its tests ran on
    dtypes: tuple[torch.dtype, ...] | None  # the model dtypes its tests ran in; None: any (it changes no arithmetic)
    model_types: tuple[str, ...] | None  # config.model_type values it recognises; None: any (it checks itself)
    install: Callable[[nn.Module], int]  # installs it (idempotent); how many modules took it
    undo: Callable[[nn.Module], None]
    declines: Callable[[nn.Module], str | None] = lambda _model: None  # the guard: why not, on a recognised model
    whole_layers_recomputed: bool = True  # False: pointless under gradient checkpointing (which recomputes it all)
    needs_whole_weights: bool = True  # reads the weights outside a forward's gathers: not under FSDP/ZeRO-3


STEP_PATHS: tuple[SpeedPath, ...] = (
    SpeedPath(
        name="rope",
        unit="layers",
        devices=("cpu",),
        dtypes=_CPU_DTYPES,
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        install=rotary.fuse_rotary,
        undo=rotary.unfuse_rotary,
        declines=rotary.declines,
    ),
    SpeedPath(
        name="rms_norm",
        unit="norms",
        devices=("cpu",),
        dtypes=_CPU_DTYPES,
        model_types=("llama", "mistral", "phi3", "qwen2", "qwen3"),
        install=rms_norm.fuse_rms_norms,
        undo=rms_norm.unfuse_rms_norms,
        declines=rms_norm.declines,
    ),
    SpeedPath(
        name="recompute",
        unit="hooks",
        devices=("cpu",),
        dtypes=_CPU_DTYPES,
        model_types=None,  # every noted output is checked bit for bit against its recomputation, once
        install=recompute.enable_recompute,
        undo=recompute.disable_recompute,
        whole_layers_recomputed=False,
    ),
    SpeedPath(
        name="gated_mlp",
        unit="MLPs",
        devices=("cpu",),
        dtypes=_CPU_DTYPES,
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        install=gated_mlp.fuse_gated_mlps,
        undo=gated_mlp.unfuse_gated_mlps,
        declines=gated_mlp.declines,
        whole_layers_recomputed=False,
    ),
    SpeedPath(
        name="block_attention",
        unit="layers",
        # The prefix and packed layouts' attention: public sdpa calls on each pair's blocks (on a CPU, tiles of
        # ATen's CPU flash kernel, chosen per call). Packing runs with it wherever it runs.
        devices=("cpu", "cuda"),
        dtypes=None,
        model_types=None,
        install=block_attention.install,
        undo=block_attention.uninstall,
        declines=block_attention.declines,
        needs_whole_weights=False,
    ),
)
"""The paths that do not depend on the adapter, in the order they are installed. An adapter adds its own
(`Adapter.speed_paths`: LoRA's in-place update) before these."""


@dataclass
class SpeedPaths:
    """What :func:`apply_speed_paths` did to one model: usable as a context manager that undoes it on exit."""

    applied: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def line(self) -> str:
        """The one log line: ``speed paths: rope 30 layers, rms_norm 61 norms; skipped: gated_mlp (why)``."""
        applied = ", ".join(f"{name} {count} {self.units[name]}" for name, count in self.applied.items()) or "none"
        skipped = "; skipped: " + ", ".join(f"{name} ({why})" for name, why in self.skipped.items()) if self.skipped else ""
        return f"speed paths: {applied}{skipped}"

    def record(self) -> dict[str, dict[str, Any]]:
        """What the run directory keeps (RUN/speed_paths.json)."""
        return {"applied": dict(self.applied), "skipped": dict(self.skipped)}

    def undo(self) -> None:
        """Take every installed path off the model again, last first (idempotent)."""
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> SpeedPaths:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.undo()


def apply_speed_paths(
    model: nn.Module,
    *,
    device: torch.device | str,
    dtype: torch.dtype,
    adapter: Any,
    setting: Setting = "auto",
    gradient_checkpointing: bool = False,
    shards_weights: bool = False,
    only: Sequence[str] | None = None,
) -> SpeedPaths:
    """Install on `model` every speed path verified for `device`, `dtype` and the model's type (the adapter's own
    first, `adapter.speed_paths`), unless `setting` is ``off``; return what was applied and skipped, and the undo.

    `gradient_checkpointing`: whole layers are recomputed anyway, so the paths that only save activations are
    skipped. `shards_weights`: under FSDP or ZeRO-3 a layer's weights exist only inside the strategy's gathers,
    so nothing of what reads them is installed. `only`: the names of the paths to consider (eval, which runs
    no backward, takes the block attention alone), None for all.
    """
    device_type = torch.device(device).type
    model_type = _model_type(model)
    report = SpeedPaths()
    paths: Sequence[SpeedPath] = (*getattr(adapter, "speed_paths", ()), *STEP_PATHS)
    for path in paths:
        if only is not None and path.name not in only:
            continue
        report.units[path.name] = path.unit
        why = _why_not(path, setting, device_type, dtype, model_type, gradient_checkpointing, shards_weights)
        if why is None:
            why = path.declines(model)
        if why is None:
            count = path.install(model)
            report._undo.append(lambda path=path: path.undo(model))
            if count:
                report.applied[path.name] = count
                continue
            why = "nothing in the model qualifies"
        report.skipped[path.name] = why
    return report


def _why_not(
    path: SpeedPath,
    setting: str,
    device: str,
    dtype: torch.dtype,
    model_type: str,
    gradient_checkpointing: bool,
    shards_weights: bool,
) -> str | None:
    if setting == "off":
        return "train.speed_paths: off"
    if shards_weights and path.needs_whole_weights:
        return "weights sharded by FSDP/ZeRO-3"
    if device not in path.devices:
        return f"verified on {'/'.join(path.devices)}, not {device}"
    if path.dtypes is not None and dtype not in path.dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in path.dtypes)
        return f"verified in {names}, not {str(dtype).removeprefix('torch.')}"
    if path.model_types is not None and model_type not in path.model_types:
        return f"model type {model_type or 'unknown'} is not one of {'/'.join(path.model_types)}"
    if gradient_checkpointing and not path.whole_layers_recomputed:
        return "gradient checkpointing recomputes whole layers"
    return None


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return str(getattr(config, "model_type", "") or "")
