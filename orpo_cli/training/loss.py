"""The ORPO objective (Hong et al. 2024, arXiv 2403.07691).

For a prompt ``x``, a chosen response ``y_w`` and a rejected response ``y_l``, with ``logp`` the *mean*
token log-probability of the response tokens::

    log_odds = (logp_w - logp_l) - (log1mexp(logp_w) - log1mexp(logp_l))
    L_OR     = -logsigmoid(log_odds)                       # averaged over pairs
    L_SFT    = NLL of the chosen response tokens            # token-level mean over the batch
    L        = L_SFT + lam * L_OR

With ``nll_on_prompt=True`` the NLL covers every non-padding token of the chosen sequence after the first
(prompt and response), which is exactly what TRL's ``ORPOTrainer`` does. The odds-ratio term always uses
the response-only mean log-probabilities.

Batch layout: :func:`orpo_loss` (the straightforward reference) reads the padded layout of
:func:`orpo_cli.training.batching.collate_pairs`: for ``B`` pairs, ``input_ids``, ``attention_mask`` and ``labels`` are
``[2B, L]``; rows ``0..B-1`` hold prompt + chosen response and rows ``B..2B-1`` prompt + rejected response,
right-padded. ``labels`` holds the token id at response positions and ``-100`` at prompt and padding
positions; it is *not* shifted (the logits at ``t-1`` predict ``labels[t]``). Where ``labels`` is not
``-100`` it must equal ``input_ids``. :func:`orpo_loss_from_hidden` reads either layout (padded, or
prefix-shared: one ``[prompt | chosen | rejected]`` row per pair) through the loss targets the collator
precomputes: the flat index of the hidden row that predicts each target token.

Two entry points compute the same quantities:

* :func:`orpo_loss` from the full logits ``[2B, L, V]``;
* :func:`orpo_loss_from_hidden` from the last hidden states and the ``lm_head``: only the rows that
  predict a loss target are projected, in chunks, so the full logits are never formed. A frozen
  ``nn.Linear`` head (LoRA, ReFT) forms each row's gradient while its chunk's logits exist (no
  recomputation); any other head runs its chunks under activation checkpointing (the chunked head is
  head.py).

Both accept global normalisers (see :func:`count_normalizers`) so that, under gradient accumulation,
the sum of the micro-batch losses equals the loss of the whole global batch.

All of the arithmetic after the vocabulary projection is in fp32. Nothing here syncs with the host on a
collated batch; a hand-made padded batch without precomputed targets has them found with a
data-dependent ``nonzero`` (one sync).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orpo_cli.training.head import CHUNK_ROWS, target_logps
from orpo_cli.training.metric_names import METRICS

__all__ = [
    "IGNORE_INDEX",
    "ORPOTerms",
    "count_normalizers",
    "log1mexp",
    "metrics",
    "odds_ratio",
    "orpo_loss",
    "orpo_loss_from_hidden",
]

IGNORE_INDEX = -100
"""Label value of positions that are not a target (prompt and padding), as in Hugging Face."""

_NEG_LN2 = -math.log(2.0)


Normalizer = int | float | torch.Tensor
"""A global normaliser: a Python number or a 0-dim tensor (may live on the device)."""


# --------------------------------------------------------------------------------------------------
# The odds ratio
# --------------------------------------------------------------------------------------------------


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Numerically stable ``log(1 - exp(x))`` for ``x < 0``, computed in (at least) fp32.

    Branches at ``-ln 2`` (Mächler 2012, "Accurately computing log(1 - exp(-|a|))"): for ``x < -ln 2``
    ``log1p(-exp(x))`` is accurate, for ``-ln 2 <= x < 0`` ``log(-expm1(x))`` is. Half-precision inputs
    are cast up to fp32 first; fp64 stays fp64. ``x = 0`` gives ``-inf``; ``x > 0`` gives NaN.

    Both branches of the ``torch.where`` are evaluated everywhere, but each one is finite (with a finite
    gradient) on the whole of ``x < 0``, so the unselected branch never injects NaN into the backward pass.
    """
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return torch.where(x < _NEG_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ORPO odds-ratio loss and log odds ratio (paper Eq. 4-7), in fp32.

    Args:
        chosen_logps: mean response-token log-probabilities of the chosen responses, ``[B]``, all ``< 0``.
        rejected_logps: the same for the rejected responses, ``[B]``.

    Returns:
        ``(l_or, log_odds)``, both ``[B]`` fp32: ``log_odds = log(odds(y_w) / odds(y_l))`` with
        ``odds(y) = P / (1 - P)``, and ``l_or = -logsigmoid(log_odds)``.
    """
    chosen = _to_fp32(chosen_logps)
    rejected = _to_fp32(rejected_logps)
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return -F.logsigmoid(log_odds), log_odds


# --------------------------------------------------------------------------------------------------
# Result and metrics
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ORPOTerms:
    """The pieces of the ORPO objective for one (micro-)batch.

    With the default normalisers (this batch's own counts), ``nll`` and ``or_loss`` are the batch means
    and ``loss`` equals TRL's per-batch loss. With global normalisers they are this micro-batch's
    *contributions* (sum over the batch divided by the global count), which add up over the
    micro-batches of an accumulation window.

    Attributes:
        loss: scalar ``nll + lam * or_loss``; what ``backward`` is called on.
        nll: scalar NLL (SFT) term.
        or_loss: scalar odds-ratio term ``L_OR`` (not yet multiplied by ``lam``).
        chosen_logps: ``[B]`` mean response log-probabilities of the chosen responses (fp32).
        rejected_logps: ``[B]`` the same for the rejected responses (fp32).
        log_odds: ``[B]`` log odds ratio per pair (fp32).
    """

    loss: torch.Tensor
    nll: torch.Tensor
    or_loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    log_odds: torch.Tensor

    def metrics(self, lam: float) -> dict[str, torch.Tensor]:
        """Shorthand for :func:`metrics` ``(self, lam)``."""
        return metrics(self, lam)


def metrics(terms: ORPOTerms, lam: float) -> dict[str, torch.Tensor]:
    """Training metrics under TRL's names, as detached 0-dim fp32 tensors (no host sync).

    The values follow ``ORPOTrainer.get_batch_loss_metrics``: rewards are ``lam * logps`` (TRL's
    ``beta``), accuracies compare the rewards (so ``lam = 0`` gives accuracy 0, as in TRL), and
    ``log_odds_chosen`` is the mean log odds ratio. ``loss`` and ``nll_loss`` are ``terms.loss`` and
    ``terms.nll`` (micro-batch contributions when global normalisers were used). TRL's
    ``logits/chosen`` and ``logits/rejected`` are not reported: the memory-lean path never forms the
    logits.
    """
    chosen = terms.chosen_logps.detach().float()
    rejected = terms.rejected_logps.detach().float()
    log_odds = terms.log_odds.detach().float()
    chosen_rewards = lam * chosen
    rejected_rewards = lam * rejected
    values = {
        "loss": terms.loss.detach().float(),
        "nll_loss": terms.nll.detach().float(),
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen.mean(),
        "logps/rejected": rejected.mean(),
        # Matches TRL exactly: TRL logs mean(logsigmoid(log_odds)) = -mean(L_OR) under the name
        # "log_odds_ratio" (it is not the log odds ratio itself; that one is "log_odds_chosen").
        "log_odds_ratio": F.logsigmoid(log_odds).mean(),
        "log_odds_chosen": log_odds.mean(),
    }
    return {name: values[name] for name in METRICS}  # the one table's names and order (a name it lacks: KeyError)


# --------------------------------------------------------------------------------------------------
# Masks and normalisers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Targets:
    """Shifted targets of a batch: position ``t`` of these ``[2B, L-1]`` tensors is predicted at ``t``."""

    num_pairs: int
    ids: torch.Tensor  # [2B, L-1] long: target token id, 0 where no target
    or_mask: torch.Tensor  # [2B, L-1] bool: response targets (odds-ratio term), both halves
    nll_mask: torch.Tensor  # [2B, L-1] bool: NLL targets, False on the rejected half
    any_mask: torch.Tensor  # [2B, L-1] bool: or_mask | nll_mask


def _to_fp32(x: torch.Tensor) -> torch.Tensor:
    """Cast half-precision tensors up to fp32; leave fp32/fp64 alone."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _num_pairs(batch: Mapping[str, torch.Tensor]) -> int:
    """Number of pairs ``B`` of a ``[2B, L]`` batch, after checking the layout."""
    input_ids = batch["input_ids"]
    if input_ids.dim() != 2 or input_ids.shape[0] % 2 != 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be [2B, L] with B >= 1, got shape {tuple(input_ids.shape)}")
    for key in ("attention_mask", "labels"):
        if batch[key].shape != input_ids.shape:
            raise ValueError(f"{key} has shape {tuple(batch[key].shape)}, expected {tuple(input_ids.shape)}")
    return input_ids.shape[0] // 2


def _nll_mask(batch: Mapping[str, torch.Tensor], num_pairs: int, nll_on_prompt: bool) -> torch.Tensor:
    """``[B, L-1]`` bool mask of the chosen rows' NLL targets (shifted)."""
    if nll_on_prompt:
        return batch["attention_mask"][:num_pairs, 1:] == 1
    return batch["labels"][:num_pairs, 1:] != IGNORE_INDEX


def _targets(batch: Mapping[str, torch.Tensor], nll_on_prompt: bool, device: torch.device) -> _Targets:
    """Build the shifted target ids and masks of a batch, on ``device``."""
    num_pairs = _num_pairs(batch)
    batch = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "labels")}
    labels = batch["labels"][:, 1:]
    or_mask = labels != IGNORE_INDEX
    nll_mask = torch.zeros_like(or_mask)
    nll_mask[:num_pairs] = _nll_mask(batch, num_pairs, nll_on_prompt)
    any_mask = or_mask | nll_mask
    # Response targets come from labels; prompt targets (nll_on_prompt only) from input_ids.
    ids = torch.where(or_mask, labels, batch["input_ids"][:, 1:])
    ids = torch.where(any_mask, ids, torch.zeros_like(ids)).long()
    return _Targets(num_pairs=num_pairs, ids=ids, or_mask=or_mask, nll_mask=nll_mask, any_mask=any_mask)


