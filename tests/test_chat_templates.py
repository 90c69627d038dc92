"""Real chat templates through the data pipeline: Phi-3, Llama-3.2, Qwen2.5, Mistral-7B v0.3 and Gemma-2.

The instruct tokenizers in ../shared/tokenizers (see ../shared/data/README.md) carry their models' own
chat templates. For each, plain pairs and conversations go through `prepare_data`, and the token ids are
checked against the template's own rendering of the whole conversation (`apply_chat_template`, tokenized):

* the prompt is the template's rendering of the prompt messages with the generation prompt;
* BOS at most once, first, and only where the family uses one (Qwen2.5 has none);
* each response ends in the template's turn end and EOS, each exactly once (once overall where the turn end
  is the EOS);
* prompt + chosen equal the template's rendering of prompt + chosen, except that the whitespace a template
  writes after an EOS that closes the turn is dropped, an EOS follows a turn end that is not the EOS
  (Phi-3, Gemma-2), and BOS goes first where the tokenizer adds it but the template does not (Phi-3).

Where a template cannot render a row (Gemma-2 has no system role; Mistral's and Gemma's templates raise on
roles that do not alternate) the row is dropped, counted under the template's reason, and a data set left
with nothing is one clear line. Mistral's template writes the system message into the last message only
when that is the user's, so once the reply follows it vanishes; the pipeline keeps the prompt as inference
renders it (system before the last user turn, as mistral-common does) and the reply as the template
writes it. Inference (`generate`) renders the same prompt ids as training for every template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from orpo_cli.data.pairs import DROP_TEMPLATE
from orpo_cli.data.prepare import prepare_data
from orpo_cli.errors import UserError
from orpo_cli.recipe import DataSettings, OrpoSettings

SHARED = Path(__file__).parents[2] / "shared"
TOKENIZERS = SHARED / "tokenizers"
HH = SHARED / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
BIG = OrpoSettings(max_length=100_000, max_prompt_length=50_000)  # no truncation


@dataclass(frozen=True)
class Family:
    folder: str
    turn_end: str  # the token that closes an assistant turn in the template
    bos: str | None  # the BOS the family starts every sequence with (None: it uses none)
    system_role: bool  # the template renders a system message
    alternation_enforced: bool  # the template raises on roles that do not alternate user/assistant


FAMILIES = [
    Family("phi3", "<|end|>", "<s>", system_role=True, alternation_enforced=False),
    Family("llama-3.2-instruct", "<|eot_id|>", "<|begin_of_text|>", system_role=True, alternation_enforced=False),
    Family("qwen2.5-instruct", "<|im_end|>", None, system_role=True, alternation_enforced=False),
    Family("mistral-7b-instruct-v0.3", "</s>", "<s>", system_role=True, alternation_enforced=True),
    Family("gemma-2-it", "<end_of_turn>", "<bos>", system_role=False, alternation_enforced=True),
]

PAIRS = [
    {"prompt": "What colour is the sky?", "chosen": "The sky is blue.", "rejected": "Go away."},
    {"prompt": "Write a haiku.\nAbout rain.", "chosen": " Rain falls on the roof,\n soft.  ", "rejected": "No."},
    {"prompt": "日本の首都は？", "chosen": "東京です。", "rejected": "知らない。"},
]


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


MULTI_TURN = [_user("Hi, what colour is grass?"), _assistant("Grass is green."), _user("And the sea?")]
CONVERSATIONS = [  # conversational format: the prompt is the shared leading run of messages
    {"chosen": [*MULTI_TURN, _assistant("The sea is blue.")], "rejected": [*MULTI_TURN, _assistant("Stop asking.")]},
    {"chosen": [_user("Name a fruit."), _assistant("A banana.")], "rejected": [_user("Name a fruit."), _assistant("No.")]},
]

_loaded: dict[str, object] = {}


def _tokenizer(family: Family):
    folder = TOKENIZERS / family.folder
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip(f"the {family.folder} tokenizer is not at {folder} (../shared beside the checkout is absent)")
    if family.folder not in _loaded:
        from transformers import AutoTokenizer

        _loaded[family.folder] = AutoTokenizer.from_pretrained(folder)
    return _loaded[family.folder]


@pytest.fixture(params=FAMILIES, ids=[f.folder for f in FAMILIES])
def family(request) -> Family:
    return request.param


def _family(folder: str) -> Family:
    return next(f for f in FAMILIES if f.folder == folder)


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _prep(tok, tmp_path: Path, rows: list[dict], **settings):
    tmp_path.mkdir(parents=True, exist_ok=True)
    settings = {"train": _write(tmp_path / "rows.jsonl", rows), "eval_ratio": 0, **settings}
    return prepare_data(DataSettings.model_validate(settings), BIG, tok, cache_dir=tmp_path / "cache")


def _template_ids(tok, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    """The template's own rendering, tokenized as apply_chat_template tokenizes it."""
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False, add_generation_prompt=generation_prompt))


