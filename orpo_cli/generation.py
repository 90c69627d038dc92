"""Prompting a tuned model: the prompt rendered as in training, then `generate` inside the adapter's context.

Every call to `model.generate` goes through `adapter.forward_context(model, batch)` with each row's real
prompt length, whatever the adapter: LoRA ignores it, ReFT needs it to place its interventions on the
prompt positions (and only there while new tokens are generated).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from orpo_cli.adapters import Adapter
from orpo_cli.errors import UserError
from orpo_cli.recipe import Recipe

Message = dict[str, str]
_LABELS = {"user": "Human", "assistant": "Assistant", "system": "System"}


# ------------------------------------------------------------------------------------------ prompt
def chat_template_in_use(tokenizer: Any, recipe: Recipe | None) -> str | None:
    """The template the model trained with: the saved tokenizer's, unless the recipe said plain text."""
    if recipe is not None and recipe.data.chat_template == "none":
        return None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def render_prompt(tokenizer: Any, messages: Sequence[Message], template: str | None) -> list[int]:
    """Token ids of `messages` ready for the assistant's reply, rendered the way data.py renders prompts.

    With a chat template: the template with add_generation_prompt. Without: `system\\n\\nprompt` (several
    turns as a Human:/Assistant: transcript). BOS goes first when the model family uses one, exactly once.
    """
    if template is not None:
        try:
            text = tokenizer.apply_chat_template(
                list(messages), chat_template=template, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # jinja2 errors, e.g. a template without a system role
            first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
            raise UserError(f"the chat template cannot render this conversation: {first}") from None
    else:
        text = _plain(messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and _family_uses_bos(tokenizer, template) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def conversation(prompt: str, system: str | None, history: Sequence[Message] = ()) -> list[Message]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *history, {"role": "user", "content": prompt}]


def _plain(messages: Sequence[Message]) -> str:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    turns = list(messages[1:] if system is not None else messages)
    if len(turns) == 1 and turns[0]["role"] == "user":
        body = turns[0]["content"]
    else:
        body = "".join(f"\n\n{_LABELS.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in turns)
        body += "\n\nAssistant:"
    return f"{system}\n\n{body}" if system else body


def _family_uses_bos(tokenizer: Any, template: str | None) -> bool:
    """The tokenizer adds BOS by itself, or a chat template of its family emits it (as data.py decides)."""
    ids = tokenizer("a")["input_ids"]
    if ids and ids[0] == tokenizer.bos_token_id:
        return True
    for candidate in {template, getattr(tokenizer, "chat_template", None)} - {None}:
        if not isinstance(candidate, str):
            continue
        try:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": "a"}], chat_template=candidate, tokenize=False, add_generation_prompt=True
            )
        except Exception:  # a template that cannot render the probe tells nothing about BOS
            continue
        if tokenizer.bos_token and tokenizer.bos_token in rendered:
            return True
    return False


# ------------------------------------------------------------------------------------------ generate
def generation_config(model: nn.Module, tokenizer: Any, *, max_new_tokens: int, temperature: float) -> Any:
    """The model's own generation config with our length, stop tokens and decoding (greedy at temperature 0)."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    eos = config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    config.eos_token_id = sorted(stops) or None
    config.pad_token_id = tokenizer.pad_token_id
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    if temperature > 0:
        config.do_sample, config.temperature = True, temperature
    else:
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    return config


def stream_answer(
    model: nn.Module,
    adapter: Adapter,
    tokenizer: Any,
    prompt_ids: list[int],
    *,
    device: torch.device,
    max_new_tokens: int,
    temperature: float,
    seed: int | None = None,
    streamer: Any = None,
) -> str:
    """Generate one answer, printing it as it comes (TextStreamer on stdout unless `streamer` is given)."""
    from transformers import TextStreamer

    if streamer is None:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if seed is not None:
        torch.manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    new = _generate(
        model, adapter, ids, torch.ones_like(ids), generation_config(
            model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature
        ), streamer=streamer
    )
    return tokenizer.decode(new[0], skip_special_tokens=True)


def generate_batch(
    model: nn.Module,
    adapter: Adapter,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    device: torch.device,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy answers to many tokenized prompts, left-padded in batches."""
    config = generation_config(model, tokenizer, max_new_tokens=max_new_tokens, temperature=0.0)
    pad = tokenizer.pad_token_id
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):  # left padding: every row's answer starts at column `width`
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        new = _generate(model, adapter, ids.to(device), mask.to(device), config)
        answers += [tokenizer.decode(row, skip_special_tokens=True) for row in new]
        if progress is not None:
            progress(len(chunk))
    return answers


@torch.no_grad()
def _generate(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: Any,
    streamer: Any = None,
) -> torch.Tensor:
    """The new tokens of `model.generate`, run inside the adapter's forward context."""
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_lengths": attention_mask.sum(dim=1)}
    with adapter.forward_context(model, batch):
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, streamer=streamer
        )
    return out[:, input_ids.shape[1] :]
