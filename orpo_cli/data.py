"""Preference data: load rows -> map columns -> render -> tokenize -> truncate -> (cached) pairs.

`prepare_data(data, orpo, tokenizer)` turns the recipe's `data:` and `orpo:` sections into tokenized
`TokenizedPair`s (prompt ids; chosen and rejected response ids, the prompt not repeated) for a train
and an eval split, plus `DataStats` for the log. `check_source(data)` is the cheap check run before any
model is loaded: the file exists and is readable, and the mapped columns are in it.

Sources (`data.train.path`, `data.eval.path`): a local `.jsonl`, `.json` (a list of objects, or JSON
lines), `.csv`, `.parquet`, or `.gz` of a text one; `builtin:demo` or `builtin:short-answers` (generated in
code, see `orpo_cli.demo_data`); a local
directory or anything else is handed to `datasets.load_dataset` (a hub id; offline this fails with a
one-line error that says to download it and point the recipe at a local file).

Formats (`data.format`), each through `data.columns`:

* pairs: prompt / chosen / rejected strings; the prompt may instead be built from columns with
  `data.prompt_template` ("Question: {question}").
* conversational: chosen and rejected are message lists (`role`/`content`). An optional prompt column
  holds the prompt messages; without one the prompt is the longest shared leading run of messages and
  the responses are the remaining final assistant message(s).
* implicit: whole transcripts (HH-RLHF). The prompt is their longest common prefix cut back to a turn
  boundary: just after the last `\\n\\nAssistant:` inside it. With a chat template the `Human:` /
  `Assistant:` turns become user/assistant messages; with `chat_template: none` the raw text is kept.
* sharegpt: a `conversations` list of `{from, value}` plus single-message `chosen` / `rejected`.
* one_to_many: answers joined by `data.separator` in the chosen / rejected columns, expanded into
  pairs by `data.pairing` (zip, or all combinations in row-major order capped by max_pairs_per_row).

Rendering: with a chat template (`auto` uses the tokenizer's, a Jinja string is set on the tokenizer so
that it is saved with the run), the prompt text is the template applied to the prompt messages with
`add_generation_prompt=True`, and a response text is the template applied to prompt + reply with that
prompt text cut off its front. Without one, the prompt is `system + "\\n\\n" + prompt` (a multi-turn
prompt becomes a `Human:`/`Assistant:` transcript) and a response is the reply text, joined as-is.

Special tokens, exactly once:

* BOS starts the prompt when the tokenizer has one and the model family uses one (the tokenizer adds
  it to `tokenizer("a")`, or its chat template emits it), unless the rendered prompt already starts
  with it. Phi-3: `tokenizer("a")` starts with `<s>` and its template does not emit it, so `<s>` is
  prepended. Built-in models: the tokenizer adds nothing, the template emits `<|bos|>`, so nothing is
  added with the template and `<|bos|>` is prepended to plain-text prompts.
* EOS ends each response unless it already does. A template's trailing whitespace after an EOS it
  emitted is dropped, so a built-in response ends `...reply<|end|>` (`<|end|>` is its EOS), not
  `...<|end|>\\n<|end|>`. Phi-3's template closes a turn with `<|end|>\\n` while its EOS is
  `<|endoftext|>`, so a Phi-3 response ends `...reply<|end|>\\n<|endoftext|>`, which is what Phi-3's
  original template rendered for a finished conversation: generation stops at either `<|end|>`
  (Phi-3's generation_config) or the EOS.

Tokenization is batched, `add_special_tokens=False`. A response's ids are the tail of the tokenized
prompt + response text (so a response is tokenized as it follows its prompt, e.g. without the
SentencePiece word-start `▁` it would get alone); only where that tokenization does not start with
the prompt's own ids (a merge across the boundary) is the response tokenized alone.

Truncation, as in the paper's code and TRL: a prompt longer than `orpo.max_prompt_length` loses its
LEFT part (a leading BOS is kept); each response is then cut from the right to
`orpo.max_length - len(prompt)`. Nothing exceeds max_length, and no response becomes empty: a pair whose
responses cannot keep a token is dropped. Dropped pairs are counted by reason: empty field,
chosen == rejected (rendered texts), no shared prompt, cannot fit, chosen == rejected after truncation.
A value of the wrong type (a number where text is expected) is a UserError, not a drop. Row numbers
in messages count from 1 in the source.

Split: without `data.eval`, `data.eval_ratio` of the rows (at least one when the ratio is > 0 and
there are two rows) go to eval, chosen by a shuffle with `data.seed`. Rows are split before
one_to_many expansion and grouped by prompt, so no prompt is in both splits.

Cache: the result is stored under `cache_dir` (default `$ORPO_TUNE_CACHE/data`, else
`~/.cache/orpo-tune/data`) as safetensors of flat int32 ids + int64 offsets (no pickle), written to a
temporary file and renamed into place. The key hashes the source bytes (or builtin name / hub id,
subset and split), every data setting, max_length / max_prompt_length and the tokenizer (serialized
vocab, merges, special tokens, chat template).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import random
import re
import string
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orpo_cli.errors import UserError
from orpo_cli.recipe import DataSettings, DataSource, OrpoSettings

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_DATASETS = ("demo", "short-answers")

DROP_EMPTY = "empty field"
DROP_SAME = "chosen == rejected"
DROP_NO_PROMPT = "no shared prompt"
DROP_FIT = "prompt or responses cannot fit max_length"
DROP_SAME_TRUNCATED = "chosen == rejected after truncation"

_CACHE_VERSION = "orpo-data-1"  # bump when the output of this module changes for the same inputs
_FILE_KINDS = ("jsonl", "json", "csv", "parquet")
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ASSISTANT = "\n\nAssistant:"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant", "model": "assistant"}
_TOKENIZE_BATCH = 512

Message = dict[str, str]


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True, slots=True)
class TokenizedPair:
    """One preference pair: prompt ids (BOS included) and the two responses' ids (EOS included)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


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
    bos_id = _bos_id(tokenizer, template)
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


