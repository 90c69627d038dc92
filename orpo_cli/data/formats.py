"""The data formats: checking the mapped columns, and parsing each row into a prompt and two responses."""

from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass
from typing import Any

from orpo_cli.data import prompts
from orpo_cli.data.pairs import DROP_EMPTY, DROP_NO_PROMPT, DROP_SAME
from orpo_cli.data.prompts import Message
from orpo_cli.errors import UserError
from orpo_cli.recipe import DataSettings

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ASSISTANT = prompts.HH_ASSISTANT
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant", "model": "assistant"}


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
    if cols.answer is not None:
        need["answer"] = cols.answer
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
            hint = ""
            if key == "prompt" and data.columns.chosen in columns and data.columns.rejected in columns:
                hint = ("; without a prompt column, chosen and rejected hold whole conversations: "
                        "data.format: conversational (message lists) or implicit (HH-RLHF transcripts)")
            elif data.format != "sharegpt" and data.columns.conversations in columns:
                hint = "; a conversations column is the sharegpt layout: data.format: sharegpt"
            raise UserError(f"data.columns.{key}: column '{column}' not in {where}; it has: {have}{hint}")
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
    answer: str | None = None


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
        if self.cols.answer is not None:
            answer = self._answer(row, self.cols.answer, number)
            for item in result:
                if isinstance(item, _Example):
                    item.answer = answer
        return [_Dropped(number, r) if isinstance(r, str) else r for r in result]

    # -- field access ---------------------------------------------------------------------------
    def _text(self, row: dict, column: str, number: int) -> str | None:
        value = row.get(column)
        if value is None or isinstance(value, str):
            return value
        raise UserError(
            f"data: row {number}: column '{column}' holds {type(value).__name__}, expected text ({self.where})"
            + self._looks_like(row)
        )

    def _answer(self, row: dict, column: str, number: int) -> str | None:
        """The row's known right answer: text, or a number ("24"); None where blank."""
        value = row.get(column)
        if isinstance(value, bool) or not isinstance(value, str | int | float | None):
            raise UserError(
                f"data: row {number}: column '{column}' holds {type(value).__name__}, expected the answer as text "
                f"or a number ({self.where})"
            )
        text = "" if value is None else str(value).strip()
        return text or None

    def _looks_like(self, row: dict) -> str:
        """'; the rows look like data.format: X ...' when the row has another format's shape, else ''."""
        guess = guess_format(row, self.cols)
        if guess is None or guess == self.data.format:
            return ""
        return f"; the rows look like data.format: {guess} ({FORMAT_SHAPES[guess]}), so set that"

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

    def _messages(self, value: Any, column: str, number: int, row: dict | None = None) -> list[Message] | None:
        if value is None:
            return None
        if not isinstance(value, list):
            raise UserError(
                f"data: row {number}: column '{column}' holds {_kind(value)}, but data.format: {self.data.format} "
                f"expects a list of {{role, content}} messages ({self.where})" + self._looks_like(row)
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
        chosen = self._messages(_as_reply_list(row.get(self.cols.chosen)), self.cols.chosen, number, row)
        rejected = self._messages(_as_reply_list(row.get(self.cols.rejected)), self.cols.rejected, number, row)
        if not chosen or not rejected:
            return [DROP_EMPTY]
        prompt_value = row.get(self.cols.prompt)
        if prompt_value is not None:
            if isinstance(prompt_value, str):
                prompt_value = [{"role": "user", "content": prompt_value}]
            prompt = self._messages(prompt_value, self.cols.prompt, number, row) or []
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
                f"data: row {number}: column '{column}' holds {_kind(turns)}, "
                f"expected a list of {{from, value}} messages ({self.where})" + self._looks_like(row)
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
    """A conversational response given as a single message becomes a one-message list. A bare string is
    not taken for one: it is the pairs format's shape, and a row that mixes the two is a mistake."""
    if isinstance(value, dict):
        return [value]
    return value


# What each format's rows look like, for messages that say what a row looked like instead.
FORMAT_SHAPES = {
    "pairs": "prompt, chosen and rejected strings",
    "conversational": "chosen and rejected lists of {role, content} messages",
    "implicit": "chosen and rejected whole transcripts sharing a prompt, no prompt column",
    "sharegpt": "a conversations list of {from, value} plus chosen and rejected",
    "one_to_many": "answers joined by data.separator",
}


def guess_format(row: dict, cols: Any) -> str | None:
    """The data.format a row's shape fits (pairs, conversational, implicit or sharegpt), None if unclear.

    one_to_many rows look like pairs and are never guessed.
    """
    chosen, rejected = row.get(cols.chosen), row.get(cols.rejected)
    if isinstance(row.get(cols.conversations), list) and chosen is not None and rejected is not None:
        return "sharegpt"
    if _message_list(chosen) and _message_list(rejected):
        return "conversational"
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(row.get(cols.prompt), str):
            return "pairs"
        if cols.prompt not in row:
            return "implicit"
    return None


def _message_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and ("role" in m or "from" in m) for m in value
    )


def _kind(value: Any) -> str:
    return "text" if isinstance(value, str) else type(value).__name__


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
