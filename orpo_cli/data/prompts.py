"""Prompts: how a conversation becomes the text and token ids a model is prompted with, in training and after.

One renderer for both sides: `orpo_cli.data` renders every training prompt (and cuts each response out of
the rendered conversation) with these functions, and `orpo_cli.generation` renders the prompts of
`generate`, `eval --samples` and the export probes with them, so a tuned model is prompted exactly as it
was trained.

* With a chat template: the template applied to the messages with `add_generation_prompt=True`.
* Without one (plain text): `system + "\\n\\n" + prompt`; several turns become a `Human:`/`Assistant:`
  transcript ending in `\\n\\nAssistant:`.
* Tokenized without the tokenizer's own special tokens; BOS then goes first, exactly once, when the model
  family uses one (`bos_for`).

A template that refuses a conversation (Gemma-2 has no system role; Mistral's and Gemma's templates
raise on roles that do not alternate user/assistant) raises `TemplateRefused` with the template's own
one-line reason; each caller decides what that means for its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Message = dict[str, str]

HH_ASSISTANT = "\n\nAssistant:"
_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}


class TemplateRefused(Exception):
    """The chat template raised on a conversation; `str(err)` is its reason, on one line."""


def template_of(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template (the default one of a named set), or None."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def render(tokenizer: Any, messages: Sequence[Message], template: str, *, generation_prompt: bool) -> str:
    """`messages` through the Jinja `template`; raises TemplateRefused when the template raises."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as err:  # jinja2 errors, e.g. raise_exception('System role not supported')
        raise TemplateRefused(_reason(err)) from None


def prompt_text(tokenizer: Any, messages: Sequence[Message], template: str | None) -> str:
    """The text the assistant's reply follows: the template with its generation prompt, or plain text."""
    if template is None:
        return plain_prompt(messages)
    return render(tokenizer, messages, template, generation_prompt=True)


def prompt_ids(tokenizer: Any, messages: Sequence[Message], template: str | None) -> list[int]:
    """Token ids of `messages` ready for the assistant's reply (BOS first when the family uses one)."""
    ids = tokenizer(prompt_text(tokenizer, messages, template), add_special_tokens=False)["input_ids"]
    return with_bos(ids, bos_for(tokenizer, template))


def with_bos(ids: list[int], bos: int | None) -> list[int]:
    """`ids` with `bos` in front unless it is None or already there."""
    if bos is not None and (not ids or ids[0] != bos):
        return [bos, *ids]
    return ids


def bos_for(tokenizer: Any, template: str | None) -> int | None:
    """BOS to put in front of prompts, or None when the tokenizer has none or the model family uses none.

    The family uses one when the tokenizer adds it to `tokenizer("a")` by itself, or a chat template of the
    family (the one in effect or the tokenizer's own) emits it. Phi-3: the tokenizer adds `<s>`, its
    template does not write it. Built-in models: the tokenizer adds nothing, the template writes `<|bos|>`.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    if ids and ids[0] == bos:
        return bos
    for candidate in {template, template_of(tokenizer)} - {None}:
        if not isinstance(candidate, str):
            continue
        try:
            rendered = render(tokenizer, [{"role": "user", "content": "a"}], candidate, generation_prompt=True)
        except TemplateRefused:  # a template that cannot render this probe tells nothing about BOS
            continue
        if tokenizer.bos_token and tokenizer.bos_token in rendered:
            return bos
    return None


def plain_prompt(messages: Sequence[Message]) -> str:
    """The plain-text prompt: `system\\n\\nprompt`, several turns as a Human:/Assistant: transcript."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = list(messages[1:] if system is not None else messages)
    if len(turns) == 1 and turns[0]["role"] == "user":
        body = turns[0]["content"]
    else:
        body = transcript(turns) + HH_ASSISTANT
    return f"{system}\n\n{body}" if system else body


def plain_reply(prompt: Sequence[Message], reply: Sequence[Message]) -> str:
    """The plain-text response that follows `plain_prompt(prompt)`: the reply (after a space in a transcript)."""
    turns = [m for m in prompt if m["role"] != "system"]
    single = len(turns) == 1 and turns[0]["role"] == "user"
    first = reply[0]["content"] if single else " " + reply[0]["content"]
    return first + transcript(reply[1:])


def transcript(messages: Sequence[Message]) -> str:
    return "".join(f"\n\n{_LABELS.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)


def _reason(err: BaseException) -> str:
    """One line: a template's own raise_exception message as it is, anything else with its type."""
    text = " ".join(str(err).split())
    if type(err).__name__ == "TemplateError" and text:
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