def count_normalizers(
    batch: Mapping[str, torch.Tensor], nll_on_prompt: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Count this batch's NLL target tokens and pairs, as 0-dim long tensors on the batch's device.

    No host sync: sum these over the micro-batches of an accumulation window and pass the totals as
    ``num_nll_tokens`` / ``num_pairs`` to :func:`orpo_loss` or :func:`orpo_loss_from_hidden`. Works on
    either layout of :func:`orpo_cli.training.batching.collate_pairs` (from the precomputed targets' shapes) and on
    hand-made padded batches (from their masks).

    Returns:
        ``(num_nll_tokens, num_pairs)``.
    """
    if "targets_chosen" in batch:
        device = batch["targets_chosen"].device
        count = batch["targets_chosen"].shape[1] + (batch["targets_prompt"].shape[1] if nll_on_prompt else 0)
        pairs = batch["prompt_lengths"].numel()
        # torch.full writes on the device: no host-to-device copy to wait for.
        return (
            torch.full((), count, dtype=torch.long, device=device),
            torch.full((), pairs, dtype=torch.long, device=device),
        )
    num_pairs = _num_pairs(batch)
    labels = batch["labels"]
    num_nll_tokens = _nll_mask(batch, num_pairs, nll_on_prompt).sum()
    return num_nll_tokens, torch.full((), num_pairs, dtype=torch.long, device=labels.device)


# --------------------------------------------------------------------------------------------------
# Reduction shared by both entry points
# --------------------------------------------------------------------------------------------------


def _reduce(
    token_logps: torch.Tensor,
    targets: _Targets,
    lam: float,
    num_nll_tokens: Normalizer | None,
    num_pairs: Normalizer | None,
) -> ORPOTerms:
    """Turn per-position target log-probabilities ``[2B, L-1]`` (fp32) into :class:`ORPOTerms`."""
    b = targets.num_pairs
    zero = torch.zeros((), dtype=token_logps.dtype, device=token_logps.device)

    or_logps = torch.where(targets.or_mask, token_logps, zero)
    mean_logps = or_logps.sum(-1) / targets.or_mask.sum(-1)  # rows without a response token give NaN
    chosen_logps, rejected_logps = mean_logps[:b], mean_logps[b:]

    nll_sum = -torch.where(targets.nll_mask, token_logps, zero).sum()
    if num_nll_tokens is None:
        num_nll_tokens = targets.nll_mask.sum()
    if num_pairs is None:
        num_pairs = b
    return _assemble(chosen_logps, rejected_logps, nll_sum, lam, num_nll_tokens, num_pairs)


# --------------------------------------------------------------------------------------------------
# From full logits
# --------------------------------------------------------------------------------------------------


def _selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits.float(), -1).gather(-1, index)`` for ``logits [N, T, V]``, ``index [N, T]``.

    Loops over the leading dimension so that at most one row's worth of temporaries (``[T, V]``, fp32)
    exists at a time; for fp32/fp64 logits no fp32 copy is made at all (logsumexp minus the gathered
    logit), for half precision each row is cast up on its own.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return (picked - lse).float()
    rows = [
        torch.gather(F.log_softmax(row.float(), dim=-1), -1, idx.unsqueeze(-1)).squeeze(-1)
        for row, idx in zip(logits, index, strict=True)
    ]
    return torch.stack(rows)


def orpo_loss(
    logits: torch.Tensor,
    batch: Mapping[str, torch.Tensor],
    lam: float = 0.1,
    nll_on_prompt: bool = False,
    num_nll_tokens: Normalizer | None = None,
    num_pairs: Normalizer | None = None,
) -> ORPOTerms:
    """The ORPO loss from full logits.

    Args:
        logits: ``[2B, L, V]`` logits of the model on ``batch["input_ids"]`` (any float dtype; the
            log-softmax is taken in fp32).
        batch: ``input_ids``, ``attention_mask``, ``labels``, each ``[2B, L]``, in the collator's layout.
        lam: weight ``λ`` of the odds-ratio term (TRL's ``beta``).
        nll_on_prompt: ``False`` (paper): NLL over the chosen response tokens. ``True`` (TRL): NLL over
            every non-padding token of the chosen rows after the first.
        num_nll_tokens: global number of NLL target tokens; defaults to this batch's count.
        num_pairs: global number of pairs; defaults to this batch's ``B``.

    Returns:
        :class:`ORPOTerms`; with the default normalisers ``loss`` equals TRL's per-batch ORPO loss
        (when ``nll_on_prompt=True``).
    """
    if logits.dim() != 3 or logits.shape[:2] != batch["input_ids"].shape:
        raise ValueError(
            f"logits must be [2B, L, V] matching input_ids {tuple(batch['input_ids'].shape)}, "
            f"got {tuple(logits.shape)}"
        )
    targets = _targets(batch, nll_on_prompt, logits.device)
    token_logps = _selective_log_softmax(logits[:, :-1], targets.ids)
    return _reduce(token_logps, targets, lam, num_nll_tokens, num_pairs)


# --------------------------------------------------------------------------------------------------
# From hidden states, in chunks
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _IndexTargets:
    """A batch's loss targets as flat hidden-row indices (see orpo_cli.training.targets.loss_targets)."""

    num_pairs: int
    chosen: torch.Tensor  # [3, Nc]: flat row, token id, pair
    rejected: torch.Tensor  # [3, Nr]
    prompt: torch.Tensor  # [2, Np]: flat row, token id (chosen side, nll_on_prompt only)


def _index_targets(batch: Mapping[str, torch.Tensor], device: torch.device) -> _IndexTargets:
    """The precomputed targets of a collated batch, or (hand-made padded batches) targets derived from
    ``labels`` with a data-dependent ``nonzero``: the one path here that syncs with the host."""
    if "targets_chosen" in batch:
        return _IndexTargets(
            num_pairs=batch["prompt_lengths"].numel(),
            chosen=batch["targets_chosen"].to(device),
            rejected=batch["targets_rejected"].to(device),
            prompt=batch["targets_prompt"].to(device),
        )
    t = _targets(batch, nll_on_prompt=True, device=device)
    b, width = t.num_pairs, batch["input_ids"].shape[1]
    row, column = torch.nonzero(t.any_mask, as_tuple=True)
    flat, ids = row * width + column, t.ids[row, column]
    response = t.or_mask[row, column]
    chosen, rejected, prompt = response & (row < b), response & (row >= b), ~response
    return _IndexTargets(
        num_pairs=b,
        chosen=torch.stack([flat[chosen], ids[chosen], row[chosen]]),
        rejected=torch.stack([flat[rejected], ids[rejected], row[rejected] - b]),
        prompt=torch.stack([flat[prompt], ids[prompt]]),
    )


def _pair_mean(values: torch.Tensor, pairs: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """Mean of `values` per pair index (``[num_pairs]``; NaN for a pair without values), no host sync."""
    sums = values.new_zeros(num_pairs).index_add(0, pairs, values)
    counts = values.new_zeros(num_pairs).index_add(0, pairs, torch.ones_like(values))
    return sums / counts


def orpo_loss_from_hidden(
    hidden: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    lam: float = 0.1,
    nll_on_prompt: bool = False,
    num_nll_tokens: Normalizer | None = None,
    num_pairs: Normalizer | None = None,
    chunk_size: int = CHUNK_ROWS,
) -> ORPOTerms:
    """The ORPO loss from the last hidden states, without ever forming the full logits.

    Only the hidden rows that predict a loss target are gathered (response tokens of both sides; with
    ``nll_on_prompt`` also the chosen side's prompt tokens), at the flat indices the collator
    precomputed (no data-dependent gather, so no host sync), and projected by ``lm_head`` and
    log-softmaxed in fp32 in chunks of ``chunk_size`` rows (see :func:`target_logps`). Peak extra memory
    is about ``chunk_size x V`` logits instead of ``2B x L x V``.

    Args:
        hidden: ``[rows, L, H]`` decoder output after the final norm (the input of ``lm_head``), for
            either layout of :func:`orpo_cli.training.batching.collate_pairs` (``[B, L, H]`` prefix-shared or
            ``[2B, L, H]`` padded). A hand-made padded batch without precomputed targets has them
            derived from its ``labels`` (one host sync).
        lm_head: the output projection, called as a function on ``[n, H]`` rows (an ``nn.Linear`` with or
            without bias, a PEFT-wrapped or tied module, ...).
        batch, lam, nll_on_prompt, num_nll_tokens, num_pairs: as in :func:`orpo_loss`.
        chunk_size: rows projected at a time.

    Returns:
        The same :class:`ORPOTerms` as ``orpo_loss(lm_head(hidden), batch, ...)`` on the padded layout.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.dim() != 3 or hidden.shape[:2] != batch["input_ids"].shape:
        raise ValueError(
            f"hidden must be [rows, L, H] matching input_ids {tuple(batch['input_ids'].shape)}, "
            f"got {tuple(hidden.shape)}"
        )
    t = _index_targets(batch, hidden.device)
    parts = [t.chosen, t.rejected] + ([t.prompt] if nll_on_prompt else [])
    rows = torch.cat([p[0] for p in parts])
    ids = torch.cat([p[1] for p in parts])
    picked = target_logps(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows), ids, lm_head, chunk_size)

    n_chosen, n_rejected = t.chosen.shape[1], t.rejected.shape[1]
    chosen_logps = _pair_mean(picked[:n_chosen], t.chosen[2], t.num_pairs)
    rejected_logps = _pair_mean(picked[n_chosen : n_chosen + n_rejected], t.rejected[2], t.num_pairs)
    # NLL targets: the chosen responses, plus (nll_on_prompt) the chosen side's prompt tokens.
    nll_sum = -(picked[:n_chosen].sum() + picked[n_chosen + n_rejected :].sum())
    if num_nll_tokens is None:
        num_nll_tokens = n_chosen + (t.prompt.shape[1] if nll_on_prompt else 0)
    if num_pairs is None:
        num_pairs = t.num_pairs
    return _assemble(chosen_logps, rejected_logps, nll_sum, lam, num_nll_tokens, num_pairs)


def _assemble(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    nll_sum: torch.Tensor,
    lam: float,
    num_nll_tokens: Normalizer,
    num_pairs: Normalizer,
) -> ORPOTerms:
    """The ORPO terms from mean response log-probs and the summed NLL, divided by the given normalisers."""
    l_or, log_odds = odds_ratio(chosen_logps, rejected_logps)
    nll = nll_sum / num_nll_tokens
    or_loss = l_or.sum() / num_pairs
    return ORPOTerms(
        loss=nll + lam * or_loss,
        nll=nll,
        or_loss=or_loss,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        log_odds=log_odds,
    )
