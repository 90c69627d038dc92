"""The one training loop, for every adapter: forward, loss, backward, step, log, eval, save, in that order.

The same loop runs as one process or as one of many (DDP, FSDP or DeepSpeed through accelerate): each
rank reads its shard of every global batch, the loss is normalised over the whole global batch, metrics
are summed over ranks before they are logged, only rank 0 writes, and a stop request is agreed on by all.
What differs between the strategies (loading and saving sharded state, whether a checkpoint can be
resumed, the ranks' agreements) is the `Strategy` chosen at setup (training/strategy.py): the loop calls it
and never asks which strategy it runs under.
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
from orpo_cli.errors import RunFailed, UserError, stage
from orpo_cli.progress import Reporter
from orpo_cli.recipe import OrpoSettings, TrainSettings
from orpo_cli.rundir import RunDir
from orpo_cli.training.batching import Layout, collate_pairs, count_tokens, micro_batches
from orpo_cli.training.checkpoint import WORLD_SIZE_KEY, latest_checkpoint
from orpo_cli.training.forward import orpo_forward
from orpo_cli.training.loss import count_normalizers
from orpo_cli.training.metrics import MetricTally, preference_metrics
from orpo_cli.training.signals import StopRequests
from orpo_cli.training.strategy import Strategy


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
    strategy: Strategy,
    pad_token_id: int,
    layout: Layout,
    seed: int,
    resume: bool,
    reporter: Reporter,
) -> FitResult:
    """Train `model` (adapter attached) with ORPO; checkpoints and metrics go to `run`.

    `layout`: the batch layout chosen at setup (forward.batch_layout); every batch, train and eval, uses it.
    `strategy`: what the distributed strategy changes (training/strategy.py), chosen at setup too.
    """
    from transformers import get_scheduler

    device = accelerator.device
    world, rank = strategy.world, strategy.rank
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
    reporter.note(
        f"{world} process{'es' if world > 1 else ''} × micro batch {train.micro_batch_size} × accumulation "
        f"{accum} = global batch of {global_batch} pairs per optimizer step"
    )

    found = None
    if resume:
        with accelerator.main_process_first():  # rank 0 clears a killed run's temporaries first
            found = latest_checkpoint(run)
        strategy.check_same_everywhere(found[0] if found else -1)
        if found is None:  # every checkpoint incomplete or corrupted (each was named in a warning)
            raise UserError(
                f"--resume: {run.checkpoints} holds no usable checkpoint; nothing to continue from: start the run "
                f"again with --force (replaces {run.root}) instead of --resume"
            )
    # Wrapped for the strategy, the checkpoint restored into the model or into its shards, as it requires.
    model, optimizer, step, extra = strategy.prepare(model, optimizer, found[1] if found else None, names)
    if found is not None and extra is not None:
        saved_world = int(extra.get(WORLD_SIZE_KEY, 1))
        if saved_world != world:
            raise UserError(
                f"--resume: {found[1]} was written by {saved_world} processes and this run has {world}; "
                "resume with the same number"
            )
        strategy.restore_rng(extra, device)
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
        strategy.save_checkpoint(
            run, at_step, model, optimizer, names, lambda: {**tally.state(), WORLD_SIZE_KEY: torch.tensor(world)},
            train.keep_checkpoints,
        )

    with StopRequests(announce=accelerator.is_main_process) as stop:
        while step < total_steps:
            step += 1
            # ---- one optimizer step: `accum` micro-batches, normalised over the whole window
            chunks = [next(stream) for _ in range(accum)]
            window = [_to_device(collate_pairs(chunk, pad_token_id, layout=layout), device) for chunk in chunks]
            tokens_since_log += sum(count_tokens(chunk) for chunk in chunks)
            num_tokens, num_pairs = _window_normalizers(window, orpo.nll_on_prompt, strategy)
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
            step_loss, step_nll = strategy.reduce_sum(step_loss), strategy.reduce_sum(step_nll)
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
                tokens = strategy.reduce_sum(torch.tensor(tokens_since_log, device=device))
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
            if strategy.any_rank(stop.requested):
                if not saved:
                    save(step)
                reporter.finish()
                raise strategy.stopped(step, run)
            clock += time.perf_counter() - paused
    reporter.finish()
    return result


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
    window: list[dict[str, torch.Tensor]], nll_on_prompt: bool, strategy: Strategy
) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL tokens and pairs of the whole optimizer step, over every micro-batch and every rank."""
    counts = [count_normalizers(b, nll_on_prompt) for b in window]
    device = strategy.accelerator.device
    tokens = strategy.reduce_sum(torch.as_tensor(sum(c[0] for c in counts), device=device))
    pairs = strategy.reduce_sum(torch.as_tensor(sum(c[1] for c in counts), device=device))
    return tokens, pairs


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