def _with_family_bos(tok, family: Family, ids: list[int]) -> list[int]:
    """BOS in front where the family uses one and the template did not write it (Phi-3's template)."""
    bos = tok.convert_tokens_to_ids(family.bos) if family.bos else None
    return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids


def _finished(tok, ids: list[int]) -> list[int]:
    """A rendered conversation as training ends it: whitespace after a closing EOS dropped, else an EOS added."""
    eos = tok.eos_token_id
    end = len(ids)
    while end > 0 and ids[end - 1] != eos and not tok.decode(ids[end - 1 :]).strip():
        end -= 1
    if end > 0 and ids[end - 1] == eos:
        return ids[:end]
    return [*ids, eos]


def _expected_conversation(tok, family: Family, messages: list[dict]) -> list[int]:
    return _finished(tok, _with_family_bos(tok, family, _template_ids(tok, messages, generation_prompt=False)))


def _check_special_tokens(tok, family: Family, pair) -> None:
    bos, eos = (tok.convert_tokens_to_ids(family.bos) if family.bos else None), tok.eos_token_id
    end = tok.convert_tokens_to_ids(family.turn_end)
    everything = pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
    if bos is None:
        assert tok.bos_token_id is None or tok.bos_token_id not in everything
    else:
        assert pair.prompt_ids[0] == bos and everything.count(bos) == 1
    for response in (pair.chosen_ids, pair.rejected_ids):
        assert response[-1] == eos and response.count(eos) == 1
        assert response.count(end) == 1
        between = response[response.index(end) + 1 : -1]  # Phi-3, Gemma-2: the newline after the turn end
        assert not tok.decode(between).strip(), tok.convert_ids_to_tokens(response[-4:])


# ------------------------------------------------------------------------------------------ pairs
@pytest.mark.parametrize("shape", ["pairs", "conversational"])
def test_pairs_render_as_the_models_own_template(family, tmp_path, shape):
    tok = _tokenizer(family)
    if shape == "pairs":
        out = _prep(tok, tmp_path, PAIRS)
        conversations = [([_user(r["prompt"])], _assistant(r["chosen"]), _assistant(r["rejected"])) for r in PAIRS]
    else:
        out = _prep(tok, tmp_path, CONVERSATIONS, format="conversational")
        conversations = [(r["chosen"][:-1], r["chosen"][-1], r["rejected"][-1]) for r in CONVERSATIONS]
    assert len(out.train) == len(conversations) and out.stats.dropped == {}
    for pair, (prompt, chosen, rejected) in zip(out.train, conversations, strict=True):
        expected_prompt = _with_family_bos(tok, family, _template_ids(tok, prompt, generation_prompt=True))
        assert pair.prompt_ids == expected_prompt
        assert pair.prompt_ids + pair.chosen_ids == _expected_conversation(tok, family, [*prompt, chosen])
        assert pair.prompt_ids + pair.rejected_ids == _expected_conversation(tok, family, [*prompt, rejected])
        _check_special_tokens(tok, family, pair)


