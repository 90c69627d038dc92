"""Reading a recipe: its YAML (a key given twice is an error), `--set` overrides, validation against the schema
(recipe.py), and pydantic's errors turned into one line per problem that names the YAML path and, for an unknown
key, the nearest valid one."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from orpo_cli.errors import UserError
from orpo_cli.recipe import (
    ADAPTER_KINDS,
    ADAPTER_KINDS_OR,
    ADAPTER_MODELS,
    OLD_ADAPTER_KINDS,
    DataSource,
    Recipe,
    section_model,
)


# ---------------------------------------------------------------------------------------------- loading
def _note_old_names(data: dict[str, Any], path: Path) -> None:
    """One line on stderr for each old name the recipe uses that is still read (adapter.kind: none -> full)."""
    import sys

    adapter = data.get("adapter")
    kind = adapter.get("kind") if isinstance(adapter, dict) else None
    if isinstance(kind, str) and kind in OLD_ADAPTER_KINDS:
        print(
            f"note: {path}: adapter.kind: {kind} is the old name of adapter.kind: {OLD_ADAPTER_KINDS[kind]} "
            "(full fine-tuning); it is read as that, and the run's recipe.yaml says it",
            file=sys.stderr,
        )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem becomes one UserError line per issue."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give the recipe's YAML file")
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise UserError(
            f"{path}: {path.stat().st_size:,} bytes, too large for a recipe (at most {MAX_RECIPE_BYTES:,}); "
            "is it a data file? Give the recipe's YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    data = parse_yaml(text, str(path))
    empty = data is None  # no text, or only comments
    if empty:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a recipe is a YAML mapping of sections (model:, data:, train:, ...), not {type(data).__name__}"
        )
    data = apply_overrides(data, overrides or [])
    data.setdefault("name", path.stem)
    _note_old_names(data, path)
    try:
        return validate_recipe(data, source=str(path))
    except UserError:
        if not empty:
            raise
        raise UserError(
            f"{path}: the recipe is empty; it needs at least model.name_or_path and data.train "
            "(`orpo-tune init` writes a complete starter)"
        ) from None


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError("\n".join(f"{source}: {line}" for line in describe_errors(err))) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a nested mapping."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set train.lr=1e-5")
        try:
            value = parse_yaml(raw, f"--set {item!r}") if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(
                    f"--set {item!r}: {'.'.join(parts[: depth + 1])} is a value ({child!r}), not a section; "
                    "write it as a mapping in the recipe to override its keys"
                )
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


# Bounds no recipe comes near (the shipped ones hold under 100 values, 4 levels deep), checked on the parser's
# events before anything is built: a few hundred bytes of anchors and aliases can name 10^9 values.
MAX_RECIPE_BYTES = 1 << 20
MAX_VALUES = 100_000  # after alias expansion: what a copy of the recipe would hold
MAX_DEPTH = 32
# The tags a recipe's values may carry; every other one (!!python/..., !!binary, !custom) is refused.
_CORE = "tag:yaml.org,2002:"
_PLAIN_TAGS = {None, "!", *(_CORE + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge"))}


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, but a key given twice in one mapping is an error naming both lines, and the cost is bounded.

    PyYAML keeps the last of two equal keys without a word: a second `train:` section silently replaces the
    first whole, dropping every key set there. Merge keys (`<<: *anchor`) may still be overridden.
    Before anything is built, the parser's events are checked (`_check_bounded`): no tag beyond plain values,
    at most MAX_VALUES values once aliases are expanded, at most MAX_DEPTH levels; each refusal names the line.
    """
    try:
        _check_bounded(text, source)
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _refuse_duplicate_keys(node, source, [], set())
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        if source.startswith("--set"):
            raise
        raise UserError(_yaml_error_line(Path(source), err)) from None


