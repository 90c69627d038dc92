"""The train/eval split: whole prompt groups held out by a seeded shuffle."""

from __future__ import annotations

import json
import random

from orpo_cli.data.formats import _Dropped, _Example


# ------------------------------------------------------------------------------------------ splitting
def _split_items(
    items: list[_Example | _Dropped], n_rows: int, ratio: float, seed: int
) -> tuple[list[_Example | _Dropped], list[_Example | _Dropped]]:
    """Hold out `ratio` of the rows: whole prompt groups, picked by a shuffle with `seed`."""
    if ratio <= 0 or n_rows < 2:
        return items, []
    target = min(n_rows - 1, max(1, round(n_rows * ratio)))
    groups: dict[str, set[int]] = {}
    for item in items:
        key = json.dumps(item.prompt) if isinstance(item, _Example) else f"row {item.row}"
        groups.setdefault(key, set()).add(item.row)
    order = list(groups)
    random.Random(seed).shuffle(order)
    held: set[int] = set()
    for key in order:
        if len(held) >= target:
            break
        if len(held | groups[key]) >= n_rows:
            continue  # keep at least one row for training
        held |= groups[key]
    if not held:  # every row shares one prompt: split rows anyway so eval is not empty
        rows = list(range(1, n_rows + 1))
        random.Random(seed).shuffle(rows)
        held = set(rows[:target])
    return [i for i in items if i.row not in held], [i for i in items if i.row in held]
