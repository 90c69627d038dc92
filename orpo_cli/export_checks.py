"""How an export is checked before it is put in place: a few probe prompts (eval pairs, or fixed prompts when the
data is gone), the logits of a model on them inside its adapter's context, and how far two sets of logits are
apart; for a merge also this model's fp32 noise floor, which the merge's tolerance is a multiple of."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orpo_cli.adapters import InferenceAdapter, NoAdapter
from orpo_cli.errors import UserError
from orpo_cli.recipe import Recipe

# A merge rounds every merged weight once in fp32, so a correct one sits at about 1x the model's fp32 noise
# floor (measured 0.85-1.2x on SmolLM2-135M and the built-ins); a wrong one (an adapter applied twice, a
# layer's delta left out) sits thousands of times above it.
MERGE_TOLERANCE_FACTOR = 10.0
# A bundle reloads the very same base and adapter: relative to max(1, max |logit|) of the run's model.
BUNDLE_RTOL = 1e-4
_NOISE_SEED = 20240314
_PROBES = 4
_PROBE_TOKENS = 128


@torch.no_grad()
def noise_floor(model: nn.Module, probes: list[tuple[list[int], int]], clean: list[torch.Tensor]) -> float:
    """Max |Δlogit| on `probes` when every fp32 weight of `model` is rounded once more, at random.

    A merge computes each merged weight in fp32 and rounds it once; this draws an independent rounding
    error of the same size (each weight one ulp up or down with probability 1/24 each: the variance of a
    uniform error in ±½ ulp) and measures what it does to the logits (`clean`: the unperturbed ones). The
    perturbation is integer arithmetic on the weights' bits, so it is undone exactly: `model` is unchanged.
    """
    params = [p for p in model.parameters() if p.dtype == torch.float32]

    def steps(i: int, p: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(_NOISE_SEED + i)
        draw = torch.randint(0, 24, p.shape, generator=generator, dtype=torch.int32)
        step = (draw == 0).to(torch.int32) - (draw == 1).to(torch.int32)
        return step * (p.data != 0)  # a zero's bits minus one would be a NaN

    for i, p in enumerate(params):
        p.data.view(torch.int32).add_(steps(i, p).to(p.device))
    try:
        noisy = probe_logits(model, NoAdapter(), probes, torch.device("cpu"))
    finally:
        for i, p in enumerate(params):
            p.data.view(torch.int32).sub_(steps(i, p).to(p.device))
    return max_abs_diff(clean, noisy)


def probe_prompts(recipe: Recipe, tokenizer: Any) -> list[tuple[list[int], int]]:
    """(ids, prompt length) of a few eval prompts with their chosen answers; fixed prompts if the data is gone."""
    from orpo_cli.data.prepare import prepare_data

    try:
        data = prepare_data(recipe.data, recipe.orpo, tokenizer)
        pairs = (data.eval or data.train)[:_PROBES]
    except UserError:  # the training data may not be on this machine any more
        pairs = []
    if pairs:
        return [((p.prompt_ids + p.chosen_ids)[:_PROBE_TOKENS], len(p.prompt_ids)) for p in pairs]
    from orpo_cli.generation import chat_template_in_use, conversation, render_prompt

    template = chat_template_in_use(tokenizer, recipe)
    texts = ["What colour is the sky?", "Name an animal that says moo.", "Say something kind.", "Count to three."]
    probes = []
    for text in texts[:_PROBES]:
        ids = render_prompt(tokenizer, conversation(text, recipe.data.system_prompt), template)[:_PROBE_TOKENS]
        probes.append((ids, len(ids)))
    return probes


@torch.no_grad()
def probe_logits(
    model: nn.Module, adapter: InferenceAdapter, probes: list[tuple[list[int], int]], device: torch.device
) -> list[torch.Tensor]:
    out = []
    for ids, prompt_length in probes:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        mask = torch.ones_like(x)
        batch = {"input_ids": x, "attention_mask": mask, "prompt_lengths": torch.tensor([prompt_length], device=device)}
        with adapter.forward_context(model, batch):
            out.append(model(input_ids=x, attention_mask=mask, use_cache=False).logits[0].float().cpu())
    return out


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def diff_stats(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max, RMS) of |a - b| over every probe token and vocabulary entry."""
    squares = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True))
    return max_abs_diff(a, b), (squares / sum(x.numel() for x in a)) ** 0.5
