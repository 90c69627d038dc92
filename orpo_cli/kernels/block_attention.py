"""Block attention for prefix and packed batches: each pair's attention on exactly the blocks its mask allows.

A prefix/packed batch (training/shared_prompt.py) carries a dense 4-D mask, exact for any kernel, and, under the
keyword :data:`PREFIX_KWARG`, the host-side per-pair lengths (``Segments``). transformers looks a model's
attention function up by name (``"sdpa"``) in one process-wide table; :func:`install` puts a wrapper there that,
for an attention module of a model it was installed on and given the segments (no KV cache, no soft-capping),
runs :func:`block_attention`: prompt + chosen causally (``is_causal``, no mask), rejected against
``[prompt | rejected]`` under a small lower-right causal mask (on a CPU without dropout, the same blocks in query
tiles that skip the masked scores: kernels/attention_tiles.py). Every other call, and every other model, runs the
original function with the dense mask. :func:`uninstall` unmarks the model; the original function is registered
again once no model uses the wrapper. The wrapper stays for the whole run, not one forward, because activation
checkpointing re-runs a layer after the forward call has returned.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orpo_cli.kernels import attention_tiles

PREFIX_KWARG = "orpo_prefix"
"""The keyword under which the forward hands the per-pair lengths to the attention function."""

_MARK = "_orpo_block_attention"


def block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    segments: Any,
    *,
    dropout: float = 0.0,
    scaling: float | None = None,
) -> torch.Tensor:
    """Attention of a prefix batch, pair by pair, on exactly the blocks the 4-D mask allows.

    `query` is ``[rows, Hq, W, d]``, `key` and `value` ``[rows, Hkv, W, d]`` (``Hq`` a multiple of ``Hkv``).
    Pair i's prompt + chosen columns attend causally among themselves; its rejected columns attend to
    ``[prompt | rejected]`` under :meth:`Segments.rejected_mask`; padding columns get zeros. Returns
    ``[rows, W, Hq, d]``, the layout transformers' attention functions return. The loop is over pairs (a
    handful per micro-batch), never over tokens; the splits are views, so the backward pass stitches the
    gradients together without scattering into zero-filled copies. On a CPU without attention dropout the
    same blocks run in tiles instead (kernels/attention_tiles.py), which skips the scores the mask discards.
    """
    if query.device.type == "cpu" and not dropout and attention_tiles.available():
        return attention_tiles.tiled_attention(query, key, value, segments.tiles(), scaling)
    width, heads, dim = query.shape[2], query.shape[1], query.shape[3]
    gqa = key.shape[1] != heads
    masked_gqa = gqa and query.device.type == "cpu"  # elsewhere masked GQA falls back to the math kernel
    out_rows = []
    for members, q, k, v in zip(
        segments.by_row(query.shape[0]), query.unbind(0), key.unbind(0), value.unbind(0), strict=True
    ):
        sizes = [n for i in members for n in (sum(segments.lengths[i][:2]), segments.lengths[i][2])]
        pad = width - sum(sizes)
        q_parts, k_parts, v_parts = (t.unsqueeze(0).split([*sizes, pad], dim=2) for t in (q, k, v))
        pieces = []
        for slot, pair in enumerate(members):
            p = segments.lengths[pair][0]
            q_pc, q_r = q_parts[2 * slot], q_parts[2 * slot + 1]
            k_pc, k_r = k_parts[2 * slot], k_parts[2 * slot + 1]
            v_pc, v_r = v_parts[2 * slot], v_parts[2 * slot + 1]
            pieces.append(F.scaled_dot_product_attention(
                q_pc, k_pc, v_pc, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa
            ))
            k_pr, v_pr = torch.cat([k_pc[:, :, :p], k_r], dim=2), torch.cat([v_pc[:, :, :p], v_r], dim=2)
            if gqa and not masked_gqa:
                k_pr = k_pr.repeat_interleave(heads // k_pr.shape[1], dim=1)
                v_pr = v_pr.repeat_interleave(heads // v_pr.shape[1], dim=1)
            pieces.append(F.scaled_dot_product_attention(
                q_r, k_pr, v_pr, attn_mask=segments.rejected_mask(pair, query.device),
                dropout_p=dropout, scale=scaling, enable_gqa=masked_gqa,
            ))
        if pad:
            pieces.append(query.new_zeros(1, heads, pad, dim))
        out_rows.append(torch.cat(pieces, dim=2))
    return torch.cat(out_rows, dim=0).transpose(1, 2).contiguous()


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def declines(model: nn.Module) -> str | None:
    """Why :func:`install` would change nothing for `model`, or None."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != "sdpa":
        return f"attention is {implementation}, not sdpa"
    if not _attention_modules(model):
        return "no attention module found"
    return None


def install(model: nn.Module) -> int:
    """Run prefix batches of `model` through :func:`block_attention` (idempotent); returns how many attention
    modules do."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    modules = _attention_modules(model)
    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not hasattr(current, "_orpo_original"):
        current = _wrapper(current)
        AttentionInterface.register("sdpa", current)
    for module in modules:
        if not getattr(module, _MARK, False):
            setattr(module, _MARK, True)
            current._orpo_users += 1
    return len(modules)


def uninstall(model: nn.Module) -> None:
    """Undo :func:`install` for `model`; transformers' own ``sdpa`` is registered again once no model uses it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    for module in model.modules():
        if getattr(module, _MARK, False):
            delattr(module, _MARK)
            if hasattr(current, "_orpo_original"):
                current._orpo_users -= 1
    if hasattr(current, "_orpo_original") and current._orpo_users <= 0:
        AttentionInterface.register("sdpa", current._orpo_original)


def _wrapper(original: Any) -> Any:
    def sdpa_with_prefix(module, query, key, value, attention_mask, *args, **kwargs):  # noqa: ANN001, ANN202
        segments = kwargs.pop(PREFIX_KWARG, None)
        if (
            segments is None
            or not getattr(module, _MARK, False)
            or query.shape[2] != key.shape[2]
            or kwargs.get("softcap") is not None
        ):
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        dropout = kwargs.get("dropout", args[0] if args else 0.0)
        scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
        return block_attention(query, key, value, segments, dropout=dropout, scaling=scaling), None

    sdpa_with_prefix._orpo_original = original  # type: ignore[attr-defined]
    sdpa_with_prefix._orpo_users = 0  # type: ignore[attr-defined]
    return sdpa_with_prefix
