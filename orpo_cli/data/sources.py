"""Reading a data source into rows: local files (jsonl, json, csv, parquet, .gz), built-in sets, the hub."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import sys
import zlib
from pathlib import Path
from typing import Any

from orpo_cli.errors import UserError
from orpo_cli.recipe import BUILTIN_PREFIX, DataSource

BUILTIN_DATASETS = ("demo", "short-answers", "facts")
_FILE_KINDS = ("jsonl", "json", "csv", "parquet")


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
    from orpo_cli.data.builtin_sets import demo_rows, fact_rows, short_answer_rows

    generators = {"demo": demo_rows, "short-answers": short_answer_rows, "facts": fact_rows}
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
    """The file's text; a corrupt compressed stream or bytes that are not UTF-8 are one line naming the file and
    the line of text where it happened."""
    data = _read_bytes(path, gz, field_name)
    try:
        return data.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(
            f"{field_name}.path: {path}:{line}: not UTF-8 text (byte {err.start}, {data[err.start:err.start + 1]!r}); "
            "save the file as UTF-8"
        ) from None


def _read_bytes(path: Path, gz: bool, field_name: str) -> bytes:
    parts: list[bytes] = []
    try:
        if not gz:
            return path.read_bytes()
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(1 << 16):  # small enough for an error to say where it came
                parts.append(chunk)
        return b"".join(parts)
    except (OSError, EOFError, zlib.error) as err:
        if not gz or getattr(err, "errno", None) is not None:  # the file system's, not the stream's
            raise UserError(f"{field_name}.path: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
        lines = sum(part.count(b"\n") for part in parts)
        where = f"after line {lines} of its text" if lines else "before the end of its first line"
        raise UserError(
            f"{field_name}.path: {path}: corrupt gzip stream {where} ({_one_line(err)}); download or compress it again"
        ) from None


def _read_file(path: Path, field_name: str) -> list[dict]:
    kind, gz = _file_kind(path, field_name)
    if kind == "parquet":
        rows = _parquet_rows(path, field_name)
    else:
        text = _read_text(path, gz, field_name)
        if kind == "csv":
            rows = _csv_rows(text, path)
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
            _refuse_lone_surrogates(text, rows, path)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{path}: row {i + 1} is {type(row).__name__}, expected an object of columns")
    return rows


def _csv_rows(text: str, path: Path) -> list[dict]:
    """The rows of a CSV by its header. A row with more or fewer fields than the header (an unquoted comma) is
    refused with its number: read by position, its columns would be shifted into the wrong fields."""
    # Responses run to pages: the csv module's default cap of 128 KiB per field would refuse them.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[dict] = []
    try:
        header = next(reader, None)
        if header is None:
            return []
        for fields in reader:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise UserError(
                    f"{path}:{reader.line_num}: row {len(rows) + 1} has {len(fields)} fields and the header "
                    f"{len(header)} ({', '.join(header)}); a field holding a comma or a quote must be quoted "
                    '("a, b"), so fix that row or write the file with a CSV writer'
                )
            rows.append(dict(zip(header, fields, strict=True)))
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: invalid CSV: {err}") from None
    return rows


def _parquet_rows(path: Path, field_name: str) -> list[dict]:
    """A parquet file's rows, read group by group so that a corrupt page (a broken zstd or snappy stream) names
    the rows it holds."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own error types for unreadable files
        raise UserError(f"{field_name}.path: cannot read {path} as parquet: {_one_line(err)}") from None
    rows: list[dict] = []
    for group in range(file.num_row_groups):
        count = file.metadata.row_group(group).num_rows
        try:
            rows += file.read_row_group(group).to_pylist()
        except Exception as err:
            raise UserError(
                f"{field_name}.path: {path}: rows {len(rows) + 1}-{len(rows) + count} (row group {group}) cannot "
                f"be read: {_one_line(err)}; the file is damaged: write or download it again"
            ) from None
    return rows


def _json_lines(text: str, path: Path) -> list[Any]:
    rows = []
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: invalid JSON line: {err.msg}") from None
            lines.append(number)
    _refuse_lone_surrogates(text, rows, path, lines)
    return rows


# JSON may spell half of a UTF-16 surrogate pair alone (\ud800): Python keeps it, no tokenizer can encode it.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _refuse_lone_surrogates(text: str, rows: list[Any], path: Path, lines: list[int] | None = None) -> None:
    if not _SURROGATE_ESCAPE.search(text):  # the only way such text gets in: most files are passed at once
        return
    for index, row in enumerate(rows):
        bad = _invalid_text(row)
        if bad is not None:
            where = f"{path}:{lines[index]}" if lines else str(path)
            raise UserError(
                f"{where}: row {index + 1} holds text that is not valid Unicode ({bad!r}: half of a UTF-16 "
                "surrogate pair, escaped alone); fix or remove that row"
            )


def _invalid_text(value: Any) -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return value[max(0, err.start - 10) : err.end + 10]
        return None
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        found = _invalid_text(child)
        if found is not None:
            return found
    return None


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
    except (UnicodeDecodeError, EOFError, zlib.error, OSError) as err:
        if isinstance(err, UnicodeDecodeError) or getattr(err, "errno", None) is None:
            _read_text(path, gz, field_name)  # the stream or its text: the whole read names the line
        raise UserError(f"{field_name}.path: cannot read {path}: {getattr(err, 'strerror', None) or err}") from None


def _hub_columns(source: DataSource, field_name: str) -> list[str] | None:
    try:
        import datasets

        builder = datasets.load_dataset_builder(source.path, source.subset)
    except Exception as err:
        raise UserError(_hub_error(source, field_name, err)) from None
    features = builder.info.features
    return list(features) if features else None
