"""The CPU tiled block attention (orpo_cli.kernels.attention_tiles): its blocks, and its output and gradients
against plain sdpa under the prefix layout's dense 4-D mask (float64), with tiles small enough that every
query tile merges several key blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import orpo_cli.kernels.attention_tiles as tiles_mod
import orpo_cli.training.shared_prompt as prefix
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.kernels.attention_tiles import Block, plan_tiles, tiled_attention
from orpo_cli.kernels.block_attention import block_attention
from orpo_cli.training.shared_prompt import attention_mask_4d

pytestmark = pytest.mark.skipif(not tiles_mod.available(), reason="this torch has no CPU flash-attention operators")


def _batch(lengths, pack_width=None, pad=0):
    pairs = [TokenizedPair([1] * p, [2] * c, [3] * r) for p, c, r in lengths]
    if pack_width is None:
        return prefix.collate_prefix(pairs, 0, pad_to_multiple_of=pad or None)
    return prefix.collate_prefix(pairs, 0, pad_to_multiple_of=pad or None, pack=True, pack_width=pack_width)


def _qkv(batch, heads=4, kv_heads=2, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows, width = batch["input_ids"].shape
    q = torch.randn(rows, heads, width, dim, generator=g, dtype=dtype)
    k = torch.randn(rows, kv_heads, width, dim, generator=g, dtype=dtype)
    v = torch.randn(rows, kv_heads, width, dim, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _dense(q, k, v, batch, scale):
    groups = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1),
        attn_mask=attention_mask_4d(batch), scale=scale,
    )
    return out.transpose(1, 2)


def test_plan_cuts_each_part_into_tiles_with_the_keys_the_mask_allows():
    # One pair at column 2 of row 1: prompt 3 columns [2, 5), chosen 2 [5, 7), rejected 4 [7, 11); tiles of 2.
    plan = plan_tiles([(3, 2, 4)], [(1, 2)], tile=2)
    assert plan == [
        [Block(1, 2, 4, 2, 4, True)],  # prompt + chosen, first tile: itself, causally
        [Block(1, 4, 6, 2, 4, False), Block(1, 4, 6, 4, 6, True)],
        [Block(1, 6, 7, 2, 6, False), Block(1, 6, 7, 6, 7, True)],
        [Block(1, 7, 9, 2, 5, False), Block(1, 7, 9, 7, 9, True)],  # rejected: the prompt, then itself
        [Block(1, 9, 11, 2, 5, False), Block(1, 9, 11, 7, 9, False), Block(1, 9, 11, 9, 11, True)],
    ]
    with pytest.raises(ValueError, match="tile"):
        plan_tiles([(1, 1, 1)], [(0, 0)], tile=0)


@pytest.mark.parametrize("tile", [1, 3, 5, 128])
@pytest.mark.parametrize("packed", [False, True])
def test_tiles_give_the_dense_masked_attention_and_its_gradients(tile, packed):
    lengths = [(7, 5, 9), (2, 11, 4), (5, 1, 13), (1, 3, 2)]
    batch = _batch(lengths, pack_width=30 if packed else None, pad=4)
    segments = batch["segments"]
    q, k, v = _qkv(batch)
    out = tiled_attention(q, k, v, plan_tiles(segments.lengths, segments.starts, tile), 0.3)
    ref = _dense(q, k, v, batch, 0.3)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real].double(), ref[real], rtol=0, atol=2e-6)
    assert out[~real].abs().max().item() == 0.0  # padding columns are zeros
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weight)[real].sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight.double())[real].sum(), (q, k, v))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=0, atol=1e-5)
    assert max(r.abs().max().item() for r in ref_grads) > 0.1  # not a vacuous comparison


def test_tiles_in_bf16_stay_close_to_the_float64_attention():
    batch = _batch([(9, 6, 12), (3, 14, 5)], pack_width=64)
    segments = batch["segments"]
    q, k, v = _qkv(batch, dtype=torch.bfloat16)
    out = tiled_attention(q, k, v, plan_tiles(segments.lengths, segments.starts, 4), None)
    assert out.dtype == torch.bfloat16
    ref = _dense(q, k, v, batch, None)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real].double(), ref[real], rtol=0, atol=2e-2)


def test_a_wrong_block_is_caught():
    """The comparison above can fail: a plan that lets the rejected tiles see one chosen column differs."""
    lengths = [(4, 3, 5)]
    batch = _batch(lengths)
    q, k, v = _qkv(batch)
    plan = plan_tiles(lengths, [(0, 0)], tile=2)
    wrong = [[b._replace(k1=b.k1 + 1) if (not b.causal and b.k0 == 0 and b.q0 >= 7) else b for b in t] for t in plan]
    assert wrong != plan
    out = tiled_attention(q, k, v, wrong, None)
    ref = _dense(q, k, v, batch, None)
    assert (out[0, 7:].double() - ref[0, 7:]).abs().max().item() > 1e-3


def test_block_attention_takes_the_tiles_on_a_cpu_and_the_sdpa_blocks_otherwise(monkeypatch):
    batch = _batch([(6, 4, 7), (2, 9, 3)], pack_width=64, pad=8)
    q, k, v = _qkv(batch)
    calls = []
    real_tiled = tiles_mod.tiled_attention
    monkeypatch.setattr(tiles_mod, "tiled_attention", lambda *a: calls.append(1) or real_tiled(*a))
    tiled = block_attention(q, k, v, batch["segments"], scaling=0.5)
    assert calls == [1]
    block_attention(q, k, v, batch["segments"], scaling=0.5, dropout=0.5)
    assert calls == [1]  # attention dropout: the plain sdpa blocks (the CPU operators are called without it)
    monkeypatch.setattr(tiles_mod, "available", lambda: False)
    plain = block_attention(q, k, v, batch["segments"], scaling=0.5)
    assert calls == [1]
    torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-6)


def test_under_autocast_the_tiles_run_in_its_dtype():
    """Under CPU autocast (the planner's tests simulate a CUDA step so) q, k and v are cast as sdpa casts them."""
    batch = _batch([(5, 6, 7)])
    segments = batch["segments"]
    q, k, v = _qkv(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiled_attention(q, k.bfloat16(), v, plan_tiles(segments.lengths, segments.starts, 4), None)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[0].double(), _dense(q, k, v, batch, None)[0], rtol=0, atol=3e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().max().item() > 0


@pytest.mark.real
@pytest.mark.slow
def test_real_smollm2_layers_give_the_padded_layouts_loss_and_gradients_through_the_tiles(smollm2_four_layers):
    """Four real SmolLM2 layers, pairs longer than a tile (so every rejected tile merges three blocks): the packed
    layout, through the tiles, against the padded layout (plain sdpa with a 2-D mask, as TRL runs it)."""
    import contextlib

    from orpo_cli.kernels import apply_speed_paths
    from orpo_cli.training.batching import collate_pairs
    from orpo_cli.training.forward import orpo_forward

    class _NoAdapter:
        def forward_context(self, model, batch):
            return contextlib.nullcontext()

    model = smollm2_four_layers
    g = torch.Generator().manual_seed(7)
    lengths = [(150, 170, 300), (40, 260, 140)]
    pairs = [TokenizedPair(*(torch.randint(1, 40000, (n,), generator=g).tolist() for n in ns)) for ns in lengths]
    params = [p for p in model.parameters() if p.requires_grad]
    calls = []
    real_tiled = tiles_mod.tiled_attention
    results = {}
    installed = apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=_NoAdapter(),
                                  only=("block_attention",))
    for layout in ("padded", "packed"):
        tiles_mod.tiled_attention = lambda *a: calls.append(1) or real_tiled(*a)
        try:
            terms = orpo_forward(model, _NoAdapter(), collate_pairs(pairs, 2, layout=layout), lam=0.1,
                                 nll_on_prompt=True, layout=layout)
            results[layout] = (terms.loss.detach(), torch.autograd.grad(terms.loss, params))
        finally:
            tiles_mod.tiled_attention = real_tiled
        if layout == "padded":
            assert calls == []
    installed.undo()
    assert len(calls) == 4  # one call per layer in the packed forward
    (loss_p, grads_p), (loss_t, grads_t) = results["padded"], results["packed"]
    torch.testing.assert_close(loss_t, loss_p, rtol=0, atol=2e-5)
    for a, b in zip(grads_t, grads_p, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)
    assert max(g.abs().max().item() for g in grads_p) > 1e-3