def load_rows(source: DataSource, field_name: str = "data.train") -> list[dict]:
    """All rows of `source` (at most `max_rows`) as plain dicts; `field_name` prefixes error messages."""
    path = source.path
    if path.startswith(BUILTIN_PREFIX):
        rows = _builtin_rows(path, field_name)
    else:
        local = Path(path).expanduser()
        if local.is_file():
            rows = _read_file(local, field_name)
        elif not local.exists() and _looks_like_file(path):
            raise UserError(f"{field_name}.path: no such file: {path}")
        else:
            rows = _load_hub(source, field_name)
    if source.max_rows is not None:
        rows = rows[: source.max_rows]
    if not rows:
        raise UserError(f"{field_name}.path: {path} holds no rows")
    return rows


# ------------------------------------------------------------------------------------------ reading
def _builtin_rows(path: str, field_name: str) -> list[dict]:
    name = path.removeprefix(BUILTIN_PREFIX)
    from orpo_cli.demo_data import demo_rows, short_answer_rows

    generators = {"demo": demo_rows, "short-answers": short_answer_rows}
    if name not in generators:
        raise UserError(f"{field_name}.path: unknown built-in dataset '{name}'; known: {', '.join(BUILTIN_DATASETS)}")
    return generators[name]()


def _looks_like_file(path: str) -> bool:
    """A local path rather than a hub id (`name` or `org/name`): a file suffix, or path-like slashes."""
    lowered = path.lower()
    if lowered.endswith(tuple(f".{kind}" for kind in _FILE_KINDS)) or lowered.endswith(".gz"):
        return True
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path


def _file_kind(path: Path, field_name: str) -> tuple[str, bool]:
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    kind = name.rsplit(".", 1)[-1] if "." in name else ""
    if kind not in _FILE_KINDS or (gz and kind == "parquet"):
        raise UserError(
            f"{field_name}.path: cannot read '{path.name}': use .jsonl, .json, .csv, .parquet, or .gz of a text one"
        )
    return kind, gz


