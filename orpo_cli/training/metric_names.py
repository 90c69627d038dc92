"""The one table of training metric names: TRL's ORPOTrainer names, in the order they are logged.

`loss.metrics` (one micro-batch) and `metrics.MetricTally.compute` (the means logged to RUN/metrics.jsonl,
`eval_`-prefixed for the loop's eval) build their dicts from this table, in its order; the console columns (`progress`), the
plot panels (`plots`) and train's closing eval table name only keys from here (tests/test_loss.py checks
all of them). No torch import: the console and the plots read it too.
"""

METRICS: dict[str, str] = {
    "loss": "the ORPO loss, NLL + lambda * L_OR",
    "nll_loss": "the NLL (SFT) term on the chosen response",
    "rewards/chosen": "lambda * mean log-prob of the chosen response (TRL's reward)",
    "rewards/rejected": "lambda * mean log-prob of the rejected response",
    "rewards/accuracies": "fraction of pairs whose chosen reward beats the rejected one",
    "rewards/margins": "mean chosen reward minus rejected reward",
    "logps/chosen": "mean log-prob of the chosen response (per token, as ORPO averages it)",
    "logps/rejected": "mean log-prob of the rejected response (per token)",
    # TRL's name: it is mean log sigmoid(log odds) = -mean L_OR, not the log odds ratio itself.
    "log_odds_ratio": "mean log sigmoid(log odds ratio), i.e. -L_OR",
    "log_odds_chosen": "mean log odds ratio of the chosen over the rejected response",
}
