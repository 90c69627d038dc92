"""The model forward that feeds the ORPO loss, shared by training and evaluation.

The top-level model is called (so DDP/FSDP wrappers and adapter hooks run as usual) with
`logits_to_keep=1`, which skips the full-vocabulary projection; the decoder's last hidden state is
captured by a hook and the loss projects only the rows it needs, in chunks (see loss.py).

The batch layouts (see batching.py), chosen by the `layout` argument or, by default, by the batch itself:

* ``prefix``: one ``[prompt | chosen | rejected]`` row per pair, the model called with a 4-D attention
  mask and position ids (training/shared_prompt.py), so each prompt runs once; with ``sdpa``, each pair's attention runs
  on exactly the blocks the mask allows. Needs an attention implementation that applies custom 4-D
  masks (``sdpa``, ``eager``) and no sliding window shorter than the sequences; for any other model the
  batch is turned into the padded layout on the device first (`prefix.to_padded`, no host sync).
  The ``packed`` layout is the same with several pairs per row (padding-free); it runs the same way.
* ``padded``: ``[2B, L]`` chosen-then-rejected rows with a 2-D padding mask, as TRL does: the
  straightforward computation, kept for parity tests and as the fallback.

Adapters see the batch they were given: `adapter.forward_context(model, batch)` wraps the forward in both
layouts, and both carry a 2-D `attention_mask` and per-pair `prompt_lengths` (in the prefix layout one row
per pair, so the prompt's first and last positions are each edited once).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from orpo_cli.adapters import Adapter
from orpo_cli.training.batching import LAYOUTS, Layout
from orpo_cli.training.loss import ORPOTerms, orpo_loss_from_hidden
from orpo_cli.training.recompute import recomputing
from orpo_cli.training.shared_prompt import (
    attention_implementation,
    is_prefix_batch,
    model_inputs,
    supports_prefix,
    to_padded,
)


def orpo_forward(
    model: nn.Module,
    adapter: Adapter,
    batch: dict[str, torch.Tensor],
    *,
    lam: float,
    nll_on_prompt: bool,
    num_nll_tokens: torch.Tensor | int | None = None,
    num_pairs: torch.Tensor | int | None = None,
    layout: Layout | None = None,
) -> ORPOTerms:
    """ORPO terms of one collated batch (see batching.collate_pairs for the layouts).

    `layout`: None runs the batch in the layout it was collated in (prefix batches fall back to padded
    on models that cannot take a 4-D mask); ``"padded"`` runs it padded, turning a prefix batch into
    that layout; ``"prefix"`` (or ``"packed"``) insists on prefix sharing and raises where it cannot run.
    """
    inner = _unwrap(model)
    batch = _in_layout(inner, batch, layout)
    if is_prefix_batch(batch):
        inputs = model_inputs(inner, batch)
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with adapter.forward_context(inner, batch), recomputing(inner), _capture_hidden(inner.get_decoder()) as captured:
        model(**inputs, use_cache=False, logits_to_keep=1)
    return orpo_loss_from_hidden(
        captured["hidden"],
        inner.get_output_embeddings(),
        batch,
        lam=lam,
        nll_on_prompt=nll_on_prompt,
        num_nll_tokens=num_nll_tokens,
        num_pairs=num_pairs,
    )


def batch_layout(adapter: Adapter, model: nn.Module) -> Layout:
    """The layout training and eval collate: padding-free rows where the adapter and the attention allow them.

    Packing needs an adapter that reads nothing per row (`Adapter.packs_pairs`) and ``sdpa`` attention, whose
    block attention runs each pair on its own columns; any other attention would score every column of a
    packed row against every other (quadratic in the row's width), so it gets one row per pair.
    """
    sdpa = attention_implementation(_unwrap(model)) == "sdpa"
    return "packed" if adapter.packs_pairs and sdpa else "prefix"


def _in_layout(model: nn.Module, batch: Mapping[str, torch.Tensor], layout: Layout | None) -> dict[str, Any]:
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    prefix = is_prefix_batch(batch)
    if layout in ("prefix", "packed"):
        if not prefix:
            raise ValueError(f"layout={layout!r} needs a batch collated with layout='prefix' or 'packed'")
        if not supports_prefix(model, batch):
            raise ValueError(
                f"layout={layout!r} needs sdpa or eager attention (custom 4-D masks) and no sliding window shorter "
                f"than the sequences; this model uses {model.config._attn_implementation}"
            )
    if prefix and (layout == "padded" or not supports_prefix(model, batch)):
        return to_padded(batch)
    return dict(batch)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside distributed wrappers (DDP's .module), which owns get_decoder()."""
    while hasattr(model, "module") and not hasattr(model, "get_decoder"):
        model = model.module
    return model


def last_hidden(output: Any) -> torch.Tensor:
    """The last hidden state in a decoder's output (a ModelOutput, or a tuple from some wrappers)."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


@contextlib.contextmanager
def _capture_hidden(decoder: nn.Module) -> Iterator[dict[str, Any]]:
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured["hidden"] = last_hidden(output)

    handle = decoder.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
