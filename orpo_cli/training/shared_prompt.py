"""Prefix sharing: each pair's prompt runs through the model once, chosen and rejected both attend to it.

One row per pair holds ``[prompt | chosen | rejected]``, right-padded::

    columns    0 .. P-1     P .. P+C-1      P+C .. P+C+R-1     padding
    positions  0 .. P-1     P .. P+C-1      P .. P+R-1         P+R, P+R+1, ...

Chosen positions continue after the prompt; rejected positions restart at the same place, so each
response sees exactly the rotary/absolute positions it would see in its own ``prompt + response`` row.
The 4-D attention mask (built on the device by :func:`attention_mask_4d`, from the three lengths) lets a
token see the prompt and the earlier tokens of its own segment, never the other response: a rejected
token does not see the chosen one. Padding columns see only themselves (no row of the mask is empty,
so no NaN), and their positions continue past the rejected response so that no padding column ever
carries a prompt position (the ReFT adapter reads prompt positions from ``position_ids`` when the mask
is 4-D).

Compared with the ``[2B, L]`` chosen-then-rejected layout this computes the prompt once instead of twice
and pads each pair once instead of padding both rows to the longest sequence of the batch.

The prefix batch also carries what adapters read in the padded layout: a 2-D ``attention_mask``
(1 on real tokens) and ``prompt_lengths`` ``[B]``, one row per pair. The loss targets are precomputed
here too (see :func:`orpo_cli.training.targets.loss_targets`): which hidden row predicts which token.

Attention. A dense ``[B, W, W]`` mask makes the kernel score every query against every key of its row,
the chosen-rejected block and the padding included. With ``sdpa`` the forward therefore also passes the
host-side :class:`Segments` (per-pair lengths as Python ints) under the keyword ``orpo_prefix``, which
transformers hands down to the attention function; where the run installed the block attention (a speed
path: orpo_cli/kernels/block_attention.py), each pair's attention runs as exact blocks instead. Without it
the keyword is ignored, and the dense mask passed alongside is exact for any kernel.

Custom 4-D masks reach the attention kernels as-is in transformers 5 (``masking_utils`` returns a 4-D
mask untouched) for the ``sdpa`` and ``eager`` implementations: ``sdpa`` takes the boolean mask (True =
attend), ``eager`` adds it to the scores, so it gets the additive float form (0 / dtype minimum). Other
kernels (flash-attention, flex) drop or reject such masks: the layout rule (orpo_cli/layouts.py `choose_layout`)
says whether a model can take this layout, once at setup (training/forward.py `batch_layout`); the ones that cannot are collated
in the padded layout from the start. No flash-attention varlen path is implemented: varlen kernels cannot
express "rejected sees the prompt but not chosen" in one call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.kernels import attention_tiles
from orpo_cli.kernels.block_attention import PREFIX_KWARG
from orpo_cli.training.targets import loss_targets

# Segment codes of a column, in column order: prompt 0, chosen 1, rejected 2, padding 3.
_PROMPT, _PAD = 0, 3


class Segments:
    """Each pair's (prompt, chosen, rejected) lengths and place as Python ints: a batch entry that stays on the host.

    ``lengths[i]`` is pair i's (prompt, chosen, rejected) token counts; ``starts[i]`` its (row, first
    column): ``(i, 0)`` in the one-row-per-pair layout, several pairs one after another in a packed row.
    The block attention needs these as numbers to slice with; reading them from a device tensor would
    sync. ``.to(...)`` returns the object itself, so code that moves a whole batch to the device
    (``{k: v.to(device) for k, v in batch.items()}``) leaves it where it is.
    """

    def __init__(self, lengths: Sequence[tuple[int, int, int]], starts: Sequence[tuple[int, int]] | None = None):
        self.lengths = tuple((int(p), int(c), int(r)) for p, c, r in lengths)
        if starts is None:
            starts = [(i, 0) for i in range(len(self.lengths))]
        self.starts = tuple((int(row), int(column)) for row, column in starts)
        if len(self.starts) != len(self.lengths):
            raise ValueError(f"{len(self.lengths)} pairs but {len(self.starts)} starts")
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._by_row: list[list[int]] | None = None
        self._tiles: list[list[attention_tiles.Block]] | None = None

    def to(self, *_args: Any, **_kwargs: Any) -> Segments:
        return self

    def __repr__(self) -> str:
        return f"Segments({list(self.lengths)}, starts={list(self.starts)})"

    def by_row(self, rows: int) -> list[list[int]]:
        """The pairs of each of `rows` rows, in column order (worked out once; every layer asks)."""
        if self._by_row is None or len(self._by_row) != rows:
            self._by_row = [[] for _ in range(rows)]
            for i in sorted(range(len(self.starts)), key=lambda i: self.starts[i]):
                self._by_row[self.starts[i][0]].append(i)
        return self._by_row

    def tiles(self) -> list[list[attention_tiles.Block]]:
        """The CPU tiled attention's blocks of these pairs (worked out once; every layer asks)."""
        if self._tiles is None:
            self._tiles = attention_tiles.plan_tiles(self.lengths, self.starts)
        return self._tiles

    def rejected_mask(self, pair: int, device: torch.device) -> torch.Tensor:
        """``[R, P + R]`` bool: rejected token j sees the whole prompt and rejected tokens ``<= j``."""
        key = (pair, device)
        if key not in self._masks:
            p, _, r = self.lengths[pair]
            self._masks[key] = torch.ones(r, p + r, dtype=torch.bool, device=device).tril(diagonal=p)
        return self._masks[key]


