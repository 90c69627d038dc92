"""What the distributed strategy of a run changes inside each process, chosen once at setup.

`distributed.py` plans and launches the processes; this module is what runs in each of them: accelerate's
plugin for the recipe's strategy (`accelerate_plugins`), how FSDP cuts the model into units
(`shape_fsdp_units`), and the `Strategy` the training loop is handed. The loop calls its methods and never
asks which strategy it runs under:

* whole models (one process, DDP, DeepSpeed ZeRO-2) load a checkpoint into the plain model before
  accelerate wraps it and save from the unwrapped model on rank 0;
* sharded models (FSDP, ZeRO-3: no rank holds the whole model) gather and scatter their state, collectively;
* DeepSpeed writes no resumable checkpoint (ZeRO's optimizer shards have no place in one);
* the ranks agree, on a CPU (gloo) group that never waits for the GPU, on stop requests, the checkpoint
  to resume from and the RNG states a checkpoint keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orpo_cli.errors import Interrupted, RunFailed, UserError
from orpo_cli.recipe import DistributedSettings, TrainSettings
from orpo_cli.rundir import RunDir
from orpo_cli.training.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint, write_checkpoint


class Strategy:
    """The loop's view of the distributed strategy: built once from the prepared `Accelerator`."""

    def __init__(self, accelerator: Any):
        from accelerate.utils import DistributedType

        self.accelerator = accelerator
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        kind = accelerator.distributed_type
        self.name = str(getattr(kind, "value", kind)).lower()  # "no", "multi_cpu", "fsdp", "deepspeed", ...
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        # FSDP/ZeRO-3: no rank holds the whole model, so its state must be gathered.
        self.shards_weights = self.fsdp or (deepspeed and accelerator.state.deepspeed_plugin.zero_stage == 3)
        self.resumable = not deepspeed  # ZeRO's optimizer shards have no place in a checkpoint
        self._deepspeed = deepspeed
        self._group = _cpu_group(self.world)

    # ------------------------------------------------------------------------------ model and state
    def prepare(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Path | None, names: Sequence[str]
    ) -> tuple[nn.Module, Any, int, dict[str, torch.Tensor] | None]:
        """Wrap `model` and `optimizer` for the strategy, restoring `checkpoint` (when given) where it fits:
        into the plain model before the wrappers, or into the shards after them. Returns (model, optimizer,
        step, the checkpoint's extra state or None)."""
        step, extra = 0, None
        if checkpoint is not None and not self.shards_weights:
            step, extra = load_checkpoint(checkpoint, self.accelerator.unwrap_model(model), optimizer)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if checkpoint is not None and self.shards_weights:
            step, weights, optimizer_state, extra = read_checkpoint(checkpoint)
            _load_full_state(model, optimizer, weights, optimizer_state, list(names))
        return model, optimizer, step, extra

    def save_checkpoint(
        self,
        run: RunDir,
        step: int,
        model: nn.Module,
        optimizer: Any,
        names: Sequence[str],
        extra: Callable[[], dict[str, torch.Tensor]],
        keep: int,
    ) -> None:
        """Write checkpoint `step` (rank 0 writes; call it on every rank: gathering state is collective).
        `extra` gives the loop's own state (a collective too); nothing is written where nothing could resume."""
        if not self.resumable:
            return
        state = {**extra(), **self._rank_rng()}
        if self.shards_weights:
            weights, optimizer_state = _full_state(model, optimizer, list(names))
            if self.accelerator.is_main_process:
                write_checkpoint(run, step, weights, optimizer_state, state, keep)
        elif self.accelerator.is_main_process:
            save_checkpoint(run, step, self.accelerator.unwrap_model(model), optimizer, state, keep)
        self.accelerator.wait_for_everyone()

    def trainable_weights(self, model: nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """The trainable weights `names`, gathered whole on rank 0 ({} on the others), where the model is
        sharded; None where the unwrapped model holds them already (save from it). Call it on every rank."""
        if not self.shards_weights:
            return None
        return gathered_trainable_weights(model, self.accelerator, names)

    def stopped(self, step: int, run: RunDir) -> Exception:
        """What a stop request at `step` (after its checkpoint) raises."""
        if not self.resumable:
            return RunFailed(f"interrupted at step {step}; deepspeed runs keep no checkpoint to resume from")
        return Interrupted(step, run.checkpoint(step))

    # ---------------------------------------------------------------------------- ranks agreeing
    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over every rank (itself, alone)."""
        if self.world == 1:
            return value
        return self.accelerator.reduce(value.clone(), reduction="sum")

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (a one-number all-reduce on the CPU); the same answer on all."""
        if self._group is None:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._group)
        return bool(value.item())

    def check_same_everywhere(self, step: int) -> None:
        """Every rank must resume from the same checkpoint (it reads it from a filesystem they all see)."""
        if self._group is None:
            return
        import torch.distributed as dist

        low, high = torch.tensor([step]), torch.tensor([step])
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self._group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self._group)
        if int(low) != int(high):
            raise UserError(
                "--resume: the processes found different checkpoints (steps "
                f"{int(low) if int(low) >= 0 else 'none'} and {int(high)}); on several machines output_dir must be "
                "on storage that every machine sees (e.g. NFS)"
            )

    def restore_rng(self, extra: dict[str, torch.Tensor], device: torch.device) -> None:
        """This rank's RNG states from a checkpoint's extra state (written by `save_checkpoint`)."""
        own = extra.get(f"engine/rng/rank{self.rank}/torch")
        if own is not None:
            torch.set_rng_state(own)
        cuda = extra.get(f"engine/rng/rank{self.rank}/cuda")
        if cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(cuda, device)

    def _rank_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states, for rank 0 to save (dropout masks differ per rank)."""
        if self._group is None:
            return {}
        import torch.distributed as dist

        own = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            own["cuda"] = torch.cuda.get_rng_state()
        out: dict[str, torch.Tensor] = {}
        for kind, state in own.items():
            gathered = [torch.empty_like(state) for _ in range(self.world)]
            dist.all_gather(gathered, state, group=self._group)
            out.update({f"engine/rng/rank{r}/{kind}": g for r, g in enumerate(gathered)})
        return out


def _cpu_group(world: int) -> Any:
    """A gloo group for the loop's small CPU-side agreements (stop requests, RNG states), or None alone.

    Collectives on it never wait for the GPU, so they cost no host-device sync.
    """
    if world == 1:
        return None
    import torch.distributed as dist

    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


# ------------------------------------------------------------------------------------ setup: accelerate
def accelerate_plugins(dist: DistributedSettings, train: TrainSettings) -> dict[str, Any]:
    """accelerate's plugin for distributed.strategy fsdp or deepspeed; ddp and auto need none."""
    if dist.strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        fsdp = dist.fsdp
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=1,
            reshard_after_forward=fsdp.sharding_strategy.upper(),
            auto_wrap_policy="transformer_based_wrap" if fsdp.auto_wrap == "decoder_layers" else "no_wrap",
            cpu_offload=fsdp.cpu_offload,
            use_orig_params=True,  # frozen and trainable weights may share a unit (adapters)
            sync_module_states=False,  # every rank loaded the same weights
            state_dict_type="FULL_STATE_DICT",
        )
        # accelerate's FSDP1 wrapper reads the deprecated `sharding_strategy` first, whose default would win.
        plugin.sharding_strategy = plugin.reshard_after_forward
        return {"fsdp_plugin": plugin}
    if dist.strategy == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        ds = dist.deepspeed
        plugin = DeepSpeedPlugin(
            zero_stage=ds.zero_stage,
            gradient_accumulation_steps=train.gradient_accumulation,
            gradient_clipping=train.max_grad_norm or 0.0,
            offload_optimizer_device="cpu" if ds.offload_optimizer else "none",
            zero3_save_16bit_model=ds.zero_stage == 3,
        )
        # No dataloader goes through accelerate, so deepspeed is told the micro batch here; and it may step
        # a torch optimizer on the CPU when offloading (its own CPUAdam is faster but compiles at start).
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train.micro_batch_size
        plugin.deepspeed_config["zero_force_ds_cpu_optimizer"] = False
        return {"deepspeed_plugin": plugin}
    return {}