def _read_text(path: Path, gz: bool, field_name: str) -> str:
    try:
        if gz:
            with gzip.open(path, "rt", encoding="utf-8-sig") as handle:
                return handle.read()
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError:
        raise UserError(f"{field_name}.path: {path} is not UTF-8 text") from None
    except (OSError, EOFError) as err:
        raise UserError(f"{field_name}.path: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None


def _read_file(path: Path, field_name: str) -> list[dict]:
    kind, gz = _file_kind(path, field_name)
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises its own error types for unreadable files
            raise UserError(f"{field_name}.path: cannot read {path} as parquet: {_one_line(err)}") from None
    else:
        text = _read_text(path, gz, field_name)
        if kind == "csv":
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        elif kind == "jsonl":
            rows = _json_lines(text, path)
        else:
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                if not err.msg.startswith("Extra data"):
                    raise UserError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
                rows = _json_lines(text, path)
            if not isinstance(rows, list):
                raise UserError(f"{path}: expected a JSON list of objects (or JSON lines), got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i + 1} is {type(row).__name__}, expected an object of columns")
    return rows


def _json_lines(text: str, path: Path) -> list[Any]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: invalid JSON line: {err.msg}") from None
    return rows


def _load_hub(source: DataSource, field_name: str) -> list[dict]:
    try:
        import datasets

        dataset = datasets.load_dataset(source.path, source.subset, split=source.split)
        if source.max_rows is not None:
            dataset = dataset.select(range(min(source.max_rows, len(dataset))))
        return dataset.to_list()
    except Exception as err:  # offline, unknown id, missing split: all become one line for the user
        raise UserError(_hub_error(source, field_name, err)) from None


def _hub_error(source: DataSource, field_name: str, err: Exception) -> str:
    if Path(source.path).expanduser().is_dir():
        return f"{field_name}.path: cannot load the dataset directory {source.path}: {_one_line(err)}"
    subset = f", '{source.subset}'" if source.subset else ""
    stem = re.sub(r"\W+", "_", source.path).strip("_")
    return (
        f"{field_name}.path: cannot load dataset '{source.path}' (split {source.split}) from the Hugging Face hub: "
        f"{_one_line(err)}; without hub access, download it where the hub is reachable (e.g. "
        f"datasets.load_dataset('{source.path}'{subset}, split='{source.split}').to_json('{stem}.jsonl')) "
        f"and point {field_name}.path at the local file"
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _peek_columns(source: DataSource, field_name: str) -> list[str] | None:
    """The columns of `source`, reading as little as possible; None when they cannot be known cheaply."""
    path = source.path
    if path.startswith(BUILTIN_PREFIX):
        return list(_builtin_rows(path, field_name)[0])
    local = Path(path).expanduser()
    if not local.is_file():
        if not local.exists() and _looks_like_file(path):
            raise UserError(f"{field_name}.path: no such file: {path}")
        return _hub_columns(source, field_name)
    kind, gz = _file_kind(local, field_name)
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(local).metadata
            columns = meta.schema.to_arrow_schema().names if meta.num_rows else []
        except Exception as err:
            raise UserError(f"{field_name}.path: cannot read {local} as parquet: {_one_line(err)}") from None
    elif kind in ("jsonl", "csv"):
        columns = _first_record_columns(local, kind, gz, field_name)
    else:
        rows = _read_file(local, field_name)
        columns = list(rows[0]) if rows else []
    if not columns:
        raise UserError(f"{field_name}.path: {path} holds no rows")
    return columns


def _first_record_columns(path: Path, kind: str, gz: bool, field_name: str) -> list[str]:
    try:
        opener = gzip.open(path, "rt", encoding="utf-8-sig") if gz else open(path, encoding="utf-8-sig", newline="")
        with opener as handle:
            if kind == "csv":
                return next(csv.reader(handle), [])
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise UserError(f"{path}:{number}: invalid JSON line: {err.msg}") from None
                    if not isinstance(record, dict):
                        raise UserError(f"{path}: row 1 is {type(record).__name__}, expected an object of columns")
                    return list(record)
            return []
    except UnicodeDecodeError:
        raise UserError(f"{field_name}.path: {path} is not UTF-8 text") from None
    except (OSError, EOFError) as err:
        raise UserError(f"{field_name}.path: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None


def _hub_columns(source: DataSource, field_name: str) -> list[str] | None:
    try:
        import datasets

        builder = datasets.load_dataset_builder(source.path, source.subset)
    except Exception as err:
        raise UserError(_hub_error(source, field_name, err)) from None
    features = builder.info.features
    return list(features) if features else None


# ------------------------------------------------------------------------------------------ columns
def _required_columns(data: DataSettings) -> dict[str, str]:
    """`data.columns.<field>` -> column name, for the columns this format needs."""
    cols = data.columns
    need: dict[str, str] = {}
    if data.format in ("pairs", "one_to_many") and data.prompt_template is None:
        need["prompt"] = cols.prompt
    if data.format == "conversational" and "prompt" in cols.model_fields_set:
        need["prompt"] = cols.prompt  # optional unless the recipe names it
    if data.format == "sharegpt":
        need["conversations"] = cols.conversations
    need["chosen"] = cols.chosen
    need["rejected"] = cols.rejected
    if cols.system is not None:
        need["system"] = cols.system
    return need


def _template_fields(template: str) -> list[str]:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise UserError(f"data.prompt_template: {err}") from None
    for name in names:
        if not name or name.isdigit() or any(c in name for c in ".["):
            raise UserError(
                f"data.prompt_template: placeholder {{{name}}} must name a column, e.g. {{question}}"
            )
    return names


def _check_columns(data: DataSettings, columns: list[str], where: str) -> None:
    have = ", ".join(columns)
    for key, column in _required_columns(data).items():
        if column not in columns:
            raise UserError(f"data.columns.{key}: column '{column}' not in {where}; it has: {have}")
    if data.prompt_template is not None and data.format in ("pairs", "one_to_many"):
        for name in _template_fields(data.prompt_template):
            if name not in columns:
                raise UserError(
                    f"data.prompt_template: placeholder {{{name}}} names no column of {where}; it has: {have}"
                )


# ------------------------------------------------------------------------------------------ parsing
@dataclass
class _Example:
    """One pair before rendering: message lists, and the 1-based row it came from (for messages)."""

    row: int
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


@dataclass
class _Dropped:
    row: int
    reason: str


class _RowParser:
    """Turns one row of any format into `_Example`s (several for one_to_many) or drop reasons."""

    def __init__(self, data: DataSettings, templated: bool, where: str) -> None:
        self.data = data
        self.cols = data.columns
        self.templated = templated
        self.where = where

    def __call__(self, row: dict, number: int) -> list[_Example | _Dropped]:
        parse = getattr(self, f"_{self.data.format}")
        result = parse(row, number)
        return [_Dropped(number, r) if isinstance(r, str) else r for r in result]

    # -- field access ---------------------------------------------------------------------------
    def _text(self, row: dict, column: str, number: int) -> str | None:
        value = row.get(column)
        if value is None or isinstance(value, str):
            return value
        raise UserError(
            f"data: row {number}: column '{column}' holds {type(value).__name__}, expected text ({self.where})"
        )

    def _system(self, row: dict, number: int) -> str | None:
        if self.cols.system is not None:
            value = self._text(row, self.cols.system, number)
            if value and value.strip():
                return value
        return self.data.system_prompt

    def _with_system(self, messages: list[Message], row: dict, number: int) -> list[Message]:
        system = self._system(row, number)
        if system and not (messages and messages[0]["role"] == "system"):
            return [{"role": "system", "content": system}, *messages]
        return messages

    def _prompt_text(self, row: dict, number: int) -> str | None:
        if self.data.prompt_template is None:
            return self._text(row, self.cols.prompt, number)
        parts = []
        for literal, name, spec, conversion in string.Formatter().parse(self.data.prompt_template):
            parts.append(literal)
            if name is None:
                continue
            if name not in row:
                raise UserError(
                    f"data.prompt_template: placeholder {{{name}}} names no column of {self.where} (row {number}); "
                    f"it has: {', '.join(row)}"
                )
            value = row[name]
            if value is None:
                return None
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise UserError(
                    f"data: row {number}: column '{name}' holds {type(value).__name__}, expected text ({self.where})"
                )
            if conversion:
                value = repr(value) if conversion == "r" else str(value)
            try:
                parts.append(format(value, spec or ""))
            except ValueError as err:
                raise UserError(f"data.prompt_template: row {number}: {{{name}:{spec}}}: {err}") from None
        return "".join(parts)

    def _messages(self, value: Any, column: str, number: int) -> list[Message] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            raise UserError(
                f"data: row {number}: column '{column}' holds {type(value).__name__}, "
                f"expected a list of {{role, content}} messages ({self.where})"
            )
        messages = []
        for j, item in enumerate(value):
            if not isinstance(item, dict) or not isinstance(item.get("role"), str) or "content" not in item:
                raise UserError(
                    f"data: row {number}: column '{column}' item {j} is not a {{role, content}} message ({self.where})"
                )
            content = item["content"]
            if content is not None and not isinstance(content, str):
                raise UserError(
                    f"data: row {number}: column '{column}' item {j} has content of type "
                    f"{type(content).__name__}, expected text ({self.where})"
                )
            messages.append({"role": item["role"], "content": content or ""})
        return messages

    # -- formats --------------------------------------------------------------------------------
    def _pairs(self, row: dict, number: int) -> list[_Example | str]:
        prompt = self._prompt_text(row, number)
        chosen = self._text(row, self.cols.chosen, number)
        rejected = self._text(row, self.cols.rejected, number)
        if _blank(prompt) or _blank(chosen) or _blank(rejected):
            return [DROP_EMPTY]
        messages = self._with_system([{"role": "user", "content": prompt}], row, number)
        return [_Example(number, messages, _reply(chosen), _reply(rejected))]

    def _one_to_many(self, row: dict, number: int) -> list[_Example | str]:
        prompt = self._prompt_text(row, number)
        chosen = self._answers(row, self.cols.chosen, number)
        rejected = self._answers(row, self.cols.rejected, number)
        if _blank(prompt) or not chosen or not rejected:
            return [DROP_EMPTY]
        if self.data.pairing == "zip":
            combos = list(zip(chosen, rejected, strict=False))
        else:
            combos = list(itertools.islice(itertools.product(chosen, rejected), self.data.max_pairs_per_row))
        messages = self._with_system([{"role": "user", "content": prompt}], row, number)
        return [_Example(number, messages, _reply(c), _reply(r)) for c, r in combos]

    def _answers(self, row: dict, column: str, number: int) -> list[str]:
        value = row.get(column)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            pieces = value
        else:
            text = self._text(row, column, number)
            pieces = (text or "").split(self.data.separator)
        return [p.strip() for p in pieces if p.strip()]

    def _conversational(self, row: dict, number: int) -> list[_Example | str]:
        chosen = self._messages(_as_reply_list(row.get(self.cols.chosen)), self.cols.chosen, number)
        rejected = self._messages(_as_reply_list(row.get(self.cols.rejected)), self.cols.rejected, number)
        if not chosen or not rejected:
            return [DROP_EMPTY]
        prompt_value = row.get(self.cols.prompt)
        if prompt_value is not None:
            if isinstance(prompt_value, str):
                prompt_value = [{"role": "user", "content": prompt_value}]
            prompt = self._messages(prompt_value, self.cols.prompt, number) or []
            n = len(prompt)
            if chosen[:n] == prompt and rejected[:n] == prompt:  # full conversations that repeat the prompt
                chosen, rejected = chosen[n:], rejected[n:]
        else:
            prompt, chosen, rejected = _split_shared(chosen, rejected)
            if prompt is None:
                return [DROP_NO_PROMPT]
        if not prompt or all(_blank(m["content"]) for m in prompt):
            return [DROP_EMPTY]
        if not chosen or not rejected or _blank(chosen[0]["content"]) or _blank(rejected[0]["content"]):
            return [DROP_EMPTY]
        return [_Example(number, self._with_system(prompt, row, number), chosen, rejected)]

    def _sharegpt(self, row: dict, number: int) -> list[_Example | str]:
        column = self.cols.conversations
        turns = row.get(column)
        if turns is None:
            return [DROP_EMPTY]
        if not isinstance(turns, list):
            raise UserError(
                f"data: row {number}: column '{column}' holds {type(turns).__name__}, "
                f"expected a list of {{from, value}} messages ({self.where})"
            )
        prompt = [self._sharegpt_message(turn, column, number) for turn in turns]
        chosen = self._sharegpt_reply(row.get(self.cols.chosen), self.cols.chosen, number)
        rejected = self._sharegpt_reply(row.get(self.cols.rejected), self.cols.rejected, number)
        if not prompt or all(_blank(m["content"]) for m in prompt) or _blank(chosen) or _blank(rejected):
            return [DROP_EMPTY]
        return [_Example(number, self._with_system(prompt, row, number), _reply(chosen), _reply(rejected))]

    def _sharegpt_message(self, turn: Any, column: str, number: int) -> Message:
        if isinstance(turn, dict) and "from" in turn and "value" in turn:
            role, content = turn["from"], turn["value"]
        elif isinstance(turn, dict) and "role" in turn and "content" in turn:
            role, content = turn["role"], turn["content"]
        else:
            raise UserError(f"data: row {number}: column '{column}' holds a turn that is not a {{from, value}} message")
        if role not in _SHAREGPT_ROLES:
            raise UserError(
                f"data: row {number}: column '{column}' has a turn from '{role}'; "
                f"supported: {', '.join(_SHAREGPT_ROLES)}"
            )
        if content is not None and not isinstance(content, str):
            raise UserError(
                f"data: row {number}: column '{column}' holds a turn of {type(content).__name__}, expected text"
            )
        return {"role": _SHAREGPT_ROLES[role], "content": content or ""}

    def _sharegpt_reply(self, value: Any, column: str, number: int) -> str | None:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict):
            return self._sharegpt_message(value, column, number)["content"]
        return self._text({column: value}, column, number)

    def _implicit(self, row: dict, number: int) -> list[_Example | str]:
        chosen = self._text(row, self.cols.chosen, number)
        rejected = self._text(row, self.cols.rejected, number)
        if _blank(chosen) or _blank(rejected):
            return [DROP_EMPTY]
        if chosen == rejected:
            return [DROP_SAME]
        cut = _implicit_prompt_end(chosen, rejected)
        prompt_text, chosen_text, rejected_text = chosen[:cut], chosen[cut:], rejected[cut:]
        if _blank(prompt_text) or _blank(chosen_text) or _blank(rejected_text):
            return [DROP_EMPTY if cut else DROP_NO_PROMPT]
        prompt = _parse_hh(prompt_text) if self.templated else None
        if prompt is not None and prompt and prompt[-1] == {"role": "assistant", "content": ""}:
            prompt = prompt[:-1]  # the empty "Assistant:" the reply follows is the generation prompt
            chosen_msgs = _parse_hh(_HH_ASSISTANT + chosen_text) or _reply(chosen_text.strip())
            rejected_msgs = _parse_hh(_HH_ASSISTANT + rejected_text) or _reply(rejected_text.strip())
        else:
            prompt = [{"role": "user", "content": prompt_text}]
            chosen_msgs, rejected_msgs = _reply(chosen_text), _reply(rejected_text)
        return [_Example(number, self._with_system(prompt, row, number), chosen_msgs, rejected_msgs)]


def _blank(text: str | None) -> bool:
    return text is None or not text.strip()


def _reply(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def _as_reply_list(value: Any) -> Any:
    """A conversational response given as a bare string or single message becomes a one-message list."""
    if isinstance(value, str):
        return _reply(value)
    if isinstance(value, dict):
        return [value]
    return value


def _split_shared(
    chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message] | None, list[Message], list[Message]]:
    """Prompt = longest shared leading run of messages, backed off so both responses start at an assistant."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    # Back off to where both continue with an assistant message. When one list is a prefix of the other,
    # k stays put and the empty response is dropped as such.
    while 0 < k < min(len(chosen), len(rejected)) and not chosen[k]["role"] == rejected[k]["role"] == "assistant":
        k -= 1
    if k == 0:
        return None, chosen, rejected
    return chosen[:k], chosen[k:], rejected[k:]


def _implicit_prompt_end(chosen: str, rejected: str) -> int:
    """End of the implicit prompt: after the last `\\n\\nAssistant:` in the common prefix (else a word boundary)."""
    common = _common_prefix_len(chosen, rejected)
    marker = chosen.rfind(_HH_ASSISTANT, 0, common)
    if marker >= 0 and marker + len(_HH_ASSISTANT) <= common:
        return marker + len(_HH_ASSISTANT)
    # Not an HH transcript: TRL's rule, the prompt ends before the differing word's leading space.
    cut = common
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    return cut


def _common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix, comparing 256-character blocks first (transcripts run to pages)."""
    n, i = min(len(a), len(b)), 0
    while i + 256 <= n and a[i : i + 256] == b[i : i + 256]:
        i += 256
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _parse_hh(text: str) -> list[Message] | None:
    """`\\n\\nHuman: a\\n\\nAssistant: b` -> user/assistant messages (stripped); None if not such a transcript."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


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
    return [item for number, row in enumerate(rows, start=1) for item in parse(row, number)]


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


# ------------------------------------------------------------------------------------------ rendering
def _chat_template(data: DataSettings, tokenizer: Any) -> str | None:
    """The Jinja template in effect (None: plain text); a recipe template is set on the tokenizer."""
    choice = data.chat_template
    if choice == "none":
        return None
    if choice == "auto":
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        return template or None
    tokenizer.chat_template = choice
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
        )
    except Exception as err:  # jinja2 syntax/runtime errors
        raise UserError(f"data.chat_template: the template does not render: {_one_line(err)}") from None
    return choice


def _bos_id(tokenizer: Any, template: str | None) -> int | None:
    """BOS to put in front of prompts, or None when the tokenizer has none or the model family uses none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    if ids and ids[0] == bos:
        return bos
    for candidate in {template, getattr(tokenizer, "chat_template", None)} - {None}:
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "a"}], chat_template=candidate, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # a template that cannot render this probe tells us nothing about BOS
            continue
        if tokenizer.bos_token in rendered:
            return bos
    return None


