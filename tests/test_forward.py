"""orpo_cli.training.forward: the model forward that feeds the loss, in both layouts, against TRL's ORPOTrainer."""

from __future__ import annotations

import contextlib
import functools
import os
import types

import pytest
import torch
from torch import nn

import orpo_cli.training.head as head_module
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.training.batching import collate_pairs
from orpo_cli.training.forward import orpo_forward
from orpo_cli.training.head import CHUNK_ROWS
from orpo_cli.training.loss import count_normalizers

PAD = 0
VOCAB = 128
LENGTHS = [(3, 4, 2), (5, 1, 6), (2, 7, 3)]


class _NoAdapter:
    def __init__(self) -> None:
        self.batches: list[dict] = []

    def forward_context(self, model, batch):
        self.batches.append(batch)
        return contextlib.nullcontext()


def _lora_llama() -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, pad_token_id=PAD)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def _pairs(seed: int) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [TokenizedPair(toks(p), toks(c), toks(r)) for p, c, r in LENGTHS]


def _trl_loss(model: nn.Module, pairs: list[TokenizedPair], lam: float) -> torch.Tensor:
    """TRL's ORPOTrainer loss of one batch: its own concatenated_forward and odds_ratio_loss."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOTrainer

    ns = types.SimpleNamespace(
        is_encoder_decoder=False, padding_value=PAD, aux_loss_enabled=False, beta=lam,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        concatenated_inputs=ORPOTrainer.concatenated_inputs, get_batch_logps=ORPOTrainer.get_batch_logps,
    )
    ns.concatenated_forward = functools.partial(ORPOTrainer.concatenated_forward, ns)
    ns.odds_ratio_loss = functools.partial(ORPOTrainer.odds_ratio_loss, ns)
    batch = {}
    for side in ("chosen", "rejected"):
        seqs = [(p.prompt_ids, getattr(p, f"{side}_ids")) for p in pairs]
        width = max(len(a) + len(b) for a, b in seqs)
        batch[f"{side}_input_ids"] = torch.tensor([a + b + [PAD] * (width - len(a) - len(b)) for a, b in seqs])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * (len(a) + len(b)) + [0] * (width - len(a) - len(b)) for a, b in seqs])
        batch[f"{side}_labels"] = torch.tensor([[-100] * len(a) + b + [-100] * (width - len(a) - len(b)) for a, b in seqs])
    loss, _ = ORPOTrainer.get_batch_loss_metrics(ns, model, batch)
    return loss


@pytest.mark.parametrize("layout", ["prefix", "padded"])
def test_first_loss_and_gradients_equal_trls(layout: str) -> None:
    model = _lora_llama()
    pairs = _pairs(seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    trl = _trl_loss(model, pairs, lam=0.1)
    trl_grads = torch.autograd.grad(trl, params)
    terms = orpo_forward(model, _NoAdapter(), collate_pairs(pairs, PAD, layout=layout), lam=0.1, nll_on_prompt=True,
                         layout=layout)
    grads = torch.autograd.grad(terms.loss, params)
    assert abs(terms.loss.item() - trl.item()) < 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(grads, trl_grads, strict=True)) < 1e-5
    assert max(g.abs().max().item() for g in trl_grads) > 1e-3


def test_the_full_logits_are_never_formed(monkeypatch) -> None:
    model = _lora_llama()
    rows: list[tuple[int, ...]] = []
    linear = torch.nn.functional.linear

    def recording(x, weight, bias=None):
        if weight.shape[0] == VOCAB:
            rows.append(tuple(x.shape[:-1]))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", recording)
    project = head_module._project  # the chunked head's projection (into a reused buffer)

    def projecting(x, weight, *args):
        rows.append(tuple(x.shape[:-1]))
        return project(x, weight, *args)

    monkeypatch.setattr(head_module, "_project", projecting)
    batch = collate_pairs(_pairs(seed=1), PAD)
    orpo_forward(model, _NoAdapter(), batch, lam=0.1, nll_on_prompt=True).loss.backward()
    targets = sum(batch[k].shape[1] for k in ("targets_chosen", "targets_rejected", "targets_prompt"))
    # The model's own logits_to_keep=1 call, then each target row once (no recomputation in backward).
    assert rows[0] == (len(LENGTHS), 1)
    assert sum(n for (n,) in rows[1:]) == targets and all(n <= CHUNK_ROWS for (n,) in rows[1:])
    assert targets < batch["input_ids"].numel()


def test_layout_argument_and_what_the_adapter_sees() -> None:
    model = _lora_llama()
    pairs = _pairs(seed=2)
    prefix_batch = collate_pairs(pairs, PAD)
    adapter = _NoAdapter()
    default = orpo_forward(model, adapter, prefix_batch, lam=0.1, nll_on_prompt=False)
    padded = orpo_forward(model, adapter, collate_pairs(pairs, PAD, layout="padded"), lam=0.1, nll_on_prompt=False,
                          layout="padded")
    torch.testing.assert_close(default.loss, padded.loss, rtol=0, atol=1e-5)
    # The adapter sees one row per pair with the prompt lengths, or the [2B, L] rows when run padded.
    assert adapter.batches[0]["attention_mask"].shape[0] == len(pairs)
    assert adapter.batches[0]["prompt_lengths"].tolist() == [p for p, _, _ in LENGTHS]
    assert adapter.batches[1]["attention_mask"].shape[0] == 2 * len(pairs)
    with pytest.raises(ValueError, match="layout"):
        orpo_forward(model, adapter, prefix_batch, lam=0.1, nll_on_prompt=False, layout="interleaved")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="collated with layout='prefix'"):
        orpo_forward(model, adapter, collate_pairs(pairs, PAD, layout="padded"), lam=0.1, nll_on_prompt=False,
                     layout="prefix")


def test_accumulated_micro_batches_equal_the_whole_batch_in_eval_mode() -> None:
    """Global normalisers over prefix micro-batches, under no_grad as evaluation runs it."""
    model = _lora_llama().eval()
    pairs = _pairs(seed=3) + _pairs(seed=4)
    with torch.no_grad():
        whole = orpo_forward(model, _NoAdapter(), collate_pairs(pairs, PAD), lam=0.1, nll_on_prompt=True)
        micro = [collate_pairs(pairs[:2], PAD), collate_pairs(pairs[2:], PAD)]
        counts = [count_normalizers(b, True) for b in micro]
        tokens, n = sum(c[0] for c in counts), sum(c[1] for c in counts)
        total = sum(
            orpo_forward(model, _NoAdapter(), b, lam=0.1, nll_on_prompt=True, num_nll_tokens=tokens, num_pairs=n).loss
            for b in micro
        )
    torch.testing.assert_close(total, whole.loss, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "prefix", "padded"])
def test_forward_and_backward_need_no_data_dependent_shapes(layout: str) -> None:
    """Under FakeTensorMode an op whose output size or value must be read on the host (nonzero, a boolean
    gather, .item()) raises: the whole step (model, attention, loss, backward) runs without one, so on a
    GPU nothing in it waits for the device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = _lora_llama()
    batch = collate_pairs(_pairs(seed=5), PAD, layout=layout)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        tokens, pairs = count_normalizers(fake, nll_on_prompt=True)
        terms = orpo_forward(model, _NoAdapter(), fake, lam=0.1, nll_on_prompt=True, num_nll_tokens=tokens,
                             num_pairs=pairs, layout=layout)
        terms.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
