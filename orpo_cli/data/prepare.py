"""The data stage's entry points: `prepare_data` (read, parse, split, tokenize, cache) and `check_source`."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from orpo_cli.data import prompts
from orpo_cli.data.cache import _cache_dir, _cache_key, _load_cache, _save_cache
from orpo_cli.data.formats import FORMAT_SHAPES, _check_columns, _Dropped, _Example, _RowParser
from orpo_cli.data.pairs import DROP_TEMPLATE, DataStats, PreparedData, TokenizedPair
from orpo_cli.data.sources import _peek_columns, load_rows
from orpo_cli.data.split import _split_items
from orpo_cli.data.tokenizing import _chat_template, _Renderer, _tokenize
from orpo_cli.errors import UserError
from orpo_cli.recipe import DataSettings, OrpoSettings

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------- entry points
def prepare_data(
    data: DataSettings, orpo: OrpoSettings, tokenizer: Any, cache_dir: Path | None = None
) -> PreparedData:
    """Load, render, tokenize, truncate and split the preference data (from cache when possible).

    A Jinja `data.chat_template` is set on `tokenizer` (so the run saves the template it trained with).
    """
    template = _chat_template(data, tokenizer)
    cache_file = _cache_dir(cache_dir) / f"{_cache_key(data, orpo, tokenizer)}.safetensors"
    cached = _load_cache(cache_file)
    if cached is not None:
        log.info(cached.stats.summary())
        return cached

    splits = _read_splits(data, templated=template is not None)
    bos_id = prompts.bos_for(tokenizer, template)
    renderer = _Renderer(tokenizer, template)
    stats = DataStats()
    out: dict[str, list[TokenizedPair]] = {}
    for split, (source, items) in splits.items():
        drops: Counter[str] = Counter()
        examples = []
        for item in items:
            if isinstance(item, _Dropped):
                drops[item.reason] += 1
            else:
                examples.append(item)
        pairs, truncated = _tokenize(examples, renderer, tokenizer, bos_id, orpo, drops)
        rows = len({item.row for item in items})
        if not pairs and (split == "train" or data.eval is not None):
            detail = ", ".join(f"{k} {v}" for k, v in drops.most_common()) or "nothing"
            if any(reason.startswith(DROP_TEMPLATE) for reason in drops):
                detail += ("; fix what the template refuses in the data (or data.system_prompt), "
                           "or set data.chat_template to a template that accepts it")
            raise UserError(
                f"data: no usable pairs left in {source} ({split}): {rows} rows read; dropped: {detail}"
            )
        out[split] = pairs
        stats.rows[split] = rows
        stats.pairs[split] = len(pairs)
        stats.truncated += truncated
        for reason, count in drops.items():
            stats.dropped[reason] = stats.dropped.get(reason, 0) + count
    prepared = PreparedData(train=out["train"], eval=out["eval"], stats=stats)
    _save_cache(cache_file, prepared)
    log.info(stats.summary())
    return prepared


def check_source(data: DataSettings) -> None:
    """Fail fast (before a model loads): each source exists, is readable, and has the mapped columns."""
    for name, source in (("data.train", data.train), ("data.eval", data.eval)):
        if source is None:
            continue
        columns = _peek_columns(source, name)
        if columns is not None:
            _check_columns(data, columns, source.path)



# ------------------------------------------------------------------------------------------ splitting
def _read_splits(data: DataSettings, templated: bool) -> dict[str, tuple[str, list[_Example | _Dropped]]]:
    """Parse every row of the sources and assign them to train / eval (grouped by prompt)."""
    train_rows = load_rows(data.train, "data.train")
    _check_columns(data, list(train_rows[0]), data.train.path)
    train_items = _parse_rows(train_rows, data, templated, data.train.path)
    if data.eval is not None:
        eval_rows = load_rows(data.eval, "data.eval")
        _check_columns(data, list(eval_rows[0]), data.eval.path)
        eval_items = _parse_rows(eval_rows, data, templated, data.eval.path)
        return {"train": (data.train.path, train_items), "eval": (data.eval.path, eval_items)}
    train_items, eval_items = _split_items(train_items, len(train_rows), data.eval_ratio, data.seed)
    return {"train": (data.train.path, train_items), "eval": (data.train.path, eval_items)}


def _parse_rows(rows: list[dict], data: DataSettings, templated: bool, where: str) -> list[_Example | _Dropped]:
    parse = _RowParser(data, templated, where)
    items = [item for number, row in enumerate(rows, start=1) for item in parse(row, number)]
    if rows and not any(isinstance(item, _Example) for item in items):
        hint = parse._looks_like(rows[0])
        if hint:  # every row dropped because none has the shape this format reads
            raise UserError(
                f"data: no row of {where} gives a pair as data.format: {data.format} reads it "
                f"({FORMAT_SHAPES[data.format]}){hint}"
            )
    return items
