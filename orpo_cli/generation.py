"""Prompting a tuned model: the prompt rendered as in training, then `generate` inside the adapter's context.

Every call to `model.generate` goes through `adapter.forward_context(model, batch)` with each row's real
prompt length, whatever the adapter: LoRA ignores it, ReFT needs it to place its interventions on the
prompt positions (and only there while new tokens are generated).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from orpo_cli.adapters import InferenceAdapter
from orpo_cli.data import prompts
from orpo_cli.errors import UserError
from orpo_cli.recipe import Recipe

Message = prompts.Message


# ------------------------------------------------------------------------------------------ prompt
def chat_template_in_use(tokenizer: Any, recipe: Recipe | None) -> str | None:
    """The template the model trained with: the saved tokenizer's, unless the recipe said plain text."""
    if recipe is not None and recipe.data.chat_template == "none":
        return None
    return prompts.template_of(tokenizer)


def render_prompt(tokenizer: Any, messages: Sequence[Message], template: str | None) -> list[int]:
    """Token ids of `messages` ready for the assistant's reply, rendered by the renderer training used.

    With a chat template: the template with add_generation_prompt. Without: `system\\n\\nprompt` (several
    turns as a Human:/Assistant: transcript). BOS goes first when the model family uses one, exactly once.
    """
    try:
        return prompts.prompt_ids(tokenizer, messages, template)
    except prompts.TemplateRefused as err:  # e.g. a template without a system role, given --system
        raise UserError(f"the chat template cannot render this conversation: {err}") from None


def conversation(prompt: str, system: str | None, history: Sequence[Message] = ()) -> list[Message]:
    head = [{"role": "system", "content": system}] if system else []
    return [*head, *history, {"role": "user", "content": prompt}]


# ------------------------------------------------------------------------------------------ generate
_NOTED: set[str] = set()


def _within_context(model: nn.Module, width: int, config: Any) -> Any:
    """`config` with max_new_tokens cut so that prompt + answer fit the model's context (plan/shapes.context_limit,
    read from the model's config); a prompt that fills it alone is a user error."""
    from orpo_cli.plan.shapes import context_limit

    limit = context_limit(model.config) if getattr(model, "config", None) is not None else None
    if limit is None or width + config.max_new_tokens <= limit:
        return config
    if width >= limit:
        raise UserError(
            f"the prompt is {width} tokens and the model's context is {limit} positions: no room for an answer; "
            "shorten the prompt (or, in a chat, /reset)"
        )
    note = (
        f"note: answers stop at {limit - width} new tokens, not {config.max_new_tokens}: the prompt takes {width} of "
        f"the model's {limit} positions"
    )
    if note not in _NOTED:  # once per process: eval's samples come in many batches
        _NOTED.add(note)
        print(note, file=sys.stderr, flush=True)
    config = copy.deepcopy(config)
    config.max_new_tokens = limit - width
    return config


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
    adapter: InferenceAdapter,
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
    adapter: InferenceAdapter,
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
    adapter: InferenceAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: Any,
    streamer: Any = None,
) -> torch.Tensor:
    """The new tokens of `model.generate`, run inside the adapter's forward context, stopping at the model's
    context (a note says so) rather than running past its positions."""
    config = _within_context(model, input_ids.shape[1], config)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_lengths": attention_mask.sum(dim=1)}
    with adapter.forward_context(model, batch):
        out = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config, streamer=streamer
        )
    return out[:, input_ids.shape[1] :]