class _Renderer:
    """Message lists -> (prompt text, response text) with the chat template, or as plain text."""

    def __init__(self, tokenizer: Any, template: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.eos = tokenizer.eos_token

    def __call__(self, example: _Example) -> tuple[str, str, str]:
        if self.template is None:
            prompt = _plain(example.prompt)
            chosen = _plain_reply(example.prompt, example.chosen)
            rejected = _plain_reply(example.prompt, example.rejected)
        else:
            prompt = self._apply(example.prompt, example.row, generation_prompt=True)
            chosen = self._response(example, prompt, example.chosen)
            rejected = self._response(example, prompt, example.rejected)
        return prompt, self._trim_after_eos(chosen), self._trim_after_eos(rejected)

    def _apply(self, messages: list[Message], row: int, generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as err:  # jinja2 errors, e.g. raise_exception('roles must alternate')
            raise UserError(f"data.chat_template: row {row}: the chat template failed: {_one_line(err)}") from None

    def _response(self, example: _Example, prompt: str, reply: list[Message]) -> str:
        full = self._apply(example.prompt + reply, example.row, generation_prompt=False)
        if not full.startswith(prompt):
            raise UserError(
                f"data.chat_template: row {example.row}: the prompt rendered with add_generation_prompt=True is not "
                "a prefix of prompt + reply rendered, so the reply cannot be cut out (the template rewrites "
                "earlier text when a reply follows); use a template without that, or chat_template: none"
            )
        return full[len(prompt):]

    def _trim_after_eos(self, response: str) -> str:
        """Drop whitespace a template writes after the EOS that ends a turn, so EOS ends the response."""
        stripped = response.rstrip()
        return stripped if self.eos and stripped.endswith(self.eos) else response


def _plain(prompt: list[Message]) -> str:
    system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else None
    turns = prompt[1:] if system is not None else prompt
    if len(turns) == 1 and turns[0]["role"] == "user":
        body = turns[0]["content"]
    else:
        body = _transcript(turns) + _HH_ASSISTANT
    return f"{system}\n\n{body}" if system else body


def _plain_reply(prompt: list[Message], reply: list[Message]) -> str:
    turns = [m for m in prompt if m["role"] != "system"]
    single = len(turns) == 1 and turns[0]["role"] == "user"
    first = reply[0]["content"] if single else " " + reply[0]["content"]
    return first + _transcript(reply[1:])


def _transcript(messages: list[Message]) -> str:
    labels = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{labels.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


# ------------------------------------------------------------------------------------------ tokenizing
def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, in batches, without special tokens added by the tokenizer."""
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        batch = texts[start : start + _TOKENIZE_BATCH]
        ids.extend(tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"])
    return ids


def _tokenize(
    examples: list[_Example],
    renderer: _Renderer,
    tokenizer: Any,
    bos: int | None,
    orpo: OrpoSettings,
    drops: Counter[str],
) -> tuple[list[TokenizedPair], int]:
    """Render, tokenize and truncate `examples`; count drops into `drops`; return (pairs, truncated)."""
    rendered = []
    for example in examples:
        prompt, chosen, rejected = renderer(example)
        if chosen == rejected:
            drops[DROP_SAME] += 1
        else:
            rendered.append((prompt, chosen, rejected))
    if not rendered:
        return [], 0
    prompts = _encode(tokenizer, [p for p, _, _ in rendered])
    fulls = _encode(tokenizer, [p + c for p, c, _ in rendered] + [p + r for p, _, r in rendered])
    n = len(rendered)
    responses: list[list[int] | None] = []
    alone: list[int] = []  # responses whose joint tokenization merged across the prompt boundary
    for i, full in enumerate(fulls):
        prompt_ids = prompts[i % n]
        if full[: len(prompt_ids)] == prompt_ids:
            responses.append(full[len(prompt_ids) :])
        else:
            responses.append(None)
            alone.append(i)
    if alone:
        retokenized = _encode(tokenizer, [rendered[i % n][1 + i // n] for i in alone])
        for i, ids in zip(alone, retokenized, strict=True):
            responses[i] = ids
    eos = tokenizer.eos_token_id
    pairs, truncated = [], 0
    for i in range(n):
        prompt_ids = prompts[i]
        if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
            prompt_ids = [bos, *prompt_ids]
        chosen_ids, rejected_ids = _with_eos(responses[i], eos), _with_eos(responses[n + i], eos)
        if not chosen_ids or not rejected_ids:
            drops[DROP_EMPTY] += 1
            continue
        cut = _truncate(prompt_ids, chosen_ids, rejected_ids, orpo, bos)
        if cut is None:
            drops[DROP_FIT] += 1
            continue
        if cut[1] == cut[2]:
            drops[DROP_SAME_TRUNCATED] += 1
            continue
        truncated += cut != (prompt_ids, chosen_ids, rejected_ids)
        pairs.append(TokenizedPair(*cut))
    return pairs, truncated


def _with_eos(ids: list[int] | None, eos: int | None) -> list[int]:
    ids = list(ids or [])
    if eos is not None and ids and ids[-1] != eos:
        ids.append(eos)
    return ids


def _truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], orpo: OrpoSettings, bos: int | None
) -> tuple[list[int], list[int], list[int]] | None:
    """Prompt keeps its right end (and BOS) within max_prompt_length; responses are cut to what is left."""
    limit = orpo.max_prompt_length
    if len(prompt) > limit:
        if bos is not None and prompt[0] == bos:
            prompt = [bos, *prompt[len(prompt) - (limit - 1) :]]
        else:
            prompt = prompt[len(prompt) - limit :]
    room = orpo.max_length - len(prompt)
    if room < 1:
        return None
    return prompt, chosen[:room], rejected[:room]


# ------------------------------------------------------------------------------------------ cache
def _cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("ORPO_TUNE_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "orpo-tune") / "data"


def _cache_key(data: DataSettings, orpo: OrpoSettings, tokenizer: Any) -> str:
    parts = {
        "version": _CACHE_VERSION,
        "data": data.model_dump(mode="json"),
        "columns_set": sorted(data.columns.model_fields_set),  # conversational: an explicit prompt column
        "train": _source_fingerprint(data.train),
        "eval": _source_fingerprint(data.eval) if data.eval is not None else None,
        "max_length": orpo.max_length,
        "max_prompt_length": orpo.max_prompt_length,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _source_fingerprint(source: DataSource) -> dict[str, Any]:
    fingerprint: dict[str, Any] = source.model_dump(mode="json")
    if source.path.startswith(BUILTIN_PREFIX):
        from orpo_cli.demo_data import DEMO_VERSION, SHORT_ANSWERS_VERSION

        fingerprint["builtin"] = [DEMO_VERSION, SHORT_ANSWERS_VERSION]
        return fingerprint
    local = Path(source.path).expanduser()
    if local.is_file():
        digest = hashlib.sha256()
        with open(local, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        fingerprint["sha256"] = digest.hexdigest()
    return fingerprint  # a hub id (or directory) is keyed by its name, subset and split


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = getattr(tokenizer, "chat_template", None)
    extra = [type(tokenizer).__name__, template, tokenizer.bos_token, tokenizer.eos_token,
             getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


_SPLITS = ("train", "eval")
_FIELDS = ("prompt", "chosen", "rejected")


def _save_cache(path: Path, prepared: PreparedData) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for split in _SPLITS:
        pairs: list[TokenizedPair] = getattr(prepared, split)
        for name in _FIELDS:
            seqs = [getattr(p, f"{name}_ids") for p in pairs]
            offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
            np.cumsum([len(s) for s in seqs], out=offsets[1:])
            flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
            tensors[f"{split}.{name}.ids"] = flat
            tensors[f"{split}.{name}.offsets"] = offsets
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"stats": prepared.stats.to_json(), "version": _CACHE_VERSION})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:  # a read-only or full cache disk costs time on the next run, never the run
        log.warning("data: could not write the tokenized cache %s: %s", path, err)


def _load_cache(path: Path) -> PreparedData | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("version") != _CACHE_VERSION:
                return None
            splits = {}
            for split in _SPLITS:
                columns = []
                for name in _FIELDS:
                    flat = handle.get_tensor(f"{split}.{name}.ids").tolist()
                    offsets = handle.get_tensor(f"{split}.{name}.offsets").tolist()
                    columns.append([flat[a:b] for a, b in itertools.pairwise(offsets)])
                splits[split] = [TokenizedPair(*triple) for triple in zip(*columns, strict=True)]
            stats = DataStats.from_json(metadata["stats"])
    except Exception as err:  # a damaged cache file is rebuilt, not fatal
        log.warning("data: ignoring unreadable cache %s: %s", path, err)
        return None
    stats.from_cache = True
    return PreparedData(train=splits["train"], eval=splits["eval"], stats=stats)