def test_plain_text_pairs_get_bos_and_eos_exactly_once(family, tmp_path):
    """chat_template: none with a real tokenizer: the text as written, the family's BOS first, EOS last."""
    tok = _tokenizer(family)
    out = _prep(tok, tmp_path, PAIRS, chat_template="none")
    bos, eos = (tok.convert_tokens_to_ids(family.bos) if family.bos else None), tok.eos_token_id
    for pair, row in zip(out.train, PAIRS, strict=True):
        assert pair.prompt_ids == _with_family_bos(tok, family, tok(row["prompt"], add_special_tokens=False)["input_ids"])
        joint = tok(row["prompt"] + row["chosen"], add_special_tokens=False)["input_ids"]
        assert pair.prompt_ids + pair.chosen_ids == [*_with_family_bos(tok, family, joint), eos]
        everything = pair.prompt_ids + pair.chosen_ids + pair.rejected_ids
        assert everything.count(bos) == 1 if bos is not None else tok.bos_token_id not in everything
        for response in (pair.chosen_ids, pair.rejected_ids):
            assert response[-1] == eos and response.count(eos) == 1


def test_a_system_prompt_is_rendered_by_the_template_or_refused(family, tmp_path):
    tok = _tokenizer(family)
    if not family.system_role:  # Gemma-2: every row is refused, and that is one line naming the reason
        with pytest.raises(UserError) as err:
            _prep(tok, tmp_path, PAIRS, system_prompt="Be brief.")
        message = str(err.value)
        assert "\n" not in message and message.startswith("data: no usable pairs left in")
        assert f"{DROP_TEMPLATE} (System role not supported) 3" in message and "data.system_prompt" in message
        return
    out = _prep(tok, tmp_path, PAIRS, system_prompt="Be brief.")
    assert len(out.train) == len(PAIRS) and out.stats.dropped == {}
    for pair, row in zip(out.train, PAIRS, strict=True):
        prompt = [{"role": "system", "content": "Be brief."}, _user(row["prompt"])]
        assert pair.prompt_ids == _with_family_bos(tok, family, _template_ids(tok, prompt, generation_prompt=True))
        assert "Be brief." in tok.decode(pair.prompt_ids)
        full = [*prompt, _assistant(row["chosen"])]
        if family.folder != "mistral-7b-instruct-v0.3":
            assert pair.prompt_ids + pair.chosen_ids == _expected_conversation(tok, family, full)
        else:
            # The template drops the system message once a reply follows it; training keeps the prompt that
            # inference renders and the reply as the template writes it after the same user turn.
            assert "Be brief." not in tok.apply_chat_template(full, tokenize=False)
            alone = _expected_conversation(tok, family, full[1:])
            bare_prompt = _template_ids(tok, full[1:-1], generation_prompt=True)
            assert alone[: len(bare_prompt)] == bare_prompt
            assert pair.chosen_ids == alone[len(bare_prompt) :]
        _check_special_tokens(tok, family, pair)
    if family.folder == "mistral-7b-instruct-v0.3":  # mistral-common's layout: system before the last user turn
        first = out.train[0]
        assert tok.decode(first.prompt_ids + first.chosen_ids) == (
            "<s>[INST] Be brief.\n\nWhat colour is the sky?[/INST] The sky is blue.</s>"
        )


def test_mistral_system_message_moves_to_the_last_user_turn_of_a_long_prompt(tmp_path):
    family = _family("mistral-7b-instruct-v0.3")
    tok = _tokenizer(family)
    system = {"role": "system", "content": "Answer in one word."}
    rows = [{"chosen": [system, *MULTI_TURN, _assistant("Blue.")], "rejected": [system, *MULTI_TURN, _assistant("No.")]}]
    pair = _prep(tok, tmp_path, rows, format="conversational").train[0]
    assert tok.decode(pair.prompt_ids + pair.chosen_ids) == (
        "<s>[INST] Hi, what colour is grass?[/INST] Grass is green.</s>"
        "[INST] Answer in one word.\n\nAnd the sea?[/INST] Blue.</s>"
    )
    assert pair.prompt_ids == _template_ids(tok, [system, *MULTI_TURN], generation_prompt=True)