PACK_WIDTH = 4096
"""Columns a packed row holds (more when one pair alone is longer): the dense 4-D mask that goes with the
batch is ``rows x W x W`` booleans, so rows are kept to about this width (16 MB of mask each)."""


def pack_rows(sizes: Sequence[int], width: int = PACK_WIDTH) -> list[tuple[int, int]]:
    """(row, first column) of each sequence, filled into rows of `width` columns in order (next fit).

    A sequence longer than `width` gets a row of its own. The order of the pairs is kept, so a batch's
    pairs are still numbered as they were given.
    """
    starts: list[tuple[int, int]] = []
    row, used = 0, 0
    for size in sizes:
        if used and used + size > width:
            row, used = row + 1, 0
        starts.append((row, used))
        used += size
    return starts


def collate_prefix(
    pairs: Sequence[TokenizedPair],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    *,
    pack: bool = False,
    pack_width: int = PACK_WIDTH,
) -> dict[str, torch.Tensor]:
    """``[prompt | chosen | rejected]`` pairs in rows (see the module docstring), with loss targets.

    One row per pair, or with `pack` several pairs one after another in each row of about `pack_width`
    columns (:func:`pack_rows`), so that only the last columns of a row are padding.

    Keys: ``input_ids``, ``attention_mask`` (2-D, 1 on real tokens), ``position_ids``, ``segment_ids``
    (each column's part: prompt 0, chosen 1, rejected 2, padding 3), ``pair_ids`` (each column's pair,
    -1 on padding), ``prompt_lengths``, ``chosen_lengths``, ``rejected_lengths`` (each ``[B]``),
    ``segments`` (lengths and places on the host, see :class:`Segments`) and the loss targets of
    :func:`orpo_cli.training.targets.loss_targets`.
    """
    if not pairs:
        raise ValueError("collate_prefix needs at least one pair")
    lengths = [(len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    sizes = [sum(n) for n in lengths]
    starts = pack_rows(sizes, pack_width) if pack else [(i, 0) for i in range(len(pairs))]
    rows = starts[-1][0] + 1
    width = max(column + size for (_, column), size in zip(starts, sizes, strict=True))
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    position_ids = torch.empty((rows, width), dtype=torch.long)
    segment_ids = torch.full((rows, width), _PAD, dtype=torch.long)
    pair_ids = torch.full((rows, width), -1, dtype=torch.long)
    row_end = [0] * rows
    next_position = [0] * rows
    for i, (pair, (p, c, r), (row, s)) in enumerate(zip(pairs, lengths, starts, strict=True)):
        n = p + c + r
        input_ids[row, s : s + n] = torch.tensor(pair.prompt_ids + pair.chosen_ids + pair.rejected_ids, dtype=torch.long)
        attention_mask[row, s : s + n] = 1
        position_ids[row, s : s + p + c] = torch.arange(p + c)
        position_ids[row, s + p + c : s + n] = torch.arange(p, p + r)  # rejected restarts after the prompt
        for code, begin, end in ((_PROMPT, s, s + p), (1, s + p, s + p + c), (2, s + p + c, s + n)):
            segment_ids[row, begin:end] = code
        pair_ids[row, s : s + n] = i
        row_end[row], next_position[row] = s + n, p + r
    for row in range(rows):  # padding positions continue past the row's last rejected response
        position_ids[row, row_end[row] :] = torch.arange(next_position[row], next_position[row] + width - row_end[row])
    prompt_lengths, chosen_lengths, rejected_lengths = (
        torch.tensor([n[k] for n in lengths], dtype=torch.long) for k in range(3)
    )
    pair_rows = torch.tensor([row for row, _ in starts], dtype=torch.long)
    pair_columns = torch.tensor([column for _, column in starts], dtype=torch.long)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "pair_ids": pair_ids,
        "prompt_lengths": prompt_lengths,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "segments": Segments(lengths, starts),
    }
    batch.update(
        loss_targets(
            pairs,
            width=width,
            chosen_rows=pair_rows,
            chosen_starts=pair_columns + prompt_lengths,
            rejected_rows=pair_rows,
            rejected_starts=pair_columns + prompt_lengths + chosen_lengths,
            prompt_starts=pair_columns,
        )
    )
    return batch


def attention_mask_4d(batch: Mapping[str, torch.Tensor], additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``[rows, 1, W, W]`` mask of a prefix batch, built on the batch's device (no host sync).

    A token attends causally within its own pair: to the prompt and to its own part (chosen or rejected),
    never to the other response or to another pair packed in the same row; a padding column attends to
    itself only (no row of the mask is empty, so no NaN). Boolean (True = attend) by default, the form
    ``sdpa`` takes; with `additive_dtype`, 0 where a token may attend and that dtype's minimum elsewhere,
    the form ``eager`` attention adds to its scores.
    """
    segment, pair = batch["segment_ids"], batch["pair_ids"]
    width = segment.shape[1]
    segments = batch.get("segments")
    if isinstance(segments, Segments):
        allowed = _mask_from_segments(segments, segment.shape[0], width, segment.device).unsqueeze(1)
    else:
        allowed = _mask_from_columns(segment, pair)
    if additive_dtype is None:
        return allowed
    zero = torch.zeros((), dtype=additive_dtype, device=segment.device)
    return torch.where(allowed, zero, torch.finfo(additive_dtype).min)


def _mask_from_segments(segments: Segments, rows: int, width: int, device: torch.device) -> torch.Tensor:
    """``[rows, W, W]``: the mask written block by block from the host-side lengths (one pass over the mask and
    the blocks a pair may see, instead of a dozen elementwise passes over ``W x W``)."""
    allowed = torch.zeros(rows, width, width, dtype=torch.bool, device=device)
    row_end = [0] * rows
    for (p, c, r), (row, s) in zip(segments.lengths, segments.starts, strict=True):
        n, start = p + c, s + p + c
        allowed[row, s : s + n, s : s + n] = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
        allowed[row, start : start + r, s : s + p] = True
        allowed[row, start : start + r, start : start + r] = torch.ones(r, r, dtype=torch.bool, device=device).tril_()
        row_end[row] = max(row_end[row], start + r)
    for row, end in enumerate(row_end):  # padding columns see themselves only
        pad = torch.arange(end, width, device=device)
        allowed[row, pad, pad] = True
    return allowed


def _mask_from_columns(segment: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
    """``[rows, 1, W, W]``: the mask from each column's segment and pair ids (a batch without host-side segments)."""
    width = segment.shape[1]
    column = torch.arange(width, device=segment.device)
    causal = column.unsqueeze(1) >= column.unsqueeze(0)  # [W, W]
    diagonal = column.unsqueeze(1) == column.unsqueeze(0)
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)  # [rows, W, 1], [rows, 1, W]
    same_pair = pair.unsqueeze(2) == pair.unsqueeze(1)
    visible = (key == _PROMPT) | ((key == query) & (key != _PAD))
    return ((causal & same_pair & visible) | diagonal).unsqueeze(1)


def attention_implementation(model: nn.Module) -> str:
    """The model's attention implementation name (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None) or "eager"
    return str(name)


def sliding_window(model: nn.Module) -> int | None:
    """The model's sliding attention window, None where it has none (or does not use it)."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `model`'s forward for a prefix batch.

    ``input_ids``, ``position_ids`` and the 4-D ``attention_mask`` in the form the model's attention takes
    (boolean for ``sdpa``, additive for ``eager``); for ``sdpa`` also the host-side segments under
    :data:`PREFIX_KWARG`, which the block attention turns into exact per-pair blocks where it is installed
    (anywhere else the dense mask alone is exact).
    """
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if attention_implementation(model) == "eager":
        dtype = model.get_input_embeddings().weight.dtype
        inputs["attention_mask"] = attention_mask_4d(batch, dtype if dtype.is_floating_point else torch.float32)
        return inputs
    inputs["attention_mask"] = attention_mask_4d(batch)
    if "segments" in batch:  # read only by a model with the block attention (orpo_cli/kernels/block_attention.py)
        inputs[PREFIX_KWARG] = batch["segments"]
    return inputs
