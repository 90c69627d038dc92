"""The batch layouts' names and the one rule that picks a run's layout (no torch: the planner applies it too).

``packed``: several ``[prompt | chosen | rejected]`` pairs per row; ``prefix``: one such row per pair; ``padded``:
``[2B, L]`` chosen-then-rejected rows, as TRL runs them (training/batching.py, training/shared_prompt.py).
"""

from __future__ import annotations

from typing import Literal

Layout = Literal["packed", "prefix", "padded"]
LAYOUTS: tuple[str, ...] = ("packed", "prefix", "padded")

MASKED_ATTENTION = ("sdpa", "eager")
"""Attention implementations that apply a custom 4-D mask exactly (what the prefix and packed layouts need)."""


def choose_layout(*, packs_pairs: bool, attention: str, sliding_window: int | None, longest: int | None) -> Layout:
    """The layout a run collates its batches in: padding-free rows where the adapter and the attention allow them,
    one row per pair where only the attention does, else the padded layout.

    Prefix rows need an attention that applies custom 4-D masks (`MASKED_ATTENTION`) and a sliding window, if any,
    covering `longest` (a prompt and its longer response): transformers leaves custom 4-D masks as they are, so a
    window would not be applied. Packing also needs an adapter that reads nothing per row (`packs_pairs`) and
    ``sdpa``, whose block attention runs each pair on its own columns; any other attention would score every
    column of a packed row against every other (quadratic in the row's width), so it gets one row per pair.
    Training (`forward.batch_layout`, from the model) and the planner (`plan/report`, from the recipe) both ask here.
    """
    if attention not in MASKED_ATTENTION:
        return "padded"
    if sliding_window is not None and (longest is None or longest > sliding_window):
        return "padded"
    return "packed" if packs_pairs and attention == "sdpa" else "prefix"
