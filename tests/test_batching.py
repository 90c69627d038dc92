"""orpo_cli.batching: the [2B, L] chosen-then-rejected layout the ORPO loss reads, on hand-made pairs."""

from __future__ import annotations

import pytest
import torch

from orpo_cli.batching import collate_pairs, count_tokens
from orpo_cli.data import TokenizedPair

PAD = 0
X = -100
PAIRS = [
    TokenizedPair(prompt_ids=[1, 11, 12], chosen_ids=[21, 22, 2], rejected_ids=[31, 2]),
    TokenizedPair(prompt_ids=[1, 13], chosen_ids=[23, 2], rejected_ids=[32, 33, 34, 35, 2]),
]


def test_layout_on_hand_made_pairs():
    batch = collate_pairs(PAIRS, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_lengths"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [
        [1, 11, 12, 21, 22, 2, 0],  # pair 0, chosen
        [1, 13, 23, 2, 0, 0, 0],  # pair 1, chosen
        [1, 11, 12, 31, 2, 0, 0],  # pair 0, rejected
        [1, 13, 32, 33, 34, 35, 2],  # pair 1, rejected
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert batch["labels"].tolist() == [
        [X, X, X, 21, 22, 2, X],
        [X, X, 23, 2, X, X, X],
        [X, X, X, 31, 2, X, X],
        [X, X, 32, 33, 34, 35, 2],
    ]
    assert batch["prompt_lengths"].tolist() == [3, 2]


def test_pad_to_multiple_and_pad_equal_to_eos():
    batch = collate_pairs(PAIRS, pad_token_id=2, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][1].tolist() == [1, 13, 23, 2, 2, 2, 2, 2]
    # Labels follow positions, not ids: the EOS that equals the pad id stays a label, the padding does not.
    assert batch["labels"][1].tolist() == [X, X, 23, 2, X, X, X, X]
    assert batch["attention_mask"].sum().item() == count_tokens(PAIRS)


def test_count_tokens_and_single_pair():
    assert count_tokens(PAIRS) == (3 + 3) + (3 + 2) + (2 + 2) + (2 + 5)
    one = collate_pairs(PAIRS[:1], pad_token_id=PAD)
    assert one["input_ids"].shape == (2, 6) and one["prompt_lengths"].tolist() == [3]
    with pytest.raises(ValueError):
        collate_pairs([], pad_token_id=PAD)