def _check_bounded(text: str, source: str) -> None:
    """Walk the parser's events (no node is built, nothing recursive runs) and refuse a tag that is not a plain
    value's, more than MAX_VALUES values after alias expansion, or more than MAX_DEPTH levels of nesting."""
    loader = yaml.SafeLoader(text)
    anchored: dict[str, tuple[int, int]] = {}  # anchor -> (values, depth) of what it holds
    open_: list[list[Any]] = []  # the collections being read: [values, depth below, anchor]
    total = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            line = f"{source}:{event.start_mark.line + 1}"
            tag = getattr(event, "tag", None)
            if tag not in _PLAIN_TAGS and not isinstance(event, yaml.CollectionEndEvent | yaml.AliasEvent):
                raise UserError(
                    f"{line}: the YAML tag {tag.replace(_CORE, '!!')} is not allowed in a recipe, which holds plain "
                    "values (text, numbers, true/false, lists, mappings); remove the tag"
                )
            if isinstance(event, yaml.CollectionStartEvent):
                open_.append([1, 0, event.anchor])
                total += 1
                if len(open_) > MAX_DEPTH:
                    raise UserError(f"{line}: nested more than {MAX_DEPTH} levels deep; a recipe nests a few levels")
                continue
            if isinstance(event, yaml.ScalarEvent):
                size = (1, 1)
                if event.anchor:
                    anchored[event.anchor] = size
            elif isinstance(event, yaml.AliasEvent):
                size = anchored.get(event.anchor, (1, 1))  # an unknown one is the composer's to refuse
            elif isinstance(event, yaml.CollectionEndEvent):
                values, below, anchor = open_.pop()
                size = (values, below + 1)
                if anchor:
                    anchored[anchor] = size
                total -= values  # counted already, value by value; added back below as the whole
            else:
                continue
            total += size[0]
            if total > MAX_VALUES:
                raise UserError(
                    f"{line}: the recipe expands to more than {MAX_VALUES:,} values (each YAML alias repeats all "
                    "that its anchor holds); no recipe needs that many: write it out without aliases"
                )
            if len(open_) + size[1] > MAX_DEPTH:
                raise UserError(f"{line}: nested more than {MAX_DEPTH} levels deep; a recipe nests a few levels")
            if open_:
                open_[-1][0] += size[0]
                open_[-1][1] = max(open_[-1][1], size[1])
    finally:
        loader.dispose()


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_duplicate_keys(node: yaml.Node, source: str, where: list[str], seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                _refuse_duplicate_keys(value_node, source, where, seen)
                continue
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in first:
                dotted = ".".join([*where, key])
                line, again = first[key].start_mark.line + 1, key_node.start_mark.line + 1
                raise UserError(
                    f"{source}:{again}: duplicate key `{dotted}` (also on line {line}); YAML would keep only the "
                    "last one and drop the other without a word: merge them into one"
                )
            if key is not None:
                first[key] = key_node
            _refuse_duplicate_keys(value_node, source, [*where, key or "?"], seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            inner = [*where[:-1], f"{where[-1]}[{i}]"] if where else [f"[{i}]"]
            _refuse_duplicate_keys(item, source, inner, seen)


def _yaml_error_line(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None:
        return f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"
    return f"{path}: invalid YAML: {problem}"


# ------------------------------------------------------------------------------------- error messages
def describe_errors(err: ValidationError) -> list[str]:
    """One line per problem: the YAML path, what is wrong, and for unknown keys the nearest valid one."""
    lines = []
    for e in err.errors():
        fields, model = _walk(e["loc"])
        where = ".".join(fields) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent, key = fields[:-1], fields[-1] if fields else ""
            valid = _valid_keys(model)
            hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            prefix = ".".join(parent)
            suggestion = f"; did you mean `{prefix + '.' if prefix else ''}{hint[0]}`?" if hint else ""
            known = f" (valid keys here: {', '.join(valid)})" if not hint and valid else ""
            lines.append(f"{where}: unknown key{suggestion}{known}")
            continue
        if e["type"] == "missing":
            lines += _missing(fields, model)
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "finite_number":
            msg = "must be a finite number; .inf and .nan mean nothing in a recipe"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown kind {e['input'].get('kind')!r}; use one of {', '.join(ADAPTER_KINDS)}"
        elif e["type"] == "union_tag_not_found":
            msg = f"needs a `kind:` ({ADAPTER_KINDS_OR})"
        value = e.get("input")
        shown = (
            ""
            if isinstance(value, dict) or e["type"] in {"missing", "union_tag_invalid"}
            else f" (got {value!r})"
        )
        lines.append(f"{where}: {msg}{shown}")
    return lines


def _missing(fields: list[str], holder: type[BaseModel] | None) -> list[str]:
    """A required key, or a section holding required keys, that the recipe does not give: one line per key."""
    key = fields[-1] if fields else ""
    section = section_model(holder, key) if holder is not None else None
    info = holder.model_fields.get(key) if holder is not None else None
    if section is None or section is DataSource:  # a data source may be given as one string
        what = f" ({info.description})" if info is not None and info.description else ""
        return [f"{'.'.join(fields)}: required and missing{what}"]
    lines = []
    for name, sub in section.model_fields.items():
        if sub.is_required():
            lines += _missing([*fields, sub.alias or name], section)
    return lines


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """Turn pydantic's error location into YAML keys, dropping union tags; return the model holding the last key."""
    fields: list[str] = []
    model: type[BaseModel] | None = Recipe
    holder: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            fields[-1] = f"{fields[-1]}[{part}]" if fields else f"[{part}]"
            continue
        if model is None:
            fields.append(str(part))
            continue
        if part in ADAPTER_MODELS and fields and fields[-1] == "adapter":
            model = ADAPTER_MODELS[part]
            continue
        holder = model
        fields.append(str(part))
        model = section_model(model, str(part))
    return fields, holder


def _valid_keys(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]
