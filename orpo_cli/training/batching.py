"""Collation of preference pairs into the tensors the model and the ORPO loss read (the layouts are a contract).

`collate_pairs(pairs, pad_token_id, layout=...)` builds one of two layouts:

* ``"prefix"`` (the default): one ``[prompt | chosen | rejected]`` row per pair, the prompt computed once;
  see :mod:`orpo_cli.training.shared_prompt`. Keys ``input_ids``, ``attention_mask``, ``position_ids``, ``segment_ids``,
  ``pair_ids`` ``[B, W]``, ``prompt_lengths``, ``chosen_lengths``, ``rejected_lengths`` ``[B]``, the host-side
  ``segments``, and the loss targets below.
* ``"packed"``: the same, padding-free: several pairs one after another in each row (rows of about
  :data:`orpo_cli.training.shared_prompt.PACK_WIDTH` columns), so that padding is left only at the end of each row. The
  keys are the prefix layout's, with fewer rows than pairs. For adapters that read nothing per row
  (`Adapter.packs_pairs`): LoRA and full fine-tuning, not ReFT.
* ``"padded"``: the straightforward layout, as TRL's; for B pairs

  * ``input_ids`` [2B, L]: rows 0..B-1 are prompt + chosen response, rows B..2B-1 prompt + rejected
    response, right-padded with ``pad_token_id``;
  * ``attention_mask`` [2B, L] (long): 1 on real tokens, 0 on padding;
  * ``labels`` [2B, L]: the token id at response positions, -100 at prompt and padding positions (the
    Hugging Face convention, NOT shifted: the loss shifts);
  * ``prompt_lengths`` [B] (long): each pair's prompt length, shared by its chosen and rejected rows;
  * the loss targets below.

A run's layout is chosen once, at setup (`forward.batch_layout`), and every batch of the run is collated
in it. Every layout carries the loss targets (`targets.loss_targets`), computed on the CPU so that the
training step never has to find them with a data-dependent (host-synchronising) boolean gather. A target is a token a loss term
scores and the *flat row* ``row * width + column`` of the hidden state that predicts it:

* ``targets_chosen`` [3, Nc]: (flat row, token id, pair) of every chosen-response token;
* ``targets_rejected`` [3, Nr]: the same for the rejected responses;
* ``targets_prompt`` [2, Np]: (flat row, token id) of every prompt token after the first, on the chosen
  side: the extra NLL targets of ``nll_on_prompt`` (TRL's objective).

The first token of each response is predicted from the last prompt position, in both layouts. The
counts Nc, Nr, Np are tensor shapes, known on the host without a sync.

Labels come from positions, never from comparing ids with `pad_token_id`, so a pad id equal to EOS
(Phi-3, many Llamas) keeps the response's final EOS as a label.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.layouts import LAYOUTS, Layout  # noqa: E402 - the names, beside the collation that reads them
from orpo_cli.training.loss import IGNORE_INDEX  # -100: the label a position without a loss target carries
from orpo_cli.training.shared_prompt import collate_prefix
from orpo_cli.training.targets import loss_targets

__all__ = ["DEFAULT_LAYOUT", "LAYOUTS", "Layout", "collate_pairs"]

DEFAULT_LAYOUT: Layout = "prefix"
"""What `collate_pairs` builds when no layout is given: the fastest one whose loss and gradients are
tested equal to the padded layout's (tests/test_shared_prompt.py)."""


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    layout: Layout | None = None,
) -> dict[str, torch.Tensor]:
    """Collate B pairs in `layout` (default :data:`DEFAULT_LAYOUT`); see the module docstring."""
    layout = layout or DEFAULT_LAYOUT
    if layout in ("prefix", "packed"):
        return collate_prefix(pairs, pad_token_id, pad_to_multiple_of, pack=layout == "packed")
    if layout != "padded":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return _collate_padded(pairs, pad_token_id, pad_to_multiple_of)


def _collate_padded(
    pairs: Sequence[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int | None
) -> dict[str, torch.Tensor]:
    """Stack B pairs into [2B, L] chosen-then-rejected rows."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    prompts = [p.prompt_ids for p in pairs]
    responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    prompts2 = prompts + prompts
    lengths = [len(a) + len(b) for a, b in zip(prompts2, responses, strict=True)]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    rows = len(responses)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts2, responses, strict=True)):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, n_prompt:n] = input_ids[i, n_prompt:n]
    prompt_lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    b = len(pairs)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_lengths": prompt_lengths,
        **loss_targets(
            pairs,
            width=width,
            chosen_rows=torch.arange(b),
            chosen_starts=prompt_lengths,
            rejected_rows=torch.arange(b, 2 * b),
            rejected_starts=prompt_lengths,
        ),
    }


def longest_sequence(pairs: Sequence[TokenizedPair]) -> int:
    """The most tokens one sequence of `pairs` holds: a prompt and its longer response (what a sliding
    attention window must cover; see forward.batch_layout)."""
    return max((len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=0)


def count_tokens(pairs: Sequence[TokenizedPair]) -> int:
    """Non-padding tokens of all chosen and rejected sequences, prompts included (for tokens/s).

    The prompt counts twice, as in TRL's two rows, whatever the layout: this is the work a pair stands
    for, not the work a layout does.
    """
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


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
    With `world_size` ranks, global micro-batch i is the i-th `micro_batch_size * world_size` pairs of the
    order and rank r takes every world_size-th pair of it from the r-th: one process with
    `micro_batch_size * world_size` pairs per micro-batch sees the same pairs in every optimizer step.
    An epoch's last global micro-batch, if it has fewer pairs than ranks, borrows from the start of the
    order, so that no rank is left without a pair to run forward and backward on.
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
        if len(chunk) < world_size:
            chunk += order[: world_size - len(chunk)]
        yield [pairs[i] for i in chunk[rank::world_size]]
        index += 1
