"""ORPO metrics under TRL's names, summed on the device and read (one host sync) only when logged.

Under several processes each one sums what it saw; `compute` adds the sums of every process (one
all-reduce) before dividing, so the logged means are over the global batch, identical on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from orpo_cli.training.loss import ORPOTerms

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
        return {f"{prefix}{k}": val for k, val in out.items()}

    def _global_sums(self) -> torch.Tensor:
        sums = torch.stack(list(self.sums.values()))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)  # stack made a copy: the local sums stay as they are
        return sums
