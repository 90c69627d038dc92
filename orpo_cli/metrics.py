"""ORPO metrics under TRL's names, summed on the device and read (one host sync) only when logged."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orpo_cli.loss import ORPOTerms

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
        """Add one optimizer step's (already globally normalised) loss and NLL."""
        s = self.sums
        s["steps"] += 1
        s["loss"] += loss.detach().double()
        s["nll"] += nll.detach().double()

    def state(self) -> dict[str, torch.Tensor]:
        return {f"tally/{k}": v for k, v in self.sums.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.sums:
            if f"tally/{k}" in state:
                self.sums[k] = state[f"tally/{k}"].to(self.device, torch.float64)

    def compute(self, lam: float, prefix: str = "") -> dict[str, float]:
        """Means since the last reset, with TRL's metric names (one host sync)."""
        v = {
            k: float(x)
            for k, x in zip(self.sums, torch.stack(list(self.sums.values())).cpu().tolist(), strict=True)
        }
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
