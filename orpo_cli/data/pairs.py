"""What data preparation yields: tokenized pairs, the statistics for the log, the reasons a pair is dropped."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

DROP_EMPTY = "empty field"
DROP_SAME = "chosen == rejected"
DROP_NO_PROMPT = "no shared prompt"
DROP_FIT = "prompt or responses cannot fit max_length"
DROP_SAME_TRUNCATED = "chosen == rejected after truncation"
DROP_TEMPLATE = "the chat template refused it"  # followed by the template's reason in parentheses


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True, slots=True)
class TokenizedPair:
    """One preference pair: prompt ids (BOS included) and the two responses' ids (EOS included).

    `answer`: the known right answer to the prompt, where the data has one (data.columns.answer): eval scores
    generated answers against it.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    answer: str | None = None


@dataclass
class DataStats:
    """What preparation did: rows read and pairs kept per split, pairs dropped by reason, truncations."""

    rows: dict[str, int] = field(default_factory=dict)
    pairs: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    from_cache: bool = False

    def summary(self) -> str:
        """One line for the log."""

        def per_split(counts: dict[str, int]) -> str:
            return f"{sum(counts.values())} ({', '.join(f'{k} {v}' for k, v in counts.items())})"

        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items(), key=lambda kv: -kv[1]))
        line = f"data: {per_split(self.rows)} rows -> {per_split(self.pairs)} pairs; dropped {dropped}"
        line += f" ({reasons})" if reasons else ""
        line += f"; truncated {self.truncated}"
        return line + ("; loaded from cache" if self.from_cache else "")

    def to_json(self) -> str:
        return json.dumps({"rows": self.rows, "pairs": self.pairs, "dropped": self.dropped,
                           "truncated": self.truncated})

    @classmethod
    def from_json(cls, text: str) -> DataStats:
        return cls(**json.loads(text))


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    stats: DataStats
