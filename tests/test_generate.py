"""`orpo-tune generate`: run directories, merged exports and bundles; prompt rendering; the adapter context."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from typer.testing import CliRunner

from orpo_cli.adapters import NoAdapter
from orpo_cli.cli import app
from orpo_cli.generation import (
    chat_template_in_use,
    conversation,
    generate_batch,
    render_prompt,
    stream_answer,
)

runner = CliRunner()
PROMPT = "What colour is the sky?"


def _generate(path, *args):
    return runner.invoke(app, ["generate", str(path), *[str(a) for a in args]])


def _answer(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def lora_export(tiny_lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "merged"
    result = runner.invoke(app, ["export", str(tiny_lora_run.root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_run_dir_and_its_merged_export_answer_alike(tiny_lora_run, lora_export):
    from_run = _answer(_generate(tiny_lora_run.root, "--prompt", PROMPT, "--max-new-tokens", 12))
    from_export = _answer(_generate(lora_export, "--prompt", PROMPT, "--max-new-tokens", 12))
    assert from_run.strip() and from_export.strip()
    if not torch.cuda.is_available():  # on a GPU the run loads in bf16, the fp32 export in fp32
        assert from_run == from_export  # greedy: same model, same tokens


def test_sampling_is_seeded(lora_export):
    args = ("--prompt", PROMPT, "--max-new-tokens", 12, "--temperature", 1.5)
    first = _answer(_generate(lora_export, *args, "--seed", 1))
    assert first == _answer(_generate(lora_export, *args, "--seed", 1))
    others = {_answer(_generate(lora_export, *args, "--seed", s)) for s in (2, 3, 4)}
    assert others != {first}


@pytest.mark.parametrize(("lines", "histories"), [
    (["hello", "how are you?"], [0, 2]),  # the second message sees the first exchange
    (["hello", "/reset", "how are you?"], [0, 0]),  # /reset forgot it
    (["hello", "", "/exit", "never read"], [0]),  # an empty line is skipped; /exit ends the chat
])
def test_interactive_chat_loop(lora_export, monkeypatch, lines, histories):
    """Each message is answered with the conversation so far as its history, which /reset empties."""
    import orpo_cli.generation as generation

    seen = []

    def spy(prompt, system, history=()):
        seen.append((prompt, len(history)))
        return conversation(prompt, system, history)

    monkeypatch.setattr(generation, "conversation", spy)
    result = runner.invoke(app, ["generate", str(lora_export), "--interactive", "--max-new-tokens", "4"],
                           input="".join(line + "\n" for line in lines))
    assert result.exit_code == 0, result.output
    messages = [line for line in lines if line and not line.startswith("/")][: len(histories)]
    assert seen == list(zip(messages, histories, strict=True))
    assert result.stdout.count("> ") >= len(histories)


def test_reft_bundle_and_run_answer_alike(tiny_reft_run, tmp_path):
    out = tmp_path / "bundle"
    exported = runner.invoke(app, ["export", str(tiny_reft_run.root), "--out", str(out)])
    assert exported.exit_code == 0, exported.output
    from_bundle = _answer(_generate(out, "--prompt", PROMPT, "--max-new-tokens", 10))
    from_run = _answer(_generate(tiny_reft_run.root, "--prompt", PROMPT, "--max-new-tokens", 10))
    assert from_bundle.strip() and from_bundle == from_run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}", "--prompt", "hi"], "neither a run directory"),
        (["{tmp}/missing", "--prompt", "hi"], "no such directory"),
        (["{run}"], "--prompt TEXT is required"),
        (["{run}", "--prompt", "hi", "--temperature", "-1"], "--temperature: must be at least 0"),
    ],
)
def test_user_errors_are_one_line_exit_2(tiny_lora_run, tmp_path, args, message):
    result = _generate(*[a.format(tmp=tmp_path, run=tiny_lora_run.root) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("template", ["auto", "none"])
def test_prompt_rendered_exactly_as_training_rendered_it(tmp_path, template):
    """generate's prompt ids == orpo_cli.data's prompt ids for the same row (chat template, or plain text + BOS)."""
    from orpo_cli.data.prepare import prepare_data
    from orpo_cli.models.loading import load_tokenizer
    from orpo_cli.recipe import DataSettings, OrpoSettings

    row = {"prompt": PROMPT, "chosen": "Blue.", "rejected": "No."}
    (tmp_path / "one.jsonl").write_text(json.dumps(row) + "\n")
    tokenizer = load_tokenizer("builtin:tiny-llama")
    data = DataSettings(train=str(tmp_path / "one.jsonl"), eval_ratio=0, chat_template=template,
                        system_prompt="Be kind.")
    expected = prepare_data(data, OrpoSettings(max_length=128, max_prompt_length=64), tokenizer,
                            cache_dir=tmp_path / "cache").train[0].prompt_ids

    class _Recipe:  # what chat_template_in_use reads
        data = DataSettings(train="builtin:demo", chat_template=template)

    used = chat_template_in_use(tokenizer, _Recipe())
    assert (used is None) == (template == "none")
    assert render_prompt(tokenizer, conversation(PROMPT, "Be kind."), used) == expected
    assert expected[0] == tokenizer.bos_token_id and expected.count(tokenizer.bos_token_id) == 1


class _SpyAdapter(NoAdapter):
    """Records what generate hands to forward_context, and whether generate ran inside it."""

    def __init__(self):
        self.batches, self.inside = [], False

    def forward_context(self, model, batch):
        self.batches.append({k: v.clone() for k, v in batch.items()})

        @contextlib.contextmanager
        def context():
            self.inside = True
            try:
                yield
            finally:
                self.inside = False

        return context()


def test_generate_runs_inside_the_adapter_context_with_real_prompt_lengths(lora_export):
    from orpo_cli.models.tuned import load_merged

    tuned = load_merged(lora_export)
    spy = _SpyAdapter()
    seen = []
    hook = tuned.model.register_forward_pre_hook(lambda *_: seen.append(spy.inside))
    try:
        prompts = [render_prompt(tuned.tokenizer, conversation(p, None), chat_template_in_use(tuned.tokenizer, None))
                   for p in (PROMPT, "Hi", "Name three animals that live in the sea, please.")]
        answers = generate_batch(tuned.model, spy, tuned.tokenizer, prompts, device=tuned.device,
                                 max_new_tokens=3, batch_size=3)
        stream_answer(tuned.model, spy, tuned.tokenizer, prompts[0], device=tuned.device, max_new_tokens=3,
                      temperature=0.0, streamer=None)
    finally:
        hook.remove()
    assert len(answers) == 3 and seen and all(seen)
    batched, single = spy.batches
    assert batched["prompt_lengths"].tolist() == [len(p) for p in prompts]
    assert batched["attention_mask"][:, 0].tolist() == [int(len(p) == max(map(len, prompts))) for p in prompts]
    assert single["prompt_lengths"].tolist() == [len(prompts[0])]
    # Left padding does not change a greedy answer: batched == alone.
    alone = generate_batch(tuned.model, NoAdapter(), tuned.tokenizer, [prompts[2]], device=tuned.device,
                           max_new_tokens=3)
    if not torch.cuda.is_available():  # GPU kernels may round a batch of 3 and a batch of 1 differently
        assert answers[2] == alone[0]
    assert torch.is_tensor(batched["input_ids"])
