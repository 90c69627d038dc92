"""orpo_cli.training.batching: both batch layouts and their precomputed loss targets, on hand-made pairs."""

from __future__ import annotations

import pytest
import torch

from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.training.batching import DEFAULT_LAYOUT, collate_pairs, count_tokens
from orpo_cli.training.shared_prompt import Segments

PAD = 0
X = -100
PAIRS = [
    TokenizedPair(prompt_ids=[1, 11, 12], chosen_ids=[21, 22, 2], rejected_ids=[31, 2]),
    TokenizedPair(prompt_ids=[1, 13], chosen_ids=[23, 2], rejected_ids=[32, 33, 34, 35, 2]),
]
TARGET_KEYS = {"targets_chosen", "targets_rejected", "targets_prompt"}


def test_padded_layout_on_hand_made_pairs():
    batch = collate_pairs(PAIRS, pad_token_id=PAD, layout="padded")
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_lengths"} | TARGET_KEYS
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
    # Targets: (flat row = row * 7 + column that predicts the token, token, pair).
    assert batch["targets_chosen"].tolist() == [[2, 3, 4, 8, 9], [21, 22, 2, 23, 2], [0, 0, 0, 1, 1]]
    assert batch["targets_rejected"].tolist() == [
        [14 + 2, 14 + 3, 21 + 1, 21 + 2, 21 + 3, 21 + 4, 21 + 5],
        [31, 2, 32, 33, 34, 35, 2],
        [0, 0, 1, 1, 1, 1, 1],
    ]
    assert batch["targets_prompt"].tolist() == [[0, 1, 7], [11, 12, 13]]


def test_prefix_layout_on_hand_made_pairs():
    batch = collate_pairs(PAIRS, pad_token_id=PAD, layout="prefix")
    assert DEFAULT_LAYOUT == "prefix" and set(collate_pairs(PAIRS, PAD)) == set(batch)
    assert batch["input_ids"].tolist() == [
        [1, 11, 12, 21, 22, 2, 31, 2, 0],  # prompt | chosen | rejected | padding
        [1, 13, 23, 2, 32, 33, 34, 35, 2],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 8 + [0], [1] * 9]
    # Chosen continues after the prompt, rejected restarts where chosen started, padding continues on.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5, 6]]
    assert batch["prompt_lengths"].tolist() == [3, 2]
    assert batch["chosen_lengths"].tolist() == [3, 2]
    assert batch["rejected_lengths"].tolist() == [2, 5]
    assert isinstance(batch["segments"], Segments) and batch["segments"].lengths == ((3, 3, 2), (2, 2, 5))
    # The first chosen and the first rejected token are both predicted by the last prompt column.
    assert batch["targets_chosen"].tolist() == [[2, 3, 4, 10, 11], [21, 22, 2, 23, 2], [0, 0, 0, 1, 1]]
    assert batch["targets_rejected"].tolist() == [
        [2, 6, 10, 13, 14, 15, 16],
        [31, 2, 32, 33, 34, 35, 2],
        [0, 0, 1, 1, 1, 1, 1],
    ]
    assert batch["targets_prompt"].tolist() == [[0, 1, 9], [11, 12, 13]]
    # Every target's token sits one column after its predicting column, except the rejected firsts.
    flat = batch["input_ids"].reshape(-1)
    assert flat[batch["targets_chosen"][0] + 1].tolist() == batch["targets_chosen"][1].tolist()
    assert flat[batch["targets_prompt"][0] + 1].tolist() == batch["targets_prompt"][1].tolist()


def test_segments_stay_on_the_host_when_a_batch_is_moved():
    batch = collate_pairs(PAIRS, PAD)
    moved = {k: v.to("cpu", non_blocking=True) for k, v in batch.items()}
    assert moved["segments"] is batch["segments"]


def test_pad_to_multiple_and_pad_equal_to_eos():
    batch = collate_pairs(PAIRS, pad_token_id=2, pad_to_multiple_of=4, layout="padded")
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"][1].tolist() == [1, 13, 23, 2, 2, 2, 2, 2]
    # Labels follow positions, not ids: the EOS that equals the pad id stays a label, the padding does not.
    assert batch["labels"][1].tolist() == [X, X, 23, 2, X, X, X, X]
    assert batch["attention_mask"].sum().item() == count_tokens(PAIRS)
    prefix = collate_pairs(PAIRS, pad_token_id=2, pad_to_multiple_of=4)
    assert prefix["input_ids"].shape == (2, 12)
    assert prefix["targets_chosen"][1].tolist()[-1] == 2  # the final EOS is a target


def test_count_tokens_and_single_pair():
    assert count_tokens(PAIRS) == (3 + 3) + (3 + 2) + (2 + 2) + (2 + 5)
    one = collate_pairs(PAIRS[:1], pad_token_id=PAD, layout="padded")
    assert one["input_ids"].shape == (2, 6) and one["prompt_lengths"].tolist() == [3]
    assert collate_pairs(PAIRS[:1], pad_token_id=PAD)["input_ids"].shape == (1, 8)
    for layout in ("padded", "prefix", "packed"):
        with pytest.raises(ValueError):
            collate_pairs([], pad_token_id=PAD, layout=layout)
        with pytest.raises(ValueError, match="empty"):
            collate_pairs([TokenizedPair([1], [], [2])], pad_token_id=PAD, layout=layout)
    with pytest.raises(ValueError, match="layout"):
        collate_pairs(PAIRS, PAD, layout="interleaved")  # type: ignore[arg-type]
