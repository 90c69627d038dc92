"""Rendering (through orpo_cli.data.prompts), tokenizing and truncating parsed examples into pairs."""

from __future__ import annotations

from collections import Counter
from typing import Any

from orpo_cli.data import prompts
from orpo_cli.data.formats import _Example
from orpo_cli.data.pairs import (
    DROP_EMPTY,
    DROP_FIT,
    DROP_SAME,
    DROP_SAME_TRUNCATED,
    DROP_TEMPLATE,
    TokenizedPair,
)
from orpo_cli.data.prompts import Message
from orpo_cli.data.sources import _one_line
from orpo_cli.errors import UserError
from orpo_cli.recipe import DataSettings, OrpoSettings

_TOKENIZE_BATCH = 512


# ------------------------------------------------------------------------------------------ rendering
def _chat_template(data: DataSettings, tokenizer: Any) -> str | None:
    """The Jinja template in effect (None: plain text); a recipe template is set on the tokenizer."""
    choice = data.chat_template
    if choice == "none":
        return None
    if choice == "auto":
        return prompts.template_of(tokenizer)
    tokenizer.chat_template = choice
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
        )
    except Exception as err:  # jinja2 syntax/runtime errors
        raise UserError(f"data.chat_template: the template does not render: {_one_line(err)}") from None
    return choice


class _Renderer:
    """Message lists -> (prompt text, response text) with the chat template, or as plain text.

    The prompt is `orpo_cli.data.prompts.prompt_text`, what inference renders. A response is the template applied
    to prompt + reply with that prompt cut off its front. Raises TemplateRefused when the template refuses
    the row.
    """

    def __init__(self, tokenizer: Any, template: str | None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.eos = tokenizer.eos_token

    def __call__(self, example: _Example) -> tuple[str, str, str]:
        prompt = prompts.prompt_text(self.tokenizer, example.prompt, self.template)
        if self.template is None:
            chosen = prompts.plain_reply(example.prompt, example.chosen)
            rejected = prompts.plain_reply(example.prompt, example.rejected)
        else:
            chosen = self._response(example, prompt, example.chosen)
            rejected = self._response(example, prompt, example.rejected)
        return prompt, self._trim_after_eos(chosen), self._trim_after_eos(rejected)

    def _response(self, example: _Example, prompt: str, reply: list[Message]) -> str:
        full = prompts.render(self.tokenizer, example.prompt + reply, self.template, generation_prompt=False)
        if full.startswith(prompt):
            return full[len(prompt):]
        if len(example.prompt) > 1 and example.prompt[0]["role"] == "system":
            # Mistral's templates write the system message into the LAST message when it is the user's, so
            # it is in the generation prompt but gone once a reply follows (mistral-common's own tokenizer
            # keeps it before the last user message). The prompt stays what inference renders; the reply is
            # what the template writes after the same turns without the system message.
            turns = example.prompt[1:]
            bare = prompts.render(self.tokenizer, turns, self.template, generation_prompt=True)
            bare_full = prompts.render(self.tokenizer, turns + reply, self.template, generation_prompt=False)
            if bare_full.startswith(bare):
                return bare_full[len(bare):]
        raise UserError(
            f"data.chat_template: row {example.row}: the prompt rendered with add_generation_prompt=True is not "
            "a prefix of prompt + reply rendered, so the reply cannot be cut out (the template rewrites "
            "earlier text when a reply follows); use a template without that, or chat_template: none"
        )

    def _trim_after_eos(self, response: str) -> str:
        """Drop whitespace a template writes after the EOS that ends a turn, so EOS ends the response."""
        stripped = response.rstrip()
        return stripped if self.eos and stripped.endswith(self.eos) else response


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
    rendered, answers = [], []
    for example in examples:
        try:
            prompt, chosen, rejected = renderer(example)
        except prompts.TemplateRefused as err:
            drops[f"{DROP_TEMPLATE} ({err})"] += 1
            continue
        if chosen == rejected:
            drops[DROP_SAME] += 1
        else:
            rendered.append((prompt, chosen, rejected))
            answers.append(example.answer)
    if not rendered:
        return [], 0
    prompt_tokens = _encode(tokenizer, [p for p, _, _ in rendered])
    fulls = _encode(tokenizer, [p + c for p, c, _ in rendered] + [p + r for p, _, r in rendered])
    n = len(rendered)
    responses: list[list[int] | None] = []
    alone: list[int] = []  # responses whose joint tokenization merged across the prompt boundary
    for i, full in enumerate(fulls):
        prompt_ids = prompt_tokens[i % n]
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
        prompt_ids = prompts.with_bos(prompt_tokens[i], bos)
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
        pairs.append(TokenizedPair(*cut, answer=answers[i]))
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