# ------------------------------------------------------------------------------------------ refusals
def test_rows_the_template_refuses_are_dropped_by_its_reason(family, tmp_path):
    tok = _tokenizer(family)
    doubled = {"prompt": [_user("Hello."), _user("Are you there?")], "chosen": [_assistant("Yes.")],
               "rejected": [_assistant("Go away.")]}
    good = {"prompt": [_user("Name a colour.")], "chosen": [_assistant("Red.")], "rejected": [_assistant("No.")]}
    out = _prep(tok, tmp_path, [good, doubled, good | {"chosen": [_assistant("Green.")]}], format="conversational",
                columns={"prompt": "prompt"})
    if family.alternation_enforced:
        assert len(out.train) == 2
        (reason, count), = out.stats.dropped.items()
        assert count == 1 and reason.startswith(f"{DROP_TEMPLATE} (") and "alternate" in reason
        assert reason in out.stats.summary()
    else:
        assert len(out.train) == 3 and out.stats.dropped == {}
    if family.alternation_enforced:  # nothing left: one line with the template's reason and the way out
        with pytest.raises(UserError) as err:
            _prep(tok, tmp_path / "bad", [doubled], format="conversational", columns={"prompt": "prompt"})
        message = str(err.value)
        assert "\n" not in message and "alternate" in message and "data.chat_template" in message


@pytest.mark.parametrize("folder", ["mistral-7b-instruct-v0.3", "gemma-2-it"])
def test_real_hh_rlhf_rows_with_two_assistant_turns_in_a_row_are_dropped(folder, tmp_path):
    if not HH.is_file():
        pytest.skip(f"real data file {HH} is absent (../shared beside the checkout holds it for developers)")
    family = _family(folder)
    tok = _tokenizer(family)
    settings = {"train": str(HH), "format": "implicit", "eval_ratio": 0}
    out = prepare_data(DataSettings.model_validate(settings), BIG, tok, cache_dir=tmp_path / "cache")
    refused = {k: v for k, v in out.stats.dropped.items() if k.startswith(DROP_TEMPLATE)}
    assert sum(refused.values()) == 9 and all("alternate" in k for k in refused)
    assert out.stats.pairs["train"] == 2312 - 4 - 9  # 4 rows have an empty response
    for pair in out.train[:50]:
        _check_special_tokens(tok, family, pair)


# ------------------------------------------------------------------------------------------ inference
def test_generation_renders_the_prompt_training_rendered(family, tmp_path):
    """generate's prompt ids == orpo_cli.data's, with the tokenizer as a run saves it and generate loads it."""
    from transformers import AutoTokenizer

    from orpo_cli.generation import chat_template_in_use, conversation, render_prompt

    tok = _tokenizer(family)
    system = "Be brief." if family.system_role else None
    out = _prep(tok, tmp_path, PAIRS, system_prompt=system)
    conv = _prep(tok, tmp_path / "conv", CONVERSATIONS, format="conversational")
    tok.save_pretrained(tmp_path / "run-tokenizer")
    saved = AutoTokenizer.from_pretrained(tmp_path / "run-tokenizer")
    template = chat_template_in_use(saved, None)
    assert template == tok.chat_template
    for pair, row in zip(out.train, PAIRS, strict=True):
        assert render_prompt(saved, conversation(row["prompt"], system), template) == pair.prompt_ids
    for pair, row in zip(conv.train, CONVERSATIONS, strict=True):
        assert render_prompt(saved, conversation(row["chosen"][-2]["content"], None, row["chosen"][:-2]), template) == (
            pair.prompt_ids
        )
    if not family.system_role:
        with pytest.raises(UserError, match="^the chat template cannot render this conversation: System role"):
            render_prompt(saved, conversation("Hi", "Be brief."), template)
