"""The one training loop, for every adapter: forward, loss, backward, step, log, eval, save, in that order.

The same loop runs as one process or as one of many (DDP, FSDP or DeepSpeed through accelerate): each
rank reads its shard of every global batch, the loss is normalised over the whole global batch, metrics
are summed over ranks before they are logged, only rank 0 writes, and a stop request is agreed on by all.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orpo_cli.adapters import Adapter
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.errors import Interrupted, RunFailed, UserError, stage
from orpo_cli.progress import Reporter
from orpo_cli.recipe import OrpoSettings, TrainSettings
from orpo_cli.rundir import RunDir
from orpo_cli.training.batching import Layout, collate_pairs, count_tokens, micro_batches
from orpo_cli.training.checkpoint import (
    WORLD_SIZE_KEY,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    write_checkpoint,
)
from orpo_cli.training.forward import orpo_forward
from orpo_cli.training.loss import count_normalizers
from orpo_cli.training.metrics import MetricTally, preference_metrics
from orpo_cli.training.signals import StopRequests


@dataclass
class FitResult:
    steps: int
    model: nn.Module | None = None  # as prepared by accelerate (DDP/FSDP/DeepSpeed-wrapped): save from it
    first_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)


def plan_steps(num_pairs: int, train: TrainSettings, world_size: int = 1) -> tuple[int, int]:
    """(micro-batches per epoch per rank, total optimizer steps)."""
    per_epoch = math.ceil(num_pairs / (train.micro_batch_size * world_size))
    if train.max_steps is not None:
        return per_epoch, train.max_steps
    return per_epoch, max(1, math.ceil(train.epochs * per_epoch / train.gradient_accumulation))


def fit(
    *,
    model: nn.Module,
    adapter: Adapter,
    train_pairs: Sequence[TokenizedPair],
    eval_pairs: Sequence[TokenizedPair],
    train: TrainSettings,
    orpo: OrpoSettings,
    run: RunDir,
    accelerator: Any,
    pad_token_id: int,
    layout: Layout,
    seed: int,
    resume: bool,
    reporter: Reporter,
) -> FitResult:
    """Train `model` (adapter attached) with ORPO; checkpoints and metrics go to `run`.

    `layout`: the batch layout chosen at setup (forward.batch_layout); every batch, train and eval, uses it.
    """
    from transformers import get_scheduler

    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch, total_steps = plan_steps(len(train_pairs), train, world)
    accum = train.gradient_accumulation
    global_batch = train.micro_batch_size * accum * world
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's order
    optimizer = _build_optimizer(params, train)
    warmup = train.warmup_steps if train.warmup_steps is not None else round(train.warmup_ratio * total_steps)
    scheduler = get_scheduler(
        train.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    tally = MetricTally(device)
    result = FitResult(steps=total_steps)
    sharded = shards_weights(accelerator)  # FSDP/ZeRO-3: no rank holds the whole model
    checkpoints = not _is_deepspeed(accelerator)  # ZeRO's optimizer shards have no place in a checkpoint
    cpu_group = _cpu_group(world)
    reporter.note(
        f"{world} process{'es' if world > 1 else ''} × micro batch {train.micro_batch_size} × accumulation "
        f"{accum} = global batch of {global_batch} pairs per optimizer step"
    )
    if not checkpoints:
        reporter.note("deepspeed: no resumable checkpoints are written (see docs/distributed.md)")

    step, extra, found = 0, None, None
    if resume:
        with accelerator.main_process_first():  # rank 0 clears a killed run's temporaries first
            found = latest_checkpoint(run)
        _check_same_everywhere(found[0] if found else -1, cpu_group)
    if found is not None and not sharded:  # into the plain model, before the wrappers
        step, extra = load_checkpoint(found[1], accelerator.unwrap_model(model), optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    if found is not None and sharded:  # into the shards, after the wrappers made them
        step, weights, optimizer_state, extra = read_checkpoint(found[1])
        _load_full_state(model, optimizer, weights, optimizer_state, names)
    if found is not None and extra is not None:
        saved_world = int(extra.get(WORLD_SIZE_KEY, 1))
        if saved_world != world:
            raise UserError(
                f"--resume: {found[1]} was written by {saved_world} processes and this run has {world}; "
                "resume with the same number"
            )
        _restore_rank_rng(extra, rank, device)
        tally.load_state(extra, rank)
        with warnings.catch_warnings():  # torch warns about stepping a scheduler before its optimizer
            warnings.simplefilter("ignore")
            for _ in range(step):  # the schedule is a pure function of the step: replay it
                scheduler.step()
        if accelerator.is_main_process:
            run.truncate_metrics(step)
        reporter.note(f"resumed from {found[1].name} (step {step} of {total_steps})")
    model.train()
    result.model = model

    def evaluate(at_step: int) -> dict[str, float]:
        # Every rank evaluates every pair: the metrics are exactly those of one process, and all ranks run
        # the same forwards (FSDP and ZeRO-3 gather weights inside them, so they must).
        metrics = preference_metrics(
            model,
            adapter,
            eval_pairs,
            batch_size=train.eval_batch_size or train.micro_batch_size,
            lam=orpo.lam,
            nll_on_prompt=orpo.nll_on_prompt,
            pad_token_id=pad_token_id,
            device=device,
            layout=layout,
            prefix="eval_",
        )
        _write(run, accelerator, {"step": at_step, **metrics})
        reporter.eval(at_step, metrics)
        return metrics

    if step == 0 and eval_pairs:
        result.first_eval = evaluate(0)  # before any update, so the gain is visible
    stream = micro_batches(train_pairs, train.micro_batch_size, seed, step * accum, rank, world)
    first_bad_step = torch.full((), -1, device=device)  # set on device: no host sync per step
    tokens_since_log, clock = 0, time.perf_counter()
    reporter.start(total_steps, step)

    def save(at_step: int) -> None:  # called on every rank: gathering state is collective
        _stop_if_diverged(first_bad_step, run)  # never save a NaN adapter
        if not checkpoints:
            return
        extra = {**tally.state(), WORLD_SIZE_KEY: torch.tensor(world), **_rank_rng(cpu_group, world)}
        if sharded:
            weights, optimizer_state = _full_state(model, optimizer, names)
            if accelerator.is_main_process:
                write_checkpoint(run, at_step, weights, optimizer_state, extra, train.keep_checkpoints)
        elif accelerator.is_main_process:
            save_checkpoint(
                run, at_step, accelerator.unwrap_model(model), optimizer, extra, train.keep_checkpoints
            )
        accelerator.wait_for_everyone()

    with StopRequests(announce=accelerator.is_main_process) as stop:
        while step < total_steps:
            step += 1
            # ---- one optimizer step: `accum` micro-batches, normalised over the whole window
            chunks = [next(stream) for _ in range(accum)]
            window = [_to_device(collate_pairs(chunk, pad_token_id, layout=layout), device) for chunk in chunks]
            tokens_since_log += sum(count_tokens(chunk) for chunk in chunks)
            num_tokens, num_pairs = _window_normalizers(window, orpo.nll_on_prompt, accelerator)
            step_loss = torch.zeros((), device=device)
            step_nll = torch.zeros((), device=device)
            for batch in window:
                # accumulate(): gradients are synchronised across ranks only on the window's last micro-batch
                with accelerator.accumulate(model), accelerator.autocast():
                    terms = orpo_forward(
                        model,
                        adapter,
                        batch,
                        lam=orpo.lam,
                        nll_on_prompt=orpo.nll_on_prompt,
                        num_nll_tokens=num_tokens,
                        num_pairs=num_pairs,
                        layout=layout,
                    )
                    # The loss is already the mean over the global batch; accelerate divides it by the
                    # accumulation steps and DDP/FSDP/DeepSpeed average gradients over ranks: undo both.
                    accelerator.backward(terms.loss * (world * accum))
                tally.add_pairs(terms)
                step_loss += terms.loss.detach()
                step_nll += terms.nll.detach()
            # All of the wrapped model's parameters (frozen ones have no gradient and count for nothing):
            # given exactly these, accelerate lets FSDP take the norm over every rank's shards.
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), train.max_grad_norm)
                if train.max_grad_norm
                else None
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss, step_nll = _reduce_sum(step_loss, accelerator), _reduce_sum(step_nll, accelerator)
            tally.add_step(step_loss, step_nll)
            first_bad_step = torch.where(
                (first_bad_step < 0) & ~torch.isfinite(step_loss), step, first_bad_step
            )
            reporter.advance(step)

            # ---- log (the only host sync of the loop, every log_every steps)
            last = step == total_steps
            if step % train.log_every == 0 or last:
                _stop_if_diverged(first_bad_step, run)
                elapsed = time.perf_counter() - clock
                tokens = _reduce_sum(torch.tensor(tokens_since_log, device=device), accelerator)
                record = {
                    "step": step,
                    "epoch": round(step * accum / per_epoch, 4),
                    **tally.compute(orpo.lam),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": round(int(tokens) / max(elapsed, 1e-9), 1),
                    "global_batch": global_batch,
                }
                _write(run, accelerator, record)
                reporter.log(step, record)
                tally.reset()
                tokens_since_log, clock = 0, time.perf_counter()
            paused = time.perf_counter()  # eval and save time does not count towards tokens/s
            # ---- eval
            if eval_pairs and (last or (train.eval_every and step % train.eval_every == 0)):
                result.last_eval = evaluate(step)
            # ---- save
            saved = last or bool(train.save_every and step % train.save_every == 0)
            if saved:
                save(step)
            # SIGINT/SIGTERM: finish this step, keep it, and leave cleanly. A signal may reach one rank
            # before another, so the ranks agree (every step, on the CPU) and all stop at the same step.
            if _any_rank(stop.requested, cpu_group):
                if not saved:
                    save(step)
                reporter.finish()
                if not checkpoints:
                    raise RunFailed(
                        f"interrupted at step {step}; deepspeed runs keep no checkpoint to resume from"
                    )
                raise Interrupted(step, run.checkpoint(step))
            clock += time.perf_counter() - paused
    reporter.finish()
    return result


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


@stage("building the optimizer", blame="train.optimizer")
def _build_optimizer(params: list[nn.Parameter], train: TrainSettings) -> torch.optim.Optimizer:
    kwargs = {"lr": train.lr, "betas": train.adam_betas, "weight_decay": train.weight_decay}
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    factory = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
    }[train.optimizer]
    return factory(params, **kwargs)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _window_normalizers(
    window: list[dict[str, torch.Tensor]], nll_on_prompt: bool, accelerator: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL tokens and pairs of the whole optimizer step, over every micro-batch and every rank."""
    counts = [count_normalizers(b, nll_on_prompt) for b in window]
    tokens = _reduce_sum(torch.as_tensor(sum(c[0] for c in counts), device=accelerator.device), accelerator)
    pairs = _reduce_sum(torch.as_tensor(sum(c[1] for c in counts), device=accelerator.device), accelerator)
    return tokens, pairs


