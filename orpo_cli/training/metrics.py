"""ORPO metrics under TRL's names, summed on the device and read (one host sync) only when logged.

Under several processes each one sums what it saw; `compute` adds the sums of every process (one
all-reduce) before dividing, so the logged means are over the global batch, identical on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orpo_cli.adapters import Adapter
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.training.batching import Layout, collate_pairs
from orpo_cli.training.forward import orpo_forward
from orpo_cli.training.loss import ORPOTerms, count_normalizers
from orpo_cli.training.metric_names import METRICS

# Per-pair sums and per-step scalar sums; both kept as 0-dim tensors on the training device.
_PAIR_KEYS = ("pairs", "chosen", "rejected", "correct", "log_odds", "log_sigmoid")
_STEP_KEYS = ("steps", "loss", "nll")


class MetricTally:
    """Running sums of ORPO quantities between two logging points."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = {
            k: torch.zeros((), dtype=torch.float64, device=self.device) for k in _PAIR_KEYS + _STEP_KEYS
        }

    def add_pairs(self, terms: ORPOTerms) -> None:
        """Add the per-pair quantities of one micro-batch."""
        chosen = terms.chosen_logps.detach().double()
        rejected = terms.rejected_logps.detach().double()
        log_odds = terms.log_odds.detach().double()
        s = self.sums
        s["pairs"] += chosen.numel()
        s["chosen"] += chosen.sum()
        s["rejected"] += rejected.sum()
        s["correct"] += (chosen > rejected).sum()
        s["log_odds"] += log_odds.sum()
        s["log_sigmoid"] += F.logsigmoid(log_odds).sum()

    def add_step(self, loss: torch.Tensor, nll: torch.Tensor) -> None:
        """Add one optimizer step's (already globally normalised) loss and NLL.

        Every rank adds the same global value, so across ranks the sum and the step count both scale by
        the world size and their ratio, the mean, is unchanged.
        """
        s = self.sums
        s["steps"] += 1
        s["loss"] += loss.detach().double()
        s["nll"] += nll.detach().double()

    def state(self) -> dict[str, torch.Tensor]:
        """The sums of every rank (a collective under several processes: call it on all of them)."""
        return {f"tally/{k}": v for k, v in zip(self.sums, self._global_sums(), strict=True)}

    def load_state(self, state: dict[str, torch.Tensor], rank: int = 0) -> None:
        """Restore `state()`: rank 0 holds the saved sums, the others start from zero (compute adds them)."""
        for k in self.sums:
            if f"tally/{k}" in state and rank == 0:
                self.sums[k] = state[f"tally/{k}"].to(self.device, torch.float64)

    def compute(self, lam: float, prefix: str = "") -> dict[str, float]:
        """Means since the last reset over every rank, with TRL's metric names (one host sync; a collective
        under several processes: call it on all of them)."""
        v = {k: float(x) for k, x in zip(self.sums, self._global_sums().cpu().tolist(), strict=True)}
        pairs, steps = max(v["pairs"], 1.0), max(v["steps"], 1.0)
        chosen, rejected = v["chosen"] / pairs, v["rejected"] / pairs
        out = {
            "loss": v["loss"] / steps,
            "nll_loss": v["nll"] / steps,
            "rewards/chosen": lam * chosen,
            "rewards/rejected": lam * rejected,
            "rewards/accuracies": v["correct"] / pairs,
            "rewards/margins": lam * (chosen - rejected),
            "logps/chosen": chosen,
            "logps/rejected": rejected,
            # TRL logs mean(log sigmoid(log odds)) as `log_odds_ratio` and the mean log odds as `log_odds_chosen`.
            "log_odds_ratio": v["log_sigmoid"] / pairs,
            "log_odds_chosen": v["log_odds"] / pairs,
        }
        return {f"{prefix}{k}": out[k] for k in METRICS}  # the one table's names and order (a name it lacks: KeyError)

    def _global_sums(self) -> torch.Tensor:
        sums = torch.stack(list(self.sums.values()))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)  # stack made a copy: the local sums stay as they are
        return sums


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
    layout: Layout,
    prefix: str = "",
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """ORPO metrics over all `pairs` (TRL's names, with `prefix`), normalised over the whole set, in batches
    collated in `layout` (forward.batch_layout's choice for the model and the pairs).

    `progress`, when given, is called with the number of pairs of each batch once it is done.
    """
    was_training = model.training
    model.eval()
    batches = [
        {k: v.to(device) for k, v in collate_pairs(pairs[i : i + batch_size], pad_token_id, layout=layout).items()}
        for i in range(0, len(pairs), batch_size)
    ]
    # Normalise by the whole set so that summing the batches gives the exact set-level loss and NLL.
    counts = [count_normalizers(b, nll_on_prompt) for b in batches]
    num_tokens = sum(c[0] for c in counts)
    num_pairs = sum(c[1] for c in counts)
    tally = MetricTally(device)
    loss = torch.zeros((), device=device)
    nll = torch.zeros((), device=device)
    done = 0
    for batch in batches:
        terms = orpo_forward(
            model, adapter, batch, lam=lam, nll_on_prompt=nll_on_prompt, num_nll_tokens=num_tokens, num_pairs=num_pairs,
            layout=layout,
        )
        tally.add_pairs(terms)
        loss += terms.loss
        nll += terms.nll
        if progress is not None:
            progress(min(batch_size, len(pairs) - done))
            done += batch_size
    tally.add_step(loss, nll)
    model.train(was_training)
    return tally.compute(lam, prefix=prefix)
