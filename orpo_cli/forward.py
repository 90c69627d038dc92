"""The model forward that feeds the ORPO loss, shared by training and evaluation.

The top-level model is called (so DDP/FSDP wrappers and adapter hooks run as usual) with
`logits_to_keep=1`, which skips the full-vocabulary projection; the decoder's last hidden state is
captured by a hook and the loss projects only the rows it needs, in chunks (see loss.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from orpo_cli.adapters import Adapter
from orpo_cli.loss import ORPOTerms, orpo_loss_from_hidden


def orpo_forward(
    model: nn.Module,
    adapter: Adapter,
    batch: dict[str, torch.Tensor],
    *,
    lam: float,
    nll_on_prompt: bool,
    num_nll_tokens: torch.Tensor | int | None = None,
    num_pairs: torch.Tensor | int | None = None,
) -> ORPOTerms:
    """ORPO terms of one collated batch (see batching.collate_pairs for its layout)."""
    inner = _unwrap(model)
    with adapter.forward_context(inner, batch), _capture_hidden(inner.get_decoder()) as captured:
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            use_cache=False,
            logits_to_keep=1,
        )
    return orpo_loss_from_hidden(
        captured["hidden"],
        inner.get_output_embeddings(),
        batch,
        lam=lam,
        nll_on_prompt=nll_on_prompt,
        num_nll_tokens=num_nll_tokens,
        num_pairs=num_pairs,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside distributed wrappers (DDP's .module), which owns get_decoder()."""
    while hasattr(model, "module") and not hasattr(model, "get_decoder"):
        model = model.module
    return model


@contextlib.contextmanager
def _capture_hidden(decoder: nn.Module) -> Iterator[dict[str, Any]]:
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = decoder.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