def _reduce_sum(value: torch.Tensor, accelerator: Any) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(value.clone(), reduction="sum")


def _stop_if_diverged(first_bad_step: torch.Tensor, run: RunDir) -> None:
    bad = int(first_bad_step)
    if bad >= 0:
        raise RunFailed(
            f"the loss became NaN/inf at step {bad}; stopped without saving it. Likely causes: learning rate too "
            "high (lower train.lr), fp16 overflow (use bf16 or fp32), or a broken data row. The checkpoints "
            f"before it in {run.checkpoints} are kept: --resume continues from the newest (train.lr and "
            "train.max_grad_norm may change), or start again with --force if the loss had been climbing for a while"
        )


def _write(run: RunDir, accelerator: Any, record: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        run.append_metrics(record)
        accelerator.log(
            {k: v for k, v in record.items() if isinstance(v, float | int) and k != "step"},
            step=record["step"],
        )


# ------------------------------------------------------------------------------------------ several ranks
def _is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def shards_weights(accelerator: Any) -> bool:
    """True when no rank holds the whole model (FSDP, DeepSpeed ZeRO-3): its state must be gathered."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    return _is_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3


def _cpu_group(world: int) -> Any:
    """A gloo group for the loop's small CPU-side agreements (stop requests, RNG states), or None alone.

    Collectives on it never wait for the GPU, so they cost no host-device sync.
    """
    if world == 1:
        return None
    import torch.distributed as dist

    return dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def _any_rank(flag: bool, group: Any) -> bool:
    """Whether `flag` is set on any rank (a one-number all-reduce on the CPU); the same answer on all."""
    if group is None:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _check_same_everywhere(step: int, group: Any) -> None:
    """Every rank must resume from the same checkpoint (it reads it from a filesystem they all see)."""
    if group is None:
        return
    import torch.distributed as dist

    low, high = torch.tensor([step]), torch.tensor([step])
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if int(low) != int(high):
        raise UserError(
            "--resume: the processes found different checkpoints (steps "
            f"{int(low) if int(low) >= 0 else 'none'} and {int(high)}); on several machines output_dir must be "
            "on storage that every machine sees (e.g. NFS)"
        )


def _rank_rng(group: Any, world: int) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, for rank 0 to save (dropout masks differ per rank)."""
    if group is None:
        return {}
    import torch.distributed as dist

    own = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        own["cuda"] = torch.cuda.get_rng_state()
    out: dict[str, torch.Tensor] = {}
    for kind, state in own.items():
        gathered = [torch.empty_like(state) for _ in range(world)]
        dist.all_gather(gathered, state, group=group)
        out.update({f"engine/rng/rank{r}/{kind}": g for r, g in enumerate(gathered)})
    return out


def _restore_rank_rng(extra: dict[str, torch.Tensor], rank: int, device: torch.device) -> None:
    own = extra.get(f"engine/rng/rank{rank}/torch")
    if own is not None:
        torch.set_rng_state(own)
    cuda = extra.get(f"engine/rng/rank{rank}/cuda")
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)


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
