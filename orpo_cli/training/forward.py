"""The model forward that feeds the ORPO loss, shared by training and evaluation.

The top-level model is called (so DDP/FSDP wrappers and adapter hooks run as usual) with
`logits_to_keep=1`, which skips the full-vocabulary projection; the decoder's last hidden state is
captured by a hook and the loss projects only the rows it needs, in chunks (see loss.py).

The batch layouts (see batching.py); a run's layout is chosen once, at setup, by `batch_layout` (from the
adapter, the model's attention and the longest sequence of the data), every batch is collated in it, and
`orpo_forward` is told it (`layout=`): nothing is worked out again per step.

* ``prefix``: one ``[prompt | chosen | rejected]`` row per pair, the model called with a 4-D attention
  mask and position ids (training/shared_prompt.py), so each prompt runs once; with ``sdpa``, each pair's attention runs
  on exactly the blocks the mask allows. Needs an attention implementation that applies custom 4-D
  masks (``sdpa``, ``eager``) and no sliding window shorter than the sequences; any other model is given
  the padded layout by `batch_layout`. The ``packed`` layout is the same with several pairs per row
  (padding-free); it runs the same way.
* ``padded``: ``[2B, L]`` chosen-then-rejected rows with a 2-D padding mask, as TRL does: the
  straightforward computation, kept for parity tests and for the models that cannot take the others.

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
from orpo_cli.kernels.recompute import recomputing
from orpo_cli.layouts import MASKED_ATTENTION, choose_layout
from orpo_cli.training.batching import DEFAULT_LAYOUT, LAYOUTS, Layout
from orpo_cli.training.loss import ORPOTerms, orpo_loss_from_hidden
from orpo_cli.training.shared_prompt import (
    attention_implementation,
    model_inputs,
    sliding_window,
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
    layout: Layout = DEFAULT_LAYOUT,
) -> ORPOTerms:
    """ORPO terms of one batch collated in `layout` (see batching.collate_pairs; the same default), run in it.

    A prefix or packed `layout` raises where it cannot run: a batch collated otherwise, or a model whose
    attention cannot take a 4-D mask (`batch_layout` gives those the padded layout).
    """
    inner = _unwrap(model)
    if layout == "padded":
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    else:
        _check_prefix(inner, batch, layout)
        inputs = model_inputs(inner, batch)
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


def batch_layout(adapter: Adapter, model: nn.Module, longest: int) -> Layout:
    """The layout a run collates its batches in, chosen once (orpo_cli/layouts.choose_layout, the rule the planner
    applies too), from the adapter's `packs_pairs`, the model's attention and sliding window, and `longest`: the
    longest sequence (a prompt and its longer response) of the data the run sees."""
    inner = _unwrap(model)
    return choose_layout(
        packs_pairs=adapter.packs_pairs,
        attention=attention_implementation(inner),
        sliding_window=sliding_window(inner),
        longest=longest,
    )


def _check_prefix(model: nn.Module, batch: Mapping[str, Any], layout: str) -> None:
    """Refuse a prefix/packed run that would fail or be wrong: a check of what the caller said, not a choice."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if "position_ids" not in batch:
        raise ValueError(f"layout={layout!r} needs a batch collated with layout='prefix' or 'packed'")
    if attention_implementation(model) not in MASKED_ATTENTION:
        raise ValueError(
            f"layout={layout!r} needs sdpa or eager attention (custom 4-D masks); this model uses "
            f"{attention_implementation(model)}: collate its batches in the layout batch_layout gives"
        )


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
