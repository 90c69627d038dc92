"""Collation of preference pairs into the tensors the ORPO loss reads (the layout is a contract).

For B pairs `collate_pairs` returns

* `input_ids` [2B, L]: rows 0..B-1 are prompt + chosen response, rows B..2B-1 prompt + rejected response,
  right-padded with `pad_token_id`;
* `attention_mask` [2B, L] (long): 1 on real tokens, 0 on padding;
* `labels` [2B, L]: the token id at response positions, -100 at prompt and padding positions (the
  Hugging Face convention, NOT shifted: the loss shifts);
* `prompt_lengths` [B] (long): each pair's prompt length, shared by its chosen and rejected rows.

Labels come from positions, never from comparing ids with `pad_token_id`, so a pad id equal to EOS
(Phi-3, many Llamas) keeps the response's final EOS as a label.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from orpo_cli.data import TokenizedPair

IGNORE_INDEX = -100


def collate_pairs(
    pairs: Sequence[TokenizedPair], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack B pairs into [2B, L] chosen-then-rejected rows; see the module docstring for the layout."""
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
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
    }


def count_tokens(pairs: Sequence[TokenizedPair]) -> int:
    """Non-padding tokens of all chosen and rejected sequences, prompts included (for tokens/s)."""
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