def shape_fsdp_units(accelerator: Any, model: Any, *, by_layer: bool) -> None:
    """How FSDP cuts the model into units, set on accelerate's plugin before `prepare`.

    The output layer stays whole on every rank (an FSDP-ignored module, as under DDP): the loss projects
    hidden states through it after the model's forward, when FSDP has put its weights back into shards.
    By layer: each decoder layer is a unit and, apart from them, each module with trainable weights, so
    frozen low-precision weights and trainable fp32 ones never share one flat tensor (FSDP needs one dtype).
    """
    head = model.get_output_embeddings()
    if any(p.requires_grad for p in head.parameters()):
        raise UserError(
            "distributed.strategy: fsdp cannot train the output layer (lm_head): the loss uses it outside the "
            "model's forward, so it stays unsharded and its gradients would not be combined across ranks; "
            "leave lm_head out of adapter.target_modules, or use strategy ddp or deepspeed"
        )
    plugin = accelerator.state.fsdp_plugin
    plugin.ignored_modules = [head]
    if by_layer:
        plugin.auto_wrap_policy = fsdp_units(model)
    return_decoder_output(model)


def return_decoder_output(model: Any) -> None:
    """Make `model`'s forward also return its decoder's last hidden state (as `hidden_states`).

    FSDP starts its backward bookkeeping (the callback that waits for every gradient reduce-scatter) from
    hooks on the tensors its root module returns. The loss does not use the returned logits: it projects
    the decoder's hidden state itself (loss.py), so that is the tensor the root must return.
    """
    from orpo_cli.training.forward import last_hidden

    seen: dict[str, Any] = {}

    def keep(_module: Any, _inputs: Any, output: Any) -> None:
        seen["hidden"] = last_hidden(output)

    def expose(_module: Any, _inputs: Any, output: Any) -> None:
        hidden = seen.pop("hidden", None)
        if hidden is not None and getattr(output, "hidden_states", None) is None:
            output.hidden_states = (hidden,)

    model.get_decoder().register_forward_hook(keep)
    model.register_forward_hook(expose)


