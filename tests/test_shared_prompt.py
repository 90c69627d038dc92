"""Prefix sharing (orpo_cli.training.shared_prompt): the 4-D mask, the block attention, and loss/gradient parity with the
padded layout on Llama and Qwen2, with LoRA and with ReFT, one pair per row and packed (padding-free)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import orpo_cli.kernels.block_attention as blocks
import orpo_cli.training.shared_prompt as prefix
from orpo_cli.adapters import NoAdapter
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.kernels import apply_speed_paths
from orpo_cli.kernels.block_attention import block_attention
from orpo_cli.training.batching import collate_pairs, longest_sequence
from orpo_cli.training.forward import batch_layout, orpo_forward
from orpo_cli.training.loss import orpo_loss
from orpo_cli.training.shared_prompt import Segments, attention_mask_4d

VOCAB = 96
LENGTHS = [(3, 4, 2), (5, 1, 6), (2, 7, 3), (1, 2, 2)]  # (prompt, chosen, rejected) per pair


class _NoAdapter:
    packs_pairs = False

    def forward_context(self, model, batch):
        return contextlib.nullcontext()


def _pairs(seed: int = 0, lengths=LENGTHS) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)

    def toks(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=g).tolist()

    return [TokenizedPair(toks(p), toks(c), toks(r)) for p, c, r in lengths]


def _model(family: str, attn: str) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=48, pad_token_id=0, attn_implementation=attn)
    model = (LlamaForCausalLM(LlamaConfig(**shape)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**shape)))
    # LoRA with B != 0, so that the adapter's weights change the outputs and get non-trivial gradients.
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


def _run(model, batch, nll_on_prompt: bool, layout="prefix"):
    terms = orpo_forward(model, _NoAdapter(), batch, lam=0.1, nll_on_prompt=nll_on_prompt, layout=layout)
    terms.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return terms, grads


def _reference(model, pairs, nll_on_prompt: bool):
    """The straightforward computation: padded rows, full logits, the mask-based loss."""
    batch = collate_pairs(pairs, 0, layout="padded")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    terms = orpo_loss(logits, batch, lam=0.1, nll_on_prompt=nll_on_prompt)
    terms.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return terms, grads


def _assert_same(terms, grads, ref_terms, ref_grads, atol=2e-5):
    for name in ("loss", "nll", "or_loss", "chosen_logps", "rejected_logps", "log_odds"):
        torch.testing.assert_close(getattr(terms, name), getattr(ref_terms, name), rtol=0, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=atol, msg=name)
    assert max(g.abs().max().item() for g in ref_grads.values()) > 1e-3  # not a vacuous comparison


# ------------------------------------------------------------------------------------------ the mask
def test_mask_lets_each_response_see_the_prompt_and_itself_only():
    batch = collate_pairs([TokenizedPair([1, 2], [3, 4], [5, 6, 7])], 0, pad_to_multiple_of=8)
    mask = attention_mask_4d(batch)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool
    # columns: P P C C R R R pad
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],  # chosen: prompt + earlier chosen
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # rejected: prompt + earlier rejected, never chosen
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # padding: itself only (no empty row, no NaN)
    ]
    assert mask[0, 0].int().tolist() == expected
    additive = attention_mask_4d(batch, additive_dtype=torch.float32)
    assert torch.equal(additive == 0, mask)
    assert additive.min().item() == torch.finfo(torch.float32).min


def test_packed_mask_keeps_pairs_apart():
    batch = collate_pairs([TokenizedPair([1], [2], [3, 4]), TokenizedPair([5, 6], [7], [8])], 0, layout="packed",
                          pad_to_multiple_of=10)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 1, 2, 0, 1, 2, 2, 3, 4]]
    # columns: P C R R | P P C R | pad pad
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 0, 0, 0, 0, 0],  # the second pair sees nothing of the first
        [0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
    ]
    assert attention_mask_4d(batch)[0, 0].int().tolist() == expected


def test_pack_rows_fills_rows_in_order():
    assert prefix.pack_rows([3, 4, 5, 2, 9], width=8) == [(0, 0), (0, 3), (1, 0), (1, 5), (2, 0)]
    assert prefix.pack_rows([10, 1], width=8) == [(0, 0), (1, 0)]  # longer than a row: a row of its own


@pytest.mark.parametrize("pack_width", [None, 20, 10_000])
def test_block_attention_equals_sdpa_under_the_dense_mask(pack_width):
    torch.manual_seed(0)
    if pack_width is None:
        batch = collate_pairs(_pairs(), 0, pad_to_multiple_of=4)
    else:
        batch = prefix.collate_prefix(_pairs(), 0, pad_to_multiple_of=4, pack=True, pack_width=pack_width)
    b, width = batch["input_ids"].shape
    q = torch.randn(b, 4, width, 8, requires_grad=True)
    k = torch.randn(b, 2, width, 8, requires_grad=True)
    v = torch.randn(b, 2, width, 8, requires_grad=True)
    out = block_attention(q, k, v, batch["segments"], scaling=0.3)  # [B, W, H, d]
    dense = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=attention_mask_4d(batch), scale=0.3
    ).transpose(1, 2)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], dense[real], rtol=0, atol=1e-6)
    assert out[~real].abs().max().item() == 0.0  # padding columns are zeros
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight)[real].sum(), (q, k, v))
    dense_grads = torch.autograd.grad((dense * weight)[real].sum(), (q, k, v))
    for g, d in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(g, d, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------- parity with the padded layout
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_layout_gives_the_padded_loss_and_gradients(family, attn, monkeypatch):
    model = _model(family, attn)
    pairs = _pairs(seed=1)
    calls = []
    real_block = blocks.block_attention
    monkeypatch.setattr(blocks, "block_attention", lambda *a, **k: calls.append(1) or real_block(*a, **k))
    installed = apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=NoAdapter(),
                                  only=("block_attention",))
    assert installed.applied == ({"block_attention": 2} if attn == "sdpa" else {})
    for nll_on_prompt in (False, True):
        ref_terms, ref_grads = _reference(model, pairs, nll_on_prompt)
        batches = {layout: collate_pairs(pairs, 0, layout=layout) for layout in ("padded", "prefix", "packed")}
        batches["packed, 3 rows"] = prefix.collate_prefix(pairs, 0, pack=True, pack_width=20)
        for name, batch in batches.items():
            terms, grads = _run(model, batch, nll_on_prompt, layout=name.split(",")[0])
            _assert_same(terms, grads, ref_terms, ref_grads)
    assert batches["packed"]["input_ids"].shape == (1, sum(map(sum, LENGTHS)))  # one row, no padding at all
    assert batches["packed, 3 rows"]["segments"].starts == ((0, 0), (1, 0), (2, 0), (2, 12))
    # sdpa runs the exact per-pair blocks (once per layer and prefix forward); eager the dense 4-D mask.
    assert len(calls) == (2 * 3 * 2 if attn == "sdpa" else 0)
    installed.undo()


def test_dense_mask_path_without_block_attention_gives_the_same_loss():
    """The 4-D mask alone is correct: what any sdpa kernel that ignores the segments keyword computes."""
    model = _model("llama", "sdpa")
    batch = collate_pairs(_pairs(seed=2), 0)
    with apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=NoAdapter(), only=("block_attention",)):
        ref_terms, ref_grads = _run(model, batch, True)
    terms, grads = _run(model, batch, True)  # without the block attention, the segments keyword is ignored
    _assert_same(terms, grads, ref_terms, ref_grads)


def test_gradient_checkpointing_recomputes_the_same_blocks():
    grads = []
    for checkpointing in (False, True):
        model = _model("llama", "sdpa")
        if checkpointing:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        grads.append(_run(model, collate_pairs(_pairs(seed=3), 0), False)[1])
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_reft_edits_the_shared_prompt_as_it_edits_both_padded_rows(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from orpo_cli.adapters.reft.adapter import ReftAdapter
    from orpo_cli.adapters.reft.interventions import find_stack
    from orpo_cli.recipe import ReftSettings

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, pad_token_id=0))
    adapter = ReftAdapter(ReftSettings(layers="all", positions="f2+l2"))
    model = adapter.attach(base, quantized=False, gradient_checkpointing=False)
    with torch.no_grad():  # make the edits large, so that a misplaced edit cannot hide
        for groups in find_stack(model).layers.values():
            for module in groups.values():
                module.source.weight.mul_(20.0)
                module.source.bias.normal_(0.0, 2.0)
    pairs = _pairs(seed=4, lengths=[(6, 3, 2), (4, 1, 5), (7, 2, 2)])
    results = {}
    for layout in ("padded", "prefix"):
        terms = orpo_forward(model, adapter, collate_pairs(pairs, 0, layout=layout), lam=0.1, nll_on_prompt=True,
                             layout=layout)
        terms.loss.backward()
        results[layout] = terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
    _assert_same(*results["prefix"], *results["padded"])
    with adapter.disabled(model):  # and the edits do change the loss
        off = orpo_forward(model, adapter, collate_pairs(pairs, 0), lam=0.1, nll_on_prompt=True)
    assert abs(off.loss.item() - results["prefix"][0].loss.item()) > 1e-3
    # ReFT edits each row's prompt: it never gets packed rows, and refuses them if given.
    assert batch_layout(adapter, model, longest_sequence(pairs)) == "prefix"
    with pytest.raises(ValueError, match="rows but 3 prompt lengths"):
        orpo_forward(model, adapter, collate_pairs(pairs, 0, layout="packed"), lam=0.1, nll_on_prompt=True,
                     layout="packed")


# ------------------------------------------------------------------------- the layout, chosen at setup
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_lora_batches_are_packed_only_under_sdpa(attn):
    """Packed rows pay off only where the block attention confines each pair to its columns (sdpa); eager
    attention would score whole packed rows, so it gets one row per pair."""
    from orpo_cli.adapters.lora import LoraAdapter
    from orpo_cli.adapters.reft.adapter import ReftAdapter
    from orpo_cli.recipe import LoraSettings, ReftSettings

    model = _model("llama", attn)
    assert batch_layout(LoraAdapter(LoraSettings()), model, 64) == ("packed" if attn == "sdpa" else "prefix")
    assert batch_layout(ReftAdapter(ReftSettings()), model, 64) == "prefix"


def test_models_without_masked_attention_run_padded(monkeypatch):
    """A model whose attention cannot take a 4-D mask (flash-attention) gets the padded layout, chosen once at
    setup, with the prefix layout's loss; a prefix batch is refused on it rather than run wrong."""
    model = _model("llama", "sdpa")
    pairs = _pairs(seed=6)
    ref = orpo_forward(model, _NoAdapter(), collate_pairs(pairs, 0), lam=0.1, nll_on_prompt=False)
    flash = lambda _model: "flash_attention_2"  # noqa: E731
    monkeypatch.setattr(prefix, "attention_implementation", flash)
    monkeypatch.setattr("orpo_cli.training.forward.attention_implementation", flash)
    layout = batch_layout(_NoAdapter(), model, longest_sequence(pairs))
    assert layout == "padded"
    got = orpo_forward(model, _NoAdapter(), collate_pairs(pairs, 0, layout=layout), lam=0.1, nll_on_prompt=False,
                       layout=layout)
    torch.testing.assert_close(got.loss, ref.loss, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sdpa or eager"):
        orpo_forward(model, _NoAdapter(), collate_pairs(pairs, 0), lam=0.1, nll_on_prompt=False, layout="prefix")


@pytest.mark.parametrize("window", [3, 64])
def test_a_sliding_window_shorter_than_the_sequences_runs_padded(window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=48, pad_token_id=0,
                                             sliding_window=window, attn_implementation="sdpa"))
    pairs = _pairs(seed=7)
    layout = batch_layout(_NoAdapter(), model, longest_sequence(pairs))
    assert layout == ("padded" if window == 3 else "prefix")  # the window (3) would cut these sequences: padded
    ref_terms, ref_grads = _reference(model, pairs, True)
    terms, grads = _run(model, collate_pairs(pairs, 0, layout=layout), True, layout=layout)
    _assert_same(terms, grads, ref_terms, ref_grads)


def test_segments_masks_are_lower_right_causal():
    seg = Segments([(2, 5, 3)])
    assert seg.rejected_mask(0, torch.device("cpu")).int().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]


@pytest.mark.parametrize("pack_width", [None, 12, 25, 10_000])
def test_the_mask_from_the_segments_is_the_mask_from_the_columns(pack_width):
    """The host-side lengths write the same mask block by block as the per-column ids derive (rows, padding, packing)."""
    pairs = _pairs(seed=4)
    if pack_width is None:
        batch = collate_pairs(pairs, 0, pad_to_multiple_of=8)
    else:
        batch = prefix.collate_prefix(pairs, 0, pad_to_multiple_of=8, pack=True, pack_width=pack_width)
    fast = attention_mask_4d(batch)
    derived = attention_mask_4d({k: v for k, v in batch.items() if k != "segments"})
    assert fast.shape == derived.shape and torch.equal(fast, derived)
    assert not fast.all() and fast.any()
    wrong = {**batch, "segments": Segments([(p, c + 1, r - 1) for p, c, r in batch["segments"].lengths],
                                           batch["segments"].starts)}
    assert not torch.equal(attention_mask_4d(wrong), derived)  # the comparison can fail
