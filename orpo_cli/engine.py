"""The one training loop, for every adapter: forward, loss, backward, step, log, eval, save, in that order."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orpo_cli.adapters import Adapter
from orpo_cli.batching import collate_pairs, count_tokens
from orpo_cli.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from orpo_cli.data import TokenizedPair
from orpo_cli.errors import Interrupted, RunFailed
from orpo_cli.evaluate import preference_metrics
from orpo_cli.forward import orpo_forward
from orpo_cli.loss import count_normalizers
from orpo_cli.metrics import MetricTally
from orpo_cli.progress import Reporter
from orpo_cli.recipe import OrpoSettings, TrainSettings
from orpo_cli.rundir import RunDir
from orpo_cli.signals import StopRequests


@dataclass
class FitResult:
    steps: int
    first_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    last_train: dict[str, float] = field(default_factory=dict)


def plan_steps(num_pairs: int, train: TrainSettings, world_size: int = 1) -> tuple[int, int]:
    """(micro-batches per epoch per rank, total optimizer steps)."""
    per_epoch = math.ceil(num_pairs / (train.micro_batch_size * world_size))
    if train.max_steps is not None:
        return per_epoch, train.max_steps
    return per_epoch, max(1, math.ceil(train.epochs * per_epoch / train.gradient_accumulation))


def micro_batches(
    pairs: Sequence[TokenizedPair],
    micro_batch_size: int,
    seed: int,
    start: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[list[TokenizedPair]]:
    """Micro-batches of an endless stream of epochs, each a seeded permutation, from global index `start`.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    """
    step_size = micro_batch_size * world_size
    per_epoch = math.ceil(len(pairs) / step_size)
    index = start
    order: list[int] = []
    order_epoch = -1
    while True:
        epoch, position = divmod(index, per_epoch)
        if epoch != order_epoch:
            generator = torch.Generator().manual_seed(seed + epoch)
            order = torch.randperm(len(pairs), generator=generator).tolist()
            order_epoch = epoch
        chunk = order[position * step_size : (position + 1) * step_size]
        yield [pairs[i] for i in chunk[rank::world_size]]
        index += 1


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
    seed: int,
    resume: bool,
    reporter: Reporter,
) -> FitResult:
    """Train `model` (adapter attached) with ORPO; checkpoints and metrics go to `run`."""
    from transformers import get_scheduler

    device = accelerator.device
    world = accelerator.num_processes
    per_epoch, total_steps = plan_steps(len(train_pairs), train, world)
    accum = train.gradient_accumulation
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _build_optimizer(params, train)
    warmup = train.warmup_steps if train.warmup_steps is not None else round(train.warmup_ratio * total_steps)
    scheduler = get_scheduler(
        train.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    tally = MetricTally(device)
    result = FitResult(steps=total_steps)

    step = 0
    if resume and (found := latest_checkpoint(run)) is not None:
        step, extra = load_checkpoint(found[1], accelerator.unwrap_model(model), optimizer)
        tally.load_state(extra)
        with warnings.catch_warnings():  # torch warns about stepping a scheduler before its optimizer
            warnings.simplefilter("ignore")
            for _ in range(step):  # the schedule is a pure function of the step: replay it
                scheduler.step()
        run.truncate_metrics(step)
        reporter.note(f"resumed from {found[1].name} (step {step} of {total_steps})")
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    def evaluate(at_step: int) -> dict[str, float]:
        metrics = preference_metrics(
            model,
            adapter,
            eval_pairs,
            batch_size=train.eval_batch_size or train.micro_batch_size,
            lam=orpo.lam,
            nll_on_prompt=orpo.nll_on_prompt,
            pad_token_id=pad_token_id,
            device=device,
            prefix="eval_",
        )
        _write(run, accelerator, {"step": at_step, **metrics})
        reporter.eval(at_step, metrics)
        return metrics

    if step == 0 and eval_pairs:
        result.first_eval = evaluate(0)  # before any update, so the gain is visible
    stream = micro_batches(
        train_pairs, train.micro_batch_size, seed, step * accum, accelerator.process_index, world
    )
    first_bad_step = torch.full((), -1, device=device)  # set on device: no host sync per step
    tokens_since_log, clock = 0, time.perf_counter()
    reporter.start(total_steps, step)

    def save(at_step: int) -> None:
        _stop_if_diverged(first_bad_step, run)  # never save a NaN adapter
        if accelerator.is_main_process:
            save_checkpoint(
                run,
                at_step,
                accelerator.unwrap_model(model),
                optimizer,
                tally.state(),
                train.keep_checkpoints,
            )
        accelerator.wait_for_everyone()

    with StopRequests() as stop:
        while step < total_steps:
            step += 1
            # ---- one optimizer step: `accum` micro-batches, normalised over the whole window
            chunks = [next(stream) for _ in range(accum)]
            window = [_to_device(collate_pairs(chunk, pad_token_id), device) for chunk in chunks]
            tokens_since_log += sum(count_tokens(chunk) for chunk in chunks)
            num_tokens, num_pairs = _window_normalizers(window, orpo.nll_on_prompt, accelerator)
            step_loss = torch.zeros((), device=device)
            step_nll = torch.zeros((), device=device)
            for i, batch in enumerate(window):
                sync = i == len(window) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                    terms = orpo_forward(
                        model,
                        adapter,
                        batch,
                        lam=orpo.lam,
                        nll_on_prompt=orpo.nll_on_prompt,
                        num_nll_tokens=num_tokens,
                        num_pairs=num_pairs,
                    )
                # DDP averages gradients over ranks; the loss is already a global mean, so undo that average.
                accelerator.backward(terms.loss * world)
                tally.add_pairs(terms)
                step_loss += terms.loss.detach()
                step_nll += terms.nll.detach()
            grad_norm = (
                accelerator.clip_grad_norm_(params, train.max_grad_norm) if train.max_grad_norm else None
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
                record = {
                    "step": step,
                    "epoch": round(step * accum / per_epoch, 4),
                    **tally.compute(orpo.lam),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": round(tokens_since_log * world / max(elapsed, 1e-9), 1),
                }
                _write(run, accelerator, record)
                reporter.log(step, record)
                result.last_train = record
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
            if stop.requested:  # SIGINT/SIGTERM: finish this step, keep it, and leave cleanly
                if not saved:
                    save(step)
                reporter.finish()
                raise Interrupted(step, run.checkpoint(step))
            clock += time.perf_counter() - paused
    reporter.finish()
    return result


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
            "high (lower train.lr), fp16 overflow (use bf16 or fp32), or a broken data row. The last good "
            f"checkpoint in {run.checkpoints} is kept; fix the cause and rerun with --resume"
        )


def _write(run: RunDir, accelerator: Any, record: dict[str, Any]) -> None:
    if accelerator.is_main_process:
        run.append_metrics(record)
        accelerator.log(
            {k: v for k, v in record.items() if isinstance(v, float | int) and k != "step"},
            step=record["step"],
        )
