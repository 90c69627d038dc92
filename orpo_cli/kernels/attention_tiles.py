"""Block attention on a CPU, in tiles: each pair's attention computes only the scores its mask keeps.

A prefix/packed pair ``[prompt | chosen | rejected]`` (training/shared_prompt.py) needs, per query, the
keys of the prompt and the earlier tokens of its own part. Two plain ``sdpa`` calls per pair (prompt +
chosen causally, rejected against ``[prompt | rejected]`` under a mask) are exact, but torch's CPU
flash kernel skips masked scores only in whole key blocks of 512 columns: below that it computes every
score of a causal or masked block and discards half of them (docs/performance.md says how many at
SmolLM2-135M's shape).

Here each part's queries are cut into tiles of :data:`TILE` rows, and each tile attends to at most three
key blocks: the whole prompt and the earlier tiles of its part as dense blocks (no mask), its own tile
causally (a square block, where ``is_causal`` is exact). The blocks' outputs are merged by their
log-sum-exps, as flash attention merges its key blocks; the backward runs the kernel's backward once per
block with the merged output and log-sum-exp, which is the exact gradient of each block's share. What is
computed is the causal triangle plus ``TILE / 2`` columns per query, instead of full squares.

This calls ATen's CPU flash-attention operators (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward, the ones ``F.scaled_dot_product_attention`` dispatches to on a CPU) directly, because the public
function returns no log-sum-exp. torch is pinned by the lock; :func:`available` says whether the running
torch has them, and the caller takes the plain ``sdpa`` blocks where it does not (or on other devices, or
with attention dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

TILE = 128
"""Query rows per tile. Smaller tiles discard fewer scores but make more, smaller kernel calls; 128 was
the fastest of 64-256 measured (docs/performance.md)."""


class Block(NamedTuple):
    """Queries ``[q0, q1)`` of `row` against keys ``[k0, k1)`` (columns of that row); causal: a square block
    whose query i sees keys up to i (``q0 == k0``)."""

    row: int
    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


def available() -> bool:
    """Whether this torch has the CPU flash-attention operators the tiles call."""
    aten = torch.ops.aten
    return hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


def plan_tiles(
    lengths: Sequence[tuple[int, int, int]], starts: Sequence[tuple[int, int]], tile: int = TILE
) -> list[list[Block]]:
    """The key blocks of every query tile of every pair: one list of blocks (same queries) per tile.

    Pair i at (row, column s) with lengths (P, C, R): its prompt + chosen columns ``[s, s + P + C)`` and its
    rejected columns ``[r, r + R)`` (``r = s + P + C``) are cut into tiles; a tile ``[a, b)`` of the first
    attends to ``[s, a)`` densely and ``[a, b)`` causally, one of the second to the prompt ``[s, s + P)``
    and ``[r, a)`` densely and ``[a, b)`` causally.
    """
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    tiles: list[list[Block]] = []
    for (p, c, r), (row, s) in zip(lengths, starts, strict=True):
        for begin, end, prompt in ((s, s + p + c, None), (s + p + c, s + p + c + r, (s, s + p))):
            for a in range(begin, end, tile):
                b = min(a + tile, end)
                blocks = []
                if prompt is not None and prompt[1] > prompt[0]:
                    blocks.append(Block(row, a, b, prompt[0], prompt[1], False))
                if a > begin:
                    blocks.append(Block(row, a, b, begin, a, False))
                blocks.append(Block(row, a, b, a, b, True))
                tiles.append(blocks)
    return tiles


def tiled_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tiles: list[list[Block]], scale: float | None
) -> torch.Tensor:
    """Attention of `query` ``[rows, Hq, W, d]`` over `key`/`value` ``[rows, Hkv, W, d]`` on the blocks of
    `tiles` (:func:`plan_tiles`); ``[rows, W, Hq, d]`` (transformers' layout), zeros in columns no tile covers.

    In autocast's dtype under autocast, as ``sdpa`` would be (the operators called are not autocast's); else
    in the dtype q, k and v promote to (RoPE may leave q and k in fp32 beside a bf16 v).
    """
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    query, key, value = (t.to(dtype) for t in (query, key, value))
    return _TiledAttention.apply(query, key, value, tiles, scale)


def _forward_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, query, key, value, tiles, scale):  # type: ignore[override]
        rows, heads, width, dim = query.shape
        out = query.new_zeros(rows, width, heads, dim)
        by_head = out.permute(0, 2, 1, 3)  # [rows, Hq, W, d] view of the output
        lse = torch.zeros(rows, heads, width, dtype=torch.float32, device=query.device)
        for blocks in tiles:
            row, q0, q1 = blocks[0].row, blocks[0].q0, blocks[0].q1
            q = query[row : row + 1, :, q0:q1]
            parts = [
                _forward_block(q, key[row : row + 1, :, b.k0 : b.k1], value[row : row + 1, :, b.k0 : b.k1], b.causal, scale)
                for b in blocks
            ]
            if len(parts) == 1:
                by_head[row : row + 1, :, q0:q1], lse[row : row + 1, :, q0:q1] = parts[0]
                continue
            sums = torch.stack([part_lse.float() for _, part_lse in parts])  # [blocks, 1, Hq, n]
            total = torch.logsumexp(sums, dim=0)
            weights = (sums - total).exp_().unsqueeze(-1)
            merged = parts[0][0].float() * weights[0]
            for (o, _), w in zip(parts[1:], weights[1:], strict=True):
                merged.addcmul_(o.float(), w)
            by_head[row : row + 1, :, q0:q1] = merged
            lse[row : row + 1, :, q0:q1] = total
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.tiles, ctx.scale = tiles, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out):  # type: ignore[override]
        query, key, value, out, lse = ctx.saved_tensors
        grad_by_head, out_by_head = grad_out.permute(0, 2, 1, 3), out.permute(0, 2, 1, 3)
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        for blocks in ctx.tiles:
            row, q0, q1 = blocks[0].row, blocks[0].q0, blocks[0].q1
            rows = slice(row, row + 1)
            g, q = grad_by_head[rows, :, q0:q1], query[rows, :, q0:q1]
            o, o_lse = out_by_head[rows, :, q0:q1], lse[rows, :, q0:q1]
            for b in blocks:
                gq, gk, gv = backward(
                    g, q, key[rows, :, b.k0 : b.k1], value[rows, :, b.k0 : b.k1], o, o_lse, 0.0, b.causal, scale=ctx.scale
                )
                dq[rows, :, q0:q1] += gq
                dk[rows, :, b.k0 : b.k1] += gk
                dv[rows, :, b.k0 : b.k1] += gv
        return dq, dk, dv, None, None
