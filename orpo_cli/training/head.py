"""The output head, in chunks: the fp32 log-probability of each target token from the hidden rows that predict
it, without ever forming the full ``[rows, L, V]`` logits.

A frozen ``nn.Linear`` head (LoRA, ReFT) forms each row's gradient while its chunk's logits exist (no
recomputation); any other head (trainable, wrapped, quantized) runs its chunks under activation checkpointing.
The ORPO terms (loss.py) reduce what :func:`target_logps` returns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 256
"""Rows projected onto the vocabulary at a time: 256 x 32k fp32 logits are 33 MB; larger chunks gain no
speed on a CPU (docs/performance.md) and cost memory."""

STATS_BLOCK_ELEMENTS = 1 << 18
"""On a CPU, a chunk's softmax statistics (max, shifted exp, sum) are taken over blocks of rows of about this
many logits (1 MB in fp32), so the three passes read a block from the core's L2 cache, not the whole 33-50 MB
chunk from memory three times (what that saves: docs/performance.md). Row by row they are the same operations,
so the same numbers."""


def _chunk_target_logps(
    hidden_rows: torch.Tensor,
    target_ids: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Project ``hidden_rows [n, H]`` with ``lm_head`` and return the fp32 log-prob of each target ``[n]``."""
    logits = lm_head(hidden_rows).float()
    picked = torch.gather(logits, -1, target_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _FrozenHeadLogProbs(torch.autograd.Function):
    """Target log-probabilities through a frozen linear head, with the gradient formed in the forward pass.

    ``d log p(t | h) / d h = W[t] - softmax(W h + b) @ W``: each chunk's logits are turned into that
    ``[n, H]`` row gradient while they exist, and the backward pass only scales it by the incoming
    gradient. Two matmuls per row, as for plain autograd, and none recomputed (checkpointing would
    need three), while only one chunk's ``[chunk, V]`` logits ever exist.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target_ids, chunk_size, need_grad):  # type: ignore[override]
        # need_grad comes from the caller: inside forward grad mode is off, and ctx.needs_input_grad says
        # True under torch.no_grad() too, where no backward will ever come.
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        row_grads = torch.empty_like(hidden) if need_grad else None
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            # Autocast keeps no cast copy of a frozen weight: left to it, every chunk's two matmuls would each
            # make a fresh copy of the [V, H] head (1 GB in bf16 for Llama-3). Cast once per call instead.
            dtype = torch.get_autocast_dtype(device_type)
            weight = weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        # One [chunk, V] logits buffer for every chunk: a fresh one per chunk would be a fresh block of tens of
        # MB each time (above glibc's largest mmap threshold on a CPU, so mapped and zeroed again: see
        # docs/performance.md).
        logits = torch.empty(min(chunk_size, hidden.shape[0]), weight.shape[0], dtype=weight.dtype, device=hidden.device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                _head_chunk(hidden, weight, bias, target_ids, start, start + chunk_size, out, row_grads, logits)
        if need_grad:
            ctx.save_for_backward(row_grads)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (row_grads,) = ctx.saved_tensors
        return grad_out.unsqueeze(-1).to(row_grads.dtype) * row_grads, None, None, None, None, None


def _head_chunk(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    start: int,
    stop: int,
    out: torch.Tensor,
    row_grads: torch.Tensor | None,
    buffer: torch.Tensor,
) -> None:
    """Rows ``start:stop`` of :class:`_FrozenHeadLogProbs`: their log-probs into `out`, gradients into `row_grads`.

    The chunk's logits are written into (the first rows of) `buffer`, ``[>= stop - start, V]``.
    """
    ids = target_ids[start:stop]
    logits = _project(hidden[start:stop].to(weight.dtype), weight, bias, buffer).float()
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    # Three passes over the [chunk, V] logits (max, shifted exp in place, sum) instead of logsumexp's and a
    # softmax's separate ones; the softmax's 1/sum is applied to the [chunk, H] product.
    exp = logits
    peak, total = _softmax_stats(exp)
    out[start:stop] = picked - (peak + total.log()).squeeze(-1)
    if row_grads is not None:
        row_grads[start:stop] = weight[ids] - (exp.to(weight.dtype) @ weight) / total


def _softmax_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's max and ``sum(exp(row - max))``, ``[n, 1]`` each; `logits` is left holding ``exp(row - max)``.
    On a CPU a block of rows at a time (:data:`STATS_BLOCK_ELEMENTS`); elsewhere the whole chunk at once."""
    rows = logits.shape[0]
    step = max(1, STATS_BLOCK_ELEMENTS // max(logits.shape[-1], 1)) if logits.device.type == "cpu" else max(rows, 1)
    peak = logits.new_empty(rows, 1)
    total = logits.new_empty(rows, 1)
    for a in range(0, rows, step):
        block, block_peak = logits[a : a + step], peak[a : a + step]
        torch.amax(block, dim=-1, keepdim=True, out=block_peak)
        block.sub_(block_peak).exp_()
        torch.sum(block, dim=-1, keepdim=True, out=total[a : a + step])
    return peak, total


def _project(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, buffer: torch.Tensor) -> torch.Tensor:
    """``rows @ weight.T + bias``, ``[n, V]``, written into the first n rows of `buffer`."""
    out = buffer[: rows.shape[0]]
    if bias is None:
        return torch.mm(rows, weight.t(), out=out)
    return torch.addmm(bias, rows, weight.t(), out=out)


def _frozen_linear(lm_head: Callable[[torch.Tensor], torch.Tensor]) -> nn.Linear | None:
    """`lm_head` when it is a plain, frozen, unhooked ``nn.Linear`` (the fused path's condition), else None.

    Subclasses (bitsandbytes, PEFT-wrapped heads), trainable heads (full fine-tuning) and heads whose
    weights are gathered by hooks (DeepSpeed ZeRO-3) take the generic checkpointed path.
    """
    if type(lm_head) is not nn.Linear:
        return None
    params = [lm_head.weight] + ([lm_head.bias] if lm_head.bias is not None else [])
    if any(p.requires_grad or hasattr(p, "ds_id") for p in params):
        return None
    if lm_head._forward_hooks or lm_head._forward_pre_hooks or lm_head.weight.dim() != 2:
        return None
    return lm_head


def target_logps(
    hidden_rows: torch.Tensor,
    target_ids: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    chunk_size: int = CHUNK_ROWS,
) -> torch.Tensor:
    """``log_softmax(lm_head(hidden_rows)).gather(target_ids)`` in fp32, ``[n]``, ``chunk_size`` rows at a time.

    A frozen ``nn.Linear`` head takes :class:`_FrozenHeadLogProbs`; any other head (trainable, wrapped,
    quantized) is called as a function on each chunk under non-reentrant ``torch.utils.checkpoint``, so
    only the chunk's inputs are kept and its logits are recomputed in the backward pass.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    head = _frozen_linear(lm_head)
    if head is not None:
        need_grad = torch.is_grad_enabled() and hidden_rows.requires_grad
        return _FrozenHeadLogProbs.apply(hidden_rows, head.weight, head.bias, target_ids, chunk_size, need_grad)
    use_checkpoint = torch.is_grad_enabled()
    pieces = []
    for start in range(0, hidden_rows.shape[0], chunk_size):
        h, t = hidden_rows[start : start + chunk_size], target_ids[start : start + chunk_size]
        if use_checkpoint:
            pieces.append(checkpoint(_chunk_target_logps, h, t, lm_head, use_reentrant=False))
        else:
            pieces.append(_chunk_target_logps(h, t, lm_head))
    return torch.cat(pieces) if pieces else hidden_rows.new_zeros((0,), dtype=torch.float32)
