"""Tests of orpo_cli.training.loss: the formula by hand, parity with TRL's ORPOTrainer, accumulation, chunking."""

from __future__ import annotations

import functools
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orpo_cli.training.head as head_module
from orpo_cli.training.head import target_logps
from orpo_cli.training.loss import (
    ORPOTerms,
    count_normalizers,
    log1mexp,
    metrics,
    odds_ratio,
    orpo_loss,
    orpo_loss_from_hidden,
)

PAD = 0
VOCAB = 128

# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(config).float()


def _pairs(lengths: list[tuple[int, int, int]], seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Random (prompt, chosen, rejected) token lists with the given lengths; ids avoid the pad id."""
    gen = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=gen).tolist()

    return [(toks(p), toks(c), toks(r)) for p, c, r in lengths]


def _rows(seqs: list[tuple[list[int], list[int]]], length: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (prompt and padding -100) for (prompt, response)."""
    ids, mask, labels = [], [], []
    for prompt, response in seqs:
        n_pad = length - len(prompt) - len(response)
        ids.append(prompt + response + [PAD] * n_pad)
        mask.append([1] * (len(prompt) + len(response)) + [0] * n_pad)
        labels.append([-100] * len(prompt) + response + [-100] * n_pad)
    return {
        "input_ids": torch.tensor(ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def _our_batch(pairs) -> dict[str, torch.Tensor]:
    """The collator layout: [2B, L], chosen rows first, then rejected rows."""
    length = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    return _rows(seqs, length)


def _trl_batch(pairs) -> dict[str, torch.Tensor]:
    """TRL's format: chosen_* and rejected_*, each padded to its own max length."""
    out = {}
    for name, seqs in (
        ("chosen", [(p, c) for p, c, _ in pairs]),
        ("rejected", [(p, r) for p, _, r in pairs]),
    ):
        rows = _rows(seqs, max(len(p) + len(y) for p, y in seqs))
        for key, value in rows.items():
            out[f"{name}_{key}"] = value
    return out


def _micro(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Pairs start..stop-1 of a [2B, L] batch, in the same layout."""
    b = batch["input_ids"].shape[0] // 2
    return {k: torch.cat([v[start:stop], v[b + start : b + stop]]) for k, v in batch.items()}


def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------------------------
# The formula by hand
# --------------------------------------------------------------------------------------------------


def test_odds_ratio_by_hand() -> None:
    chosen, rejected = [-0.5, -1.2], [-0.9, -0.7]
    l_or, log_odds = odds_ratio(torch.tensor(chosen), torch.tensor(rejected))
    for i, (w, lose) in enumerate(zip(chosen, rejected, strict=True)):
        expected = (w - lose) - (math.log(1 - math.exp(w)) - math.log(1 - math.exp(lose)))
        expected_loss = math.log1p(math.exp(-expected))  # -log sigmoid(z) = log(1 + e^-z)
        assert log_odds[i].item() == pytest.approx(expected, abs=1e-6)
        assert l_or[i].item() == pytest.approx(expected_loss, abs=1e-6)
    assert log_odds[0] > 0 > log_odds[1]  # the first pair prefers chosen, the second rejected


def test_log1mexp_matches_math_and_is_finite() -> None:
    xs = [-1e-6, -1e-4, -0.01, -0.3, -0.6931, -math.log(2), -0.6932, -1.0, -3.0, -10.0, -20.0, -50.0]
    x = torch.tensor(xs, dtype=torch.float32, requires_grad=True)
    y = log1mexp(x)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    for xi, yi in zip(x.detach().tolist(), y.tolist(), strict=True):  # xi: the value fp32 actually holds
        assert yi == pytest.approx(math.log(1 - math.exp(xi)), rel=1e-5, abs=1e-6)


def test_tiny_logits_by_hand() -> None:
    """V=5, L=4, B=1: chosen = 2 prompt + 2 response tokens, rejected = 2 prompt + 1 response + pad."""
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 5)
    batch = {
        "input_ids": torch.tensor([[1, 2, 3, 4], [1, 2, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, -100, 3, 4], [-100, -100, 0, -100]]),
    }
    rows = logits.tolist()

    def lp(row: int, t: int, token: int) -> float:  # log p(token at t) from the logits at t-1
        z = rows[row][t - 1]
        return z[token] - math.log(sum(math.exp(v) for v in z))

    chosen = (lp(0, 2, 3) + lp(0, 3, 4)) / 2
    rejected = lp(1, 2, 0)
    log_odds = (chosen - rejected) - (math.log(1 - math.exp(chosen)) - math.log(1 - math.exp(rejected)))
    l_or = -math.log(1 / (1 + math.exp(-log_odds)))
    nll_response = -(lp(0, 2, 3) + lp(0, 3, 4)) / 2
    nll_all = -(lp(0, 1, 2) + lp(0, 2, 3) + lp(0, 3, 4)) / 3

    for nll_on_prompt, nll in ((False, nll_response), (True, nll_all)):
        terms = orpo_loss(logits, batch, lam=0.25, nll_on_prompt=nll_on_prompt)
        assert terms.chosen_logps.item() == pytest.approx(chosen, abs=1e-6)
        assert terms.rejected_logps.item() == pytest.approx(rejected, abs=1e-6)
        assert terms.log_odds.item() == pytest.approx(log_odds, abs=1e-6)
        assert terms.or_loss.item() == pytest.approx(l_or, abs=1e-6)
        assert terms.nll.item() == pytest.approx(nll, abs=1e-6)
        assert terms.loss.item() == pytest.approx(nll + 0.25 * l_or, abs=1e-6)
        hidden_terms = orpo_loss_from_hidden(
            logits, nn.Identity(), batch, lam=0.25, nll_on_prompt=nll_on_prompt, chunk_size=2
        )
        assert hidden_terms.loss.item() == pytest.approx(nll + 0.25 * l_or, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Parity with TRL
# --------------------------------------------------------------------------------------------------

PAIR_LENGTHS = [(3, 4, 2), (5, 1, 6), (2, 7, 3)]  # (prompt, chosen, rejected) tokens per pair


def _trl_self(lam: float):
    """A stand-in for ORPOTrainer's `self` carrying exactly what the methods we call read."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOTrainer

    ns = types.SimpleNamespace(
        is_encoder_decoder=False,
        padding_value=PAD,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        aux_loss_enabled=False,
        beta=lam,
        concatenated_inputs=ORPOTrainer.concatenated_inputs,
        get_batch_logps=ORPOTrainer.get_batch_logps,
    )
    ns.concatenated_forward = functools.partial(ORPOTrainer.concatenated_forward, ns)
    ns.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, ns)
    return ns, ORPOTrainer


def test_trl_parity_loss_logps_grads_and_metrics() -> None:
    lam = 0.1
    model = _tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    pairs = _pairs(PAIR_LENGTHS, seed=0)
    trl, trainer_cls = _trl_self(lam)
    trl_batch = _trl_batch(pairs)

    # TRL: its own concatenated_forward + odds_ratio_loss; loss = policy_nll_loss - losses.mean().
    chosen_t, rejected_t, _, _, nll_t = trainer_cls.concatenated_forward(trl, model, trl_batch)
    losses, _, _, _, _ = trainer_cls.odds_ratio_loss(trl, chosen_t, rejected_t)
    loss_t = nll_t - losses.mean()
    loss_t.backward()
    grads_t = _grads(params)

    # Ours.
    batch = _our_batch(pairs)
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    terms = orpo_loss(logits, batch, lam=lam, nll_on_prompt=True)
    terms.loss.backward()
    grads = _grads(params)

    diffs = {
        "loss": (terms.loss - loss_t).abs().item(),
        "nll": (terms.nll - nll_t).abs().item(),
        "chosen_logps": (terms.chosen_logps - chosen_t).abs().max().item(),
        "rejected_logps": (terms.rejected_logps - rejected_t).abs().max().item(),
        "grads": _max_diff(grads, grads_t),
    }
    print(f"max |ours - TRL|: {diffs}")
    assert all(v <= 1e-5 for v in diffs.values()), diffs
    assert max(g.abs().max().item() for g in grads) > 1e-3  # the gradient comparison is not vacuous

    # Metrics: TRL's real get_batch_loss_metrics (it .item()s them; ours stay 0-dim tensors).
    with torch.no_grad():
        loss_m, trl_metrics = trainer_cls.get_batch_loss_metrics(trl, model, trl_batch)
    ours = metrics(terms, lam)
    assert ours.keys() - {"loss"} <= trl_metrics.keys()
    for key, value in ours.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad
        expected = loss_m.item() if key == "loss" else trl_metrics[key]
        assert value.item() == pytest.approx(expected, abs=1e-5), key
    assert terms.metrics(lam).keys() == ours.keys()


def test_paper_default_nll_is_response_only() -> None:
    model = _tiny_llama()
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=1))
    b = batch["input_ids"].shape[0] // 2
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    paper = orpo_loss(logits, batch, lam=0.1)
    trl_like = orpo_loss(logits, batch, lam=0.1, nll_on_prompt=True)

    expected = F.cross_entropy(
        logits[:b, :-1].reshape(-1, VOCAB), batch["labels"][:b, 1:].reshape(-1), ignore_index=-100
    )
    assert paper.nll.item() == pytest.approx(expected.item(), abs=1e-6)
    assert abs(paper.nll.item() - trl_like.nll.item()) > 1e-3  # the switch really changes the NLL
    # ... and only the NLL: the odds-ratio term always uses response-only mean logps.
    torch.testing.assert_close(paper.log_odds, trl_like.log_odds, rtol=0, atol=1e-6)
    assert paper.or_loss.item() == pytest.approx(trl_like.or_loss.item(), abs=1e-6)
    n_tokens, n_pairs = count_normalizers(batch, nll_on_prompt=False)
    assert n_tokens.item() == sum(c for _, c, _ in PAIR_LENGTHS) and n_pairs.item() == 3


# --------------------------------------------------------------------------------------------------
# Gradient accumulation with global normalisers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_gradient_accumulation_matches_full_batch(nll_on_prompt: bool) -> None:
    lam = 0.1
    model = _tiny_llama()
    params = list(model.parameters())
    batch = _our_batch(_pairs([(2, 6, 1), (4, 2, 5), (3, 1, 2), (6, 3, 3)], seed=2))

    def forward(b: dict[str, torch.Tensor], **kw) -> ORPOTerms:
        logits = model(b["input_ids"], attention_mask=b["attention_mask"]).logits
        return orpo_loss(logits, b, lam=lam, nll_on_prompt=nll_on_prompt, **kw)

    full = forward(batch)
    full.loss.backward()
    full_grads = _grads(params)

    micros = [_micro(batch, 0, 2), _micro(batch, 2, 4)]
    counts = [count_normalizers(m, nll_on_prompt) for m in micros]
    assert all(isinstance(t, torch.Tensor) and t.dim() == 0 for c in counts for t in c)
    num_tokens = sum(c[0] for c in counts)
    num_pairs = sum(c[1] for c in counts)
    total = 0.0
    for m in micros:
        terms = forward(m, num_nll_tokens=num_tokens, num_pairs=num_pairs)
        terms.loss.backward()  # .grad accumulates over the micro-batches
        total = total + terms.loss.detach()
    acc_grads = _grads(params)

    assert abs(total.item() - full.loss.item()) <= 1e-6
    assert _max_diff(acc_grads, full_grads) <= 1e-6
    # Without the global normalisers the mean of the micro losses is not the full-batch loss.
    naive = sum(forward(m).loss.detach() for m in micros) / 2
    assert abs(naive.item() - full.loss.item()) > 1e-4


# --------------------------------------------------------------------------------------------------
# The memory-lean path
# --------------------------------------------------------------------------------------------------


class _RowRecorder(nn.Module):
    """Wraps a head and records how many rows it was called with."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.reshape(-1, x.shape[-1]).shape[0])
        return self.head(x)


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_from_hidden_matches_full_logits(nll_on_prompt: bool) -> None:
    lam, chunk = 0.1, 7
    torch.manual_seed(3)
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=3))
    two_b, length = batch["input_ids"].shape
    head = nn.Linear(16, VOCAB, bias=True)
    with torch.no_grad():
        head.bias.normal_()
    hidden = torch.randn(two_b, length, 16, requires_grad=True)

    ref = orpo_loss(head(hidden), batch, lam=lam, nll_on_prompt=nll_on_prompt)
    ref.loss.backward()
    ref_grads = _grads([hidden, head.weight, head.bias])

    recorder = _RowRecorder(head)
    lean = orpo_loss_from_hidden(
        hidden, recorder, batch, lam=lam, nll_on_prompt=nll_on_prompt, chunk_size=chunk
    )
    forward_rows = sum(recorder.calls)
    lean.loss.backward()
    lean_grads = _grads([hidden, head.weight, head.bias])

    for name in ("loss", "nll", "or_loss", "chosen_logps", "rejected_logps", "log_odds"):
        torch.testing.assert_close(getattr(lean, name), getattr(ref, name), rtol=0, atol=1e-5)
    for key, value in metrics(lean, lam).items():
        assert value.item() == pytest.approx(metrics(ref, lam)[key].item(), abs=1e-5), key
    assert _max_diff(lean_grads, ref_grads) <= 1e-5

    # Only positions that predict a loss target are projected, never more than chunk_size rows at a
    # time, and the backward pass recomputes the chunks (checkpointing) instead of keeping their logits.
    labels, mask = batch["labels"][:, 1:], batch["attention_mask"][:, 1:]
    n_targets = (labels != -100).sum().item()
    if nll_on_prompt:
        n_targets += ((mask[: two_b // 2] == 1) & (labels[: two_b // 2] == -100)).sum().item()
    assert forward_rows == n_targets < two_b * (length - 1)
    assert forward_rows > chunk
    assert max(recorder.calls) <= chunk
    assert sum(recorder.calls) == 2 * forward_rows


def test_from_hidden_without_grad_skips_checkpoint() -> None:
    torch.manual_seed(4)
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=4))
    head = _RowRecorder(nn.Linear(8, VOCAB, bias=False))
    hidden = torch.randn(*batch["input_ids"].shape, 8)
    with torch.no_grad():
        lean = orpo_loss_from_hidden(hidden, head, batch, chunk_size=5)
        ref = orpo_loss(head.head(hidden), batch)
    assert max(head.calls) <= 5
    torch.testing.assert_close(lean.loss, ref.loss, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------------


def test_half_precision_inputs_are_upcast_to_fp32() -> None:
    chosen = torch.tensor([-0.5, -1.2], dtype=torch.bfloat16)
    rejected = torch.tensor([-0.9, -0.7], dtype=torch.bfloat16)
    l_or, log_odds = odds_ratio(chosen, rejected)
    assert l_or.dtype == log_odds.dtype == torch.float32
    _, ref = odds_ratio(chosen.float(), rejected.float())
    torch.testing.assert_close(log_odds, ref, rtol=0, atol=1e-6)
    assert log1mexp(torch.tensor([-1e-3], dtype=torch.bfloat16)).dtype == torch.float32

    torch.manual_seed(5)
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=5))
    logits = (3 * torch.randn(*batch["input_ids"].shape, VOCAB)).bfloat16()
    terms = orpo_loss(logits, batch, lam=0.1)
    ref_terms = orpo_loss(logits.float(), batch, lam=0.1)
    for name in ("loss", "nll", "or_loss", "chosen_logps", "rejected_logps", "log_odds"):
        assert getattr(terms, name).dtype == torch.float32, name
        torch.testing.assert_close(getattr(terms, name), getattr(ref_terms, name), rtol=0, atol=1e-5)
    assert all(v.dtype == torch.float32 for v in metrics(terms, 0.1).values())


def test_rejects_bad_layout() -> None:
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=6))
    odd = {k: v[:5] for k, v in batch.items()}
    with pytest.raises(ValueError):
        orpo_loss(torch.zeros(5, odd["input_ids"].shape[1], VOCAB), odd)
    with pytest.raises(ValueError):
        orpo_loss(torch.zeros(6, 3, VOCAB), batch)
    with pytest.raises(ValueError):
        orpo_loss_from_hidden(
            torch.zeros(*batch["input_ids"].shape, 4), nn.Linear(4, VOCAB), batch, chunk_size=0
        )


# --------------------------------------------------------------------------------------------------
# Precomputed targets, the fused frozen head, no data-dependent shapes
# --------------------------------------------------------------------------------------------------


def _tokenized(pairs):
    from orpo_cli.data.pairs import TokenizedPair

    return [TokenizedPair(p, c, r) for p, c, r in pairs]


@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_precomputed_targets_match_targets_from_labels(nll_on_prompt: bool) -> None:
    from orpo_cli.training.batching import collate_pairs

    torch.manual_seed(7)
    pairs = _pairs(PAIR_LENGTHS, seed=7)
    collated = collate_pairs(_tokenized(pairs), PAD, layout="padded")
    hand = _our_batch(pairs)  # no precomputed targets: derived from labels
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(collated[key], hand[key]), key
    hidden = torch.randn(*hand["input_ids"].shape, 8)
    head = nn.Linear(8, VOCAB)
    a = orpo_loss_from_hidden(hidden, head, collated, nll_on_prompt=nll_on_prompt)
    b = orpo_loss_from_hidden(hidden, head, hand, nll_on_prompt=nll_on_prompt)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)
    counts = count_normalizers(collated, nll_on_prompt)
    assert [c.item() for c in counts] == [c.item() for c in count_normalizers(hand, nll_on_prompt)]
    prefix = collate_pairs(_tokenized(pairs), PAD, layout="prefix")
    assert [c.item() for c in count_normalizers(prefix, nll_on_prompt)] == [c.item() for c in counts]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("nll_on_prompt", [False, True])
def test_frozen_linear_head_is_fused_exact_and_never_recomputed(bias: bool, nll_on_prompt: bool, monkeypatch) -> None:
    torch.manual_seed(8)
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=8))
    head = nn.Linear(16, VOCAB, bias=bias).requires_grad_(False)
    if bias:
        with torch.no_grad():
            head.bias.normal_()
    hidden = torch.randn(*batch["input_ids"].shape, 16, requires_grad=True)

    ref = orpo_loss(head(hidden), batch, lam=0.1, nll_on_prompt=nll_on_prompt)
    (ref_grad,) = torch.autograd.grad(ref.loss, hidden)

    rows: list[int] = []
    real_project = head_module._project
    monkeypatch.setattr(head_module, "_project", lambda x, *a: rows.append(x.shape[0]) or real_project(x, *a))
    lean = orpo_loss_from_hidden(hidden, head, batch, lam=0.1, nll_on_prompt=nll_on_prompt, chunk_size=5)
    (lean_grad,) = torch.autograd.grad(lean.loss, hidden)
    monkeypatch.setattr(head_module, "_project", real_project)

    for name in ("loss", "nll", "or_loss", "chosen_logps", "rejected_logps", "log_odds"):
        torch.testing.assert_close(getattr(lean, name), getattr(ref, name), rtol=0, atol=1e-5)
    torch.testing.assert_close(lean_grad, ref_grad, rtol=0, atol=1e-6)
    assert ref_grad.abs().max() > 1e-3
    # Each target row is projected once, forward only (the backward reuses the row gradients), in chunks.
    labels, mask = batch["labels"][:, 1:], batch["attention_mask"][:, 1:]
    b = labels.shape[0] // 2
    n_targets = (labels != -100).sum().item()
    if nll_on_prompt:
        n_targets += ((mask[:b] == 1) & (labels[:b] == -100)).sum().item()
    assert sum(rows) == n_targets and max(rows) <= 5


@pytest.mark.parametrize("rows_per_block", [1, 3])
def test_the_head_s_softmax_statistics_in_row_blocks_are_the_whole_chunk_s(rows_per_block: int, monkeypatch) -> None:
    torch.manual_seed(8)
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=8))
    head = nn.Linear(16, VOCAB, bias=False).requires_grad_(False)
    hidden = torch.randn(*batch["input_ids"].shape, 16, requires_grad=True)

    def run(block_elements: int):
        monkeypatch.setattr(head_module, "STATS_BLOCK_ELEMENTS", block_elements)
        lean = orpo_loss_from_hidden(hidden, head, batch, lam=0.1, nll_on_prompt=True, chunk_size=7)
        return lean.loss, lean.chosen_logps, *torch.autograd.grad(lean.loss, hidden)

    whole = run(1 << 40)
    blocked = run(rows_per_block * VOCAB + VOCAB // 2)  # blocks of 1 or 3 rows, the last one shorter
    assert all(torch.equal(a, b) for a, b in zip(blocked, whole, strict=True))
    logits = torch.randn(7, VOCAB) * 4
    exp = logits.clone()
    monkeypatch.setattr(head_module, "STATS_BLOCK_ELEMENTS", 2 * VOCAB)
    peak, total = head_module._softmax_stats(exp)
    torch.testing.assert_close(peak + total.log(), torch.logsumexp(logits, -1, keepdim=True), rtol=0, atol=1e-5)
    torch.testing.assert_close(exp / total, torch.softmax(logits, -1), rtol=0, atol=1e-6)


def test_trainable_head_takes_the_checkpointed_path_and_gets_gradients() -> None:
    torch.manual_seed(9)
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=9))
    head = nn.Linear(8, VOCAB)
    hidden = torch.randn(*batch["input_ids"].shape, 8, requires_grad=True)
    ref = orpo_loss(head(hidden), batch, nll_on_prompt=True)
    ref_grads = torch.autograd.grad(ref.loss, [hidden, head.weight, head.bias])
    lean = orpo_loss_from_hidden(hidden, head, batch, nll_on_prompt=True, chunk_size=4)
    lean_grads = torch.autograd.grad(lean.loss, [hidden, head.weight, head.bias])
    assert _max_diff(list(lean_grads), list(ref_grads)) <= 1e-5


@pytest.mark.parametrize("layout", ["padded", "prefix"])
def test_collated_batches_need_no_data_dependent_shapes(layout: str) -> None:
    """Under FakeTensorMode an op whose output size depends on tensor values (a boolean gather, nonzero,
    .item()) raises: the loss of a collated batch runs without one, so it never waits for the device."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

    from orpo_cli.training.batching import collate_pairs

    batch = collate_pairs(_tokenized(_pairs(PAIR_LENGTHS, seed=10)), PAD, layout=layout)
    real_hidden = torch.randn(*batch["input_ids"].shape, 8)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        hidden = mode.from_tensor(real_hidden).requires_grad_(True)
        head = nn.Linear(8, VOCAB).requires_grad_(False)
        terms = orpo_loss_from_hidden(hidden, head, fake, nll_on_prompt=True)
        nll_tokens, pairs = count_normalizers(fake, nll_on_prompt=True)
        terms = orpo_loss_from_hidden(hidden, head, fake, nll_on_prompt=True, num_nll_tokens=nll_tokens, num_pairs=pairs)
        terms.loss.backward()
        assert hidden.grad.shape == hidden.shape
    # ... whereas a hand-made batch without targets needs one (the check is not vacuous).
    hand = _our_batch(_pairs(PAIR_LENGTHS, seed=10))
    hand_hidden = torch.randn(*hand["input_ids"].shape, 8)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.raises(DynamicOutputShapeException):
        fake = {k: mode.from_tensor(v) for k, v in hand.items()}
        orpo_loss_from_hidden(mode.from_tensor(hand_hidden), nn.Linear(8, VOCAB), fake)


def test_frozen_head_skips_the_gradient_product_without_grad() -> None:
    """Evaluation (no_grad) pays one matmul per chunk, training two."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _CountMatmuls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):  # .default, and .out
                self.count += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(11)
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=11))
    head = nn.Linear(8, VOCAB).requires_grad_(False)
    hidden = torch.randn(*batch["input_ids"].shape, 8, requires_grad=True)
    counts = []
    for grad in (True, False):
        with torch.set_grad_enabled(grad), _CountMatmuls() as mode:
            orpo_loss_from_hidden(hidden, head, batch, chunk_size=4)
        counts.append(mode.count)
    assert counts[1] > 0 and counts[0] == 2 * counts[1]


def test_frozen_head_under_autocast_casts_the_weight_once_and_matches_bf16_autograd():
    """Autocast caches no cast copy of a frozen weight, so left alone each chunk's matmuls would copy the whole
    [V, H] head again (1 GB per chunk for Llama-3 in bf16); the fused head casts it once per call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(40, 16, requires_grad=True)
    ids = torch.randint(0, 50, (40,))

    class CountHeadCopies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and tuple(out.shape) == tuple(head.weight.shape):
                CountHeadCopies.copies += 1
            return out

    with torch.autocast("cpu", dtype=torch.bfloat16), CountHeadCopies():
        got = target_logps(hidden, ids, head, chunk_size=8)  # 5 chunks
    assert CountHeadCopies.copies == 1
    (grad,) = torch.autograd.grad(got.sum(), hidden)

    logits = (hidden.to(torch.bfloat16) @ head.weight.to(torch.bfloat16).T).float()
    ref = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (ref_grad,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=3e-2)  # bf16 products
    assert ref_grad.abs().max() > 0.1


def test_every_metric_name_comes_from_the_one_table() -> None:
    """loss.metrics and MetricTally.compute give exactly the table's names, in its order; the console columns,
    the plot panels and train's closing eval table name only keys from it."""
    from orpo_cli.plots import _PANELS
    from orpo_cli.progress import _SHOWN
    from orpo_cli.training.metric_names import METRICS
    from orpo_cli.training.metrics import MetricTally
    from orpo_cli.training.setup import EVAL_TABLE

    torch.manual_seed(6)
    batch = _our_batch(_pairs(PAIR_LENGTHS, seed=6))
    terms = orpo_loss(torch.randn(*batch["input_ids"].shape, VOCAB), batch, lam=0.1)
    assert list(metrics(terms, 0.1)) == list(METRICS)
    tally = MetricTally(torch.device("cpu"))
    tally.add_pairs(terms)
    tally.add_step(terms.loss, terms.nll)
    assert list(tally.compute(0.1)) == list(METRICS)
    assert list(tally.compute(0.1, prefix="eval_")) == [f"eval_{k}" for k in METRICS]
    shown = set(_SHOWN) - {"tokens_per_s"}  # the one console column that is not an ORPO metric
    plotted = {key for _, series in _PANELS for key, _ in series}
    assert shown <= set(METRICS) and plotted <= set(METRICS) and set(EVAL_TABLE) <= set(METRICS)