def fsdp_units(model: Any) -> Any:
    """FSDP's wrap policy: each decoder layer (the model's `_no_split_modules`) is a unit, and so is each
    module that owns trainable parameters (LoRA's A/B, ReFT's interventions), whatever the adapter."""
    from torch.distributed.fsdp.wrap import CustomPolicy

    layer_names = set(getattr(model, "_no_split_modules", None) or [])

    def is_unit(module: Any) -> bool:
        return type(module).__name__ in layer_names or any(
            p.requires_grad for p in module.parameters(recurse=False)
        )

    return CustomPolicy(is_unit)


# ------------------------------------------------------------------------------- sharded state, whole
def gathered_trainable_weights(
    model: nn.Module, accelerator: Any, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The trainable weights `names` (as the unwrapped model names them), whole, on rank 0's CPU (other
    ranks may get {}); call it on every rank.

    For models whose weights are sharded (FSDP, DeepSpeed ZeRO-3); elsewhere `trainable_state` of the
    unwrapped model is the same thing without the communication.
    """
    if _is_deepspeed(accelerator):  # ZeRO-3: deepspeed gathers the 16-bit weights for rank 0
        full = accelerator.get_state_dict(model)
        return _trainable_only(full, set(names)) if accelerator.is_main_process else {}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return _trainable_only(
        get_model_state_dict(model, options=_whole_on_rank0(accelerator.device)), set(names)
    )


def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _whole_on_rank0(device: torch.device) -> Any:
    """State-dict options for whole tensors, on rank 0's CPU when training on GPUs.

    Not ignore_frozen_params: with cpu_offload it fails on the other ranks (torch 2.15), and FSDP gathers
    every unit's weights either way. No cpu_offload when the weights already live on the CPU: there it
    returns views of a gather buffer that the next tensor overwrites (torch 2.15, FSDP1).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=device.type != "cpu")


def _trainable_only(weights: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in weights.items() if k in names}


def _full_state(
    model: nn.Module, optimizer: Any, names: list[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Trainable weights and optimizer state of an FSDP model, whole, on rank 0's CPU (collective).

    The optimizer state comes keyed by parameter name; it is re-keyed by position in `names` (the
    optimizer's order), the layout of `optimizer.state_dict()` that checkpoints hold.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    device = next(model.parameters()).device
    inner = getattr(optimizer, "optimizer", optimizer)
    weights, by_name = get_state_dict(model, inner, options=_whole_on_rank0(device))
    weights = _trainable_only(weights, set(names))
    if not by_name:
        return weights, {}
    index = {name: i for i, name in enumerate(names)}
    return weights, {
        "state": {index[k]: v for k, v in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in by_name["param_groups"]],
    }


def _load_full_state(
    model: nn.Module,
    optimizer: Any,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    names: list[str],
) -> None:
    """Scatter whole trainable weights and optimizer state (as `_full_state` gives them) into FSDP shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    by_name = {
        "state": {names[int(i)]: v for i, v in optimizer_state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]
        ],
    }
    set_state_dict(
        model,
        getattr(optimizer, "optimizer", optimizer),
        model_state_dict=weights,
        optim_state_dict=by_name,
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
