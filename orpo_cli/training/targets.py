"""The loss targets every batch layout carries: which hidden row predicts which token (see batching.py).

Computed on the CPU at collation, so that the training step never has to find them with a data-dependent
(host-synchronising) boolean gather. Both layouts' collators (batching.py for the padded layout,
shared_prompt.py for the prefix and packed ones) call :func:`loss_targets`; the loss reads them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orpo_cli.data.pairs import TokenizedPair

TARGET_KEYS = ("targets_chosen", "targets_rejected", "targets_prompt")


def loss_targets(
    pairs: Sequence[TokenizedPair],
    *,
    width: int,
    chosen_rows: torch.Tensor,
    chosen_starts: torch.Tensor,
    rejected_rows: torch.Tensor,
    rejected_starts: torch.Tensor,
    prompt_starts: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The precomputed loss targets of a layout (see the module docstring).

    Pair i's chosen response occupies columns ``chosen_starts[i] ...`` of row ``chosen_rows[i]``, its
    rejected response ``rejected_starts[i] ...`` of row ``rejected_rows[i]``, and its prompt columns
    ``S .. S+P-1`` of both rows, ``S = prompt_starts[i]`` (0 unless several pairs share a row). Response
    token j is predicted by the column before it, except the first token of each response, which is
    predicted by the last prompt column ``S + P - 1`` of its row.
    """
    chosen, rejected, prompt = [], [], []
    for i, pair in enumerate(pairs):
        n_prompt = len(pair.prompt_ids)
        base = 0 if prompt_starts is None else int(prompt_starts[i])
        if n_prompt == 0 or not pair.chosen_ids or not pair.rejected_ids:
            raise ValueError(f"pair {i} has an empty prompt or response; every part needs at least one token")
        for ids, row, start, out in (
            (pair.chosen_ids, int(chosen_rows[i]), int(chosen_starts[i]), chosen),
            (pair.rejected_ids, int(rejected_rows[i]), int(rejected_starts[i]), rejected),
        ):
            columns = torch.arange(start - 1, start - 1 + len(ids))
            columns[0] = base + n_prompt - 1
            out.append(torch.stack([row * width + columns, torch.tensor(ids, dtype=torch.long), torch.full_like(columns, i)]))
        row = int(chosen_rows[i])
        prompt_ids = torch.tensor(pair.prompt_ids[1:], dtype=torch.long)
        prompt.append(torch.stack([row * width + base + torch.arange(n_prompt - 1), prompt_ids]))
    return {
        "targets_chosen": torch.cat(chosen, dim=1).long(),
        "targets_rejected": torch.cat(rejected, dim=1).long(),
        "targets_prompt": torch.cat(prompt, dim=1).long(),
    }
