"""Held-out preference metrics: accuracy, log odds ratio, margins and NLL over a set of pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from orpo_cli.adapters import Adapter
from orpo_cli.batching import collate_pairs
from orpo_cli.data import TokenizedPair
from orpo_cli.forward import orpo_forward
from orpo_cli.loss import count_normalizers
from orpo_cli.metrics import MetricTally


@torch.no_grad()
def preference_metrics(
    model: nn.Module,
    adapter: Adapter,
    pairs: Sequence[TokenizedPair],
    *,
    batch_size: int,
    lam: float,
    nll_on_prompt: bool,
    pad_token_id: int,
    device: torch.device,
    prefix: str = "",
) -> dict[str, float]:
    """ORPO metrics over all `pairs` (TRL's names, with `prefix`), normalised over the whole set."""
    was_training = model.training
    model.eval()
    batches = [
        {k: v.to(device) for k, v in collate_pairs(pairs[i : i + batch_size], pad_token_id).items()}
        for i in range(0, len(pairs), batch_size)
    ]
    # Normalise by the whole set so that summing the batches gives the exact set-level loss and NLL.
    counts = [count_normalizers(b, nll_on_prompt) for b in batches]
    num_tokens = sum(c[0] for c in counts)
    num_pairs = sum(c[1] for c in counts)
    tally = MetricTally(device)
    loss = torch.zeros((), device=device)
    nll = torch.zeros((), device=device)
    for batch in batches:
        terms = orpo_forward(
            model, adapter, batch, lam=lam, nll_on_prompt=nll_on_prompt, num_nll_tokens=num_tokens, num_pairs=num_pairs
        )
        tally.add_pairs(terms)
        loss += terms.loss
        nll += terms.nll
    tally.add_step(loss, nll)
    model.train(was_training)
    return tally.compute(lam, prefix=prefix)
