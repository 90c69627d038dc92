"""orpo_cli.data: every source kind and format, rendering, BOS/EOS, truncation, drops, errors, split, cache."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import pytest

from orpo_cli.data import sources, tokenizing
from orpo_cli.data.builtin_sets import demo_rows
from orpo_cli.data.pairs import DROP_EMPTY, DROP_FIT, DROP_NO_PROMPT, DROP_SAME, DROP_SAME_TRUNCATED
from orpo_cli.data.prepare import check_source, prepare_data
from orpo_cli.data.sources import load_rows
from orpo_cli.errors import UserError
from orpo_cli.recipe import DataSettings, DataSource, OrpoSettings

FIXTURES = Path(__file__).parent / "fixtures" / "data"
SHARED = Path(__file__).parents[2] / "shared"
SHARED_DATA = SHARED / "data"
PHI3_DIR = SHARED / "tokenizers" / "phi3"
BIG = OrpoSettings(max_length=100_000, max_prompt_length=50_000)  # no truncation


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def builtin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from orpo_cli.models.builtin import materialize_builtin

    return materialize_builtin("micro-llama", cache_dir=tmp_path_factory.mktemp("builtin"))


@pytest.fixture(scope="session")
def tok(builtin_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_dir)


@pytest.fixture(scope="session")
def phi3():
    if not PHI3_DIR.is_dir():
        pytest.skip(f"the Phi-3 tokenizer is not at {PHI3_DIR} (../shared beside the checkout is absent)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(PHI3_DIR)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data file {path} is absent (../shared beside the checkout holds it for developers)")
    return path


def prep(tokenizer, tmp_path: Path, orpo: OrpoSettings | None = None, **settings):
    settings.setdefault("eval_ratio", 0)
    return prepare_data(
        DataSettings.model_validate(settings), orpo or OrpoSettings(), tokenizer, cache_dir=tmp_path / "cache"
    )


def texts(tokenizer, pair) -> tuple[str, str, str]:
    return tuple(tokenizer.decode(ids) for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


U = "<|bos|><|user|>\n{}<|end|>\n<|assistant|>\n"  # the built-in chat template around one user turn


# ------------------------------------------------------------------------------------------ formats
def test_pairs_jsonl_with_template_splits_prompt_and_responses(tok, tmp_path):
    out = prep(tok, tmp_path, train=str(FIXTURES / "pairs.jsonl"))
    got = [texts(tok, p) for p in out.train]
    assert got == [
        (U.format("What colour is the sky?"), "The sky is blue.<|end|>", "Go away.<|end|>"),
        (U.format("What sound does a cat make?"), "A cat says meow.<|end|>", "Ask someone else.<|end|>"),
        (U.format("How many legs does a duck have?"), "A duck has two legs.<|end|>", "Figure it out yourself.<|end|>"),
        (U.format("What is bread?"), "Bread is baked from flour and water.<|end|>", "I don't care.<|end|>"),
    ]
    assert out.stats.rows == {"train": 8, "eval": 0}
    assert out.stats.pairs == {"train": 4, "eval": 0}
    assert out.stats.dropped == {DROP_EMPTY: 3, DROP_SAME: 1}
    assert "8 (train 8, eval 0) rows -> 4 (train 4, eval 0) pairs; dropped 4" in out.stats.summary()


def test_pairs_plain_text_and_system_prompt(tok, tmp_path):
    plain = prep(tok, tmp_path, train=str(FIXTURES / "pairs.jsonl"), chat_template="none", system_prompt="Be brief.")
    assert texts(tok, plain.train[0]) == (
        "<|bos|>Be brief.\n\nWhat colour is the sky?", "The sky is blue.<|end|>", "Go away.<|end|>"
    )
    templated = prep(tok, tmp_path, train=str(FIXTURES / "pairs.jsonl"), system_prompt="Be brief.")
    assert texts(tok, templated.train[0])[0] == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nWhat colour is the sky?<|end|>\n<|assistant|>\n"
    )


def test_prompt_template_and_system_column_from_csv(tok, tmp_path):
    out = prep(
        tok, tmp_path, train=str(FIXTURES / "questions.csv"), chat_template="none",
        prompt_template="Question: {question}\nContext: {ctx}",
        columns={"chosen": "good", "rejected": "bad", "system": "persona"}, system_prompt="Default persona.",
    )
    got = [texts(tok, p) for p in out.train]
    assert got[0] == (
        "<|bos|>You are a fruit expert.\n\nQuestion: What colour is a lemon?\nContext: Fruit facts",
        "A lemon is yellow.<|end|>", "No idea.<|end|>",
    )
    # An empty per-row system cell falls back to the recipe's system_prompt.
    assert got[1][0] == "<|bos|>Default persona.\n\nQuestion: How many sides does a square have?\nContext: Shapes"


def test_conversational_shared_prefix_becomes_the_prompt(tok, tmp_path):
    out = prep(tok, tmp_path, train=str(FIXTURES / "conversations.json"), format="conversational")
    first = texts(tok, out.train[0])
    assert first == (
        "<|bos|><|user|>\nHi, what colour is grass?<|end|>\n<|assistant|>\nGrass is green.<|end|>\n"
        "<|user|>\nAnd the sea?<|end|>\n<|assistant|>\n",
        "The sea is blue.<|end|>",
        "Stop asking me.<|end|>",
    )
    assert texts(tok, out.train[1])[1:] == ("A banana.<|end|>", "No.<|end|>")
    assert out.stats.dropped == {DROP_NO_PROMPT: 1}  # "Say hi." vs "Say hello.": nothing shared


def test_conversational_explicit_prompt_column(tok, tmp_path):
    out = prep(tok, tmp_path, train=str(FIXTURES / "conversations_prompt.jsonl"), format="conversational")
    assert texts(tok, out.train[0]) == (
        "<|bos|><|system|>\nBe kind.<|end|>\n<|user|>\nWhat does a baker do?<|end|>\n<|assistant|>\n",
        "A baker makes bread.<|end|>", "Who cares?<|end|>",
    )
    # Responses that repeat the prompt messages are cut back to the reply.
    assert texts(tok, out.train[1]) == (U.format("What does a pilot do?"), "A pilot flies planes.<|end|>", "Go away.<|end|>")


def test_implicit_templated_and_raw(tok, tmp_path):
    src = str(FIXTURES / "implicit.jsonl")
    templated = prep(tok, tmp_path, train=src, format="implicit")
    assert texts(tok, templated.train[0]) == (
        "<|bos|><|user|>\nWhat colour is the sun?<|end|>\n<|assistant|>\nIt is yellow.<|end|>\n"
        "<|user|>\nAre you sure?<|end|>\n<|assistant|>\n",
        "Yes, the sun looks yellow from here.<|end|>",
        "Yes, and stop asking.<|end|>",
    )
    # The replies share "A " but the prompt still ends at the turn boundary, not mid-reply.
    assert texts(tok, templated.train[1])[1:] == ("A horse.<|end|>", "A rock.<|end|>")
    assert templated.stats.dropped == {DROP_SAME: 1}
    raw = prep(tok, tmp_path, train=src, format="implicit", chat_template="none")
    assert texts(tok, raw.train[1]) == (
        "<|bos|>\n\nHuman: Name an animal.\n\nAssistant:", " A horse.<|end|>", " A rock.<|end|>"
    )


def test_sharegpt(tok, tmp_path):
    out = prep(tok, tmp_path, train=str(FIXTURES / "sharegpt.json"), format="sharegpt")
    assert [texts(tok, p) for p in out.train] == [
        ("<|bos|><|system|>\nYou answer briefly.<|end|>\n<|user|>\nWhat colour is snow?<|end|>\n<|assistant|>\n",
         "Snow is white.<|end|>", "Snow is purple.<|end|>"),
        ("<|bos|><|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\nName a city.<|end|>\n<|assistant|>\n",
         "Paris.<|end|>", "Whatever.<|end|>"),
    ]


@pytest.mark.parametrize(
    ("pairing", "cap", "expected"),
    [
        ("zip", 8, [("Nothing happens", "You grow watermelons in your stomach"),
                    ("The seeds pass through you", "You get sick"), ("You digest them", "You die")]),
        ("all", 4, [("Nothing happens", "You grow watermelons in your stomach"), ("Nothing happens", "You get sick"),
                    ("Nothing happens", "You die"), ("The seeds pass through you", "You grow watermelons in your stomach")]),
    ],
)
def test_one_to_many_pairing(tok, tmp_path, pairing, cap, expected):
    out = prep(
        tok, tmp_path, train=str(FIXTURES / "truthfulqa.csv"), format="one_to_many", chat_template="none",
        columns={"prompt": "Question", "chosen": "Correct Answers", "rejected": "Incorrect Answers"},
        pairing=pairing, max_pairs_per_row=cap,
    )
    got = [(tok.decode(p.chosen_ids), tok.decode(p.rejected_ids)) for p in out.train]
    assert got[: len(expected)] == [(c + "<|end|>", r + "<|end|>") for c, r in expected]
    assert all(tok.decode(p.prompt_ids) == "<|bos|>What happens if you eat watermelon seeds?" for p in out.train[: len(expected)])
    assert len(out.train) == len(expected) + (1 if pairing == "zip" else 2)


def test_parquet_gzip_and_json_lines_read_like_jsonl(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "pairs.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as handle:
        handle.write((FIXTURES / "pairs.jsonl").read_text())
    shutil.copy(FIXTURES / "pairs.jsonl", tmp_path / "lines.json")  # JSON lines under a .json name
    reference = prep(tok, tmp_path, train=str(FIXTURES / "pairs.jsonl")).train
    for name in ("pairs.parquet", "pairs.jsonl.gz", "lines.json"):
        assert prep(tok, tmp_path, train=str(tmp_path / name)).train == reference, name
    assert load_rows(DataSource(path=str(tmp_path / "pairs.parquet"), max_rows=3)) == rows[:3]
    bom = tmp_path / "bom.csv"  # spreadsheet exports start with a byte-order mark
    bom.write_text("\ufeffprompt,chosen,rejected\nWhat colour is the sky?,The sky is blue.,Go away.\n", encoding="utf-8")
    check_source(DataSettings(train=str(bom)))
    assert prep(tok, tmp_path, train=str(bom)).train == reference[:1]


# ------------------------------------------------------------------------------------------ BOS / EOS
def _count(ids: list[int], token: int) -> int:
    return sum(1 for i in ids if i == token)


@pytest.mark.parametrize("template", ["auto", "none"])
def test_builtin_bos_and_eos_exactly_once(tok, tmp_path, template):
    out = prep(tok, tmp_path, train=str(FIXTURES / "pairs.jsonl"), chat_template=template)
    for pair in out.train:
        assert pair.prompt_ids[0] == tok.bos_token_id and _count(pair.prompt_ids, tok.bos_token_id) == 1
        for response in (pair.chosen_ids, pair.rejected_ids):
            assert response[-1] == tok.eos_token_id and _count(response, tok.eos_token_id) == 1
            assert tok.bos_token_id not in response


def test_response_already_ending_with_eos_is_not_doubled(tok, tmp_path):
    src = write_jsonl(tmp_path / "eos.jsonl", [{"prompt": "Hi", "chosen": "Hello!<|end|>", "rejected": "Go.<|end|>\n"}])
    pair = prep(tok, tmp_path, train=str(src), chat_template="none").train[0]
    assert texts(tok, pair) == ("<|bos|>Hi", "Hello!<|end|>", "Go.<|end|>")


@pytest.mark.parametrize("template", ["auto", "none"])
def test_phi3_bos_once_and_turn_end_then_eos(phi3, tmp_path, template):
    out = prep(phi3, tmp_path, train=str(FIXTURES / "pairs.jsonl"), chat_template=template)
    bos, eos, end = phi3.bos_token_id, phi3.eos_token_id, phi3.convert_tokens_to_ids("<|end|>")
    assert (bos, eos) == (1, 32000)
    for pair in out.train:
        assert pair.prompt_ids[0] == bos and _count(pair.prompt_ids, bos) == 1
        for response in (pair.chosen_ids, pair.rejected_ids):
            assert response[-1] == eos and _count(response, eos) == 1
            # The template closes the turn with <|end|>\n; the EOS follows it once.
            tail = phi3.convert_ids_to_tokens(response[-3:])
            assert tail == (["<|end|>", "<0x0A>", "<|endoftext|>"] if template == "auto" else tail)
            assert _count(response, end) == (1 if template == "auto" else 0)
    first = out.train[0]
    if template == "auto":
        assert phi3.decode(first.prompt_ids) == "<s><|user|>\nWhat colour is the sky?<|end|>\n<|assistant|>"
        assert phi3.decode(first.chosen_ids) == "The sky is blue.<|end|>\n<|endoftext|>"
        # Tokenized as it follows the prompt (as at inference), not alone: no SentencePiece word-start mark.
        assert phi3.convert_ids_to_tokens(first.chosen_ids[:2]) == ["The", "▁sky"]


def test_template_emitting_bos_with_a_bos_adding_tokenizer_is_not_doubled(tmp_path):
    if not PHI3_DIR.is_dir():
        pytest.skip(f"the Phi-3 tokenizer is not at {PHI3_DIR}")
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(PHI3_DIR)  # prepare_data sets the recipe's template on it
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    out = prep(fresh, tmp_path, train=str(FIXTURES / "pairs.jsonl"), chat_template=template)
    assert fresh.chat_template == template
    assert all(p.prompt_ids[:2] == [1, 32010] and _count(p.prompt_ids, 1) == 1 for p in out.train)


def test_merge_across_the_prompt_boundary_keeps_the_prompt_tokens(tok, tmp_path):
    # "...the ca" + "t? ..." tokenizes jointly as "Ġcat": the prompt must keep its own ids, so the reply
    # is then tokenized alone.
    src = write_jsonl(tmp_path / "merge.jsonl", [{"prompt": "What is the ca", "chosen": "t? A pet.", "rejected": "r? A car."}])
    pair = prep(tok, tmp_path, train=str(src), chat_template="none").train[0]
    alone = tok(["What is the ca", "t? A pet."], add_special_tokens=False)["input_ids"]
    assert pair.prompt_ids == [tok.bos_token_id, *alone[0]]
    assert pair.chosen_ids == [*alone[1], tok.eos_token_id]
    assert texts(tok, pair) == ("<|bos|>What is the ca", "t? A pet.<|end|>", "r? A car.<|end|>")


# ------------------------------------------------------------------------------------------ truncation
def test_truncation_bounds_random(tok, tmp_path):
    rng = random.Random(0)
    words = ["red", "blue", "cat", "dog", "sun", "rain", "bread", "seven", "happy", "slowly"]
    rows = [
        {"prompt": " ".join(rng.choices(words, k=rng.randrange(1, 40))),
         "chosen": "yes " + " ".join(rng.choices(words, k=rng.randrange(1, 40))),
         "rejected": "no " + " ".join(rng.choices(words, k=rng.randrange(1, 40)))}
        for _ in range(40)
    ]
    src = str(write_jsonl(tmp_path / "random.jsonl", rows))
    full = prep(tok, tmp_path, BIG, train=src, chat_template="none").train
    assert len(full) == 40
    for trial in range(12):
        max_length = rng.randrange(3, 60)
        orpo = OrpoSettings(max_length=max_length, max_prompt_length=rng.randrange(2, max_length))
        out = prep(tok, tmp_path / str(trial), orpo, train=src, chat_template="none")
        assert len(out.train) == 40 and out.stats.dropped == {}  # responses differ at their first word
        assert out.stats.truncated > 0
        for original, pair in zip(full, out.train, strict=True):
            p, mpl = pair.prompt_ids, orpo.max_prompt_length
            assert len(p) <= mpl and p[0] == tok.bos_token_id  # BOS survives a left cut
            assert p[1:] == original.prompt_ids[len(original.prompt_ids) - len(p) + 1 :]  # the right end is kept
            for got, orig in ((pair.chosen_ids, original.chosen_ids), (pair.rejected_ids, original.rejected_ids)):
                assert 1 <= len(got) and len(p) + len(got) <= max_length
                assert got == orig[: len(got)]  # cut from the right only
                assert len(got) == min(len(orig), max_length - len(p))


def test_cannot_fit_and_same_after_truncation_are_dropped(tok, tmp_path):
    rows = [
        {"prompt": "Hi", "chosen": "The sky is blue today.", "rejected": "The sky is blue, go away."},
        {"prompt": "Hi", "chosen": "Yes", "rejected": "No"},
        {"prompt": "A much longer prompt that will not fit", "chosen": "Yes", "rejected": "No"},
    ]
    src = str(write_jsonl(tmp_path / "fit.jsonl", rows))
    # The recipe forbids max_prompt_length >= max_length; model_construct skips that check to reach the drop.
    tight = OrpoSettings.model_construct(max_length=4, max_prompt_length=4, lam=0.1, nll_on_prompt=False)
    out = prep(tok, tmp_path, tight, train=src, chat_template="none")
    assert out.stats.dropped == {DROP_SAME_TRUNCATED: 1, DROP_FIT: 1}
    assert [texts(tok, p) for p in out.train] == [("<|bos|>Hi", "Yes<|end|>", "No<|end|>")]


# ------------------------------------------------------------------------------------------ errors
def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_errors(tok, tmp_path):
    settings = DataSettings(train="data/nope.jsonl")
    assert _error(check_source, settings) == "data.train.path: no such file: data/nope.jsonl"
    assert _error(prepare_data, settings, OrpoSettings(), tok, tmp_path) == "data.train.path: no such file: data/nope.jsonl"
    eval_missing = DataSettings(train=str(FIXTURES / "pairs.jsonl"), eval="./held_out")
    assert _error(check_source, eval_missing) == "data.eval.path: no such file: ./held_out"


def test_missing_column_lists_the_columns(tok, tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "good": "g", "bad": "b"}])
    settings = DataSettings(train=str(src), columns={"chosen": "best", "rejected": "bad"})
    expected = f"data.columns.chosen: column 'best' not in {src}; it has: prompt, good, bad"
    assert _error(check_source, settings) == expected
    assert _error(prepare_data, settings, OrpoSettings(), tok, tmp_path) == expected
    csv_settings = DataSettings(train=str(FIXTURES / "questions.csv"), prompt_template="Q: {question} {topic}",
                                columns={"chosen": "good", "rejected": "bad"})
    assert _error(check_source, csv_settings) == (
        f"data.prompt_template: placeholder {{topic}} names no column of {FIXTURES / 'questions.csv'}; "
        "it has: question, ctx, good, bad, persona"
    )
    conv = DataSettings(train=str(FIXTURES / "conversations.json"), format="conversational", columns={"prompt": "p"})
    assert "data.columns.prompt: column 'p' not in" in _error(check_source, conv)
    check_source(DataSettings(train=str(FIXTURES / "conversations.json"), format="conversational"))


def test_non_text_value_is_an_error_not_a_drop(tok, tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 16 + [{"prompt": "p", "chosen": 7, "rejected": "r"}]
    src = write_jsonl(tmp_path / "typed.jsonl", rows)
    message = _error(prepare_data, DataSettings(train=str(src)), OrpoSettings(), tok, tmp_path)
    assert message.startswith("data: row 17: column 'chosen' holds int, expected text")
    src = write_jsonl(tmp_path / "conv.jsonl", [{"chosen": {"role": "assistant"}, "rejected": []}])
    message = _error(prepare_data, DataSettings(train=str(src), format="conversational"), OrpoSettings(), tok, tmp_path)
    assert "row 1: column 'chosen' item 0 is not a {role, content} message" in message


def test_empty_dataset_and_empty_after_filtering(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    settings = DataSettings(train=str(tmp_path / "empty.jsonl"))
    assert _error(check_source, settings).endswith("empty.jsonl holds no rows")
    assert _error(prepare_data, settings, OrpoSettings(), tok, tmp_path).endswith("empty.jsonl holds no rows")
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "", "rejected": "r"},
            {"prompt": "p", "chosen": None, "rejected": "r"}]
    src = write_jsonl(tmp_path / "useless.jsonl", rows)
    message = _error(prepare_data, DataSettings(train=str(src), eval_ratio=0), OrpoSettings(), tok, tmp_path)
    assert message == f"data: no usable pairs left in {src} (train): 3 rows read; dropped: empty field 2, chosen == rejected 1"


def test_hub_dataset_offline_is_one_clear_line(tok, tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(datasets, "load_dataset_builder", offline)
    settings = DataSettings(train="Anthropic/hh-rlhf", format="implicit")
    for message in (_error(check_source, settings), _error(prepare_data, settings, OrpoSettings(), tok, tmp_path)):
        assert message.startswith("data.train.path: cannot load dataset 'Anthropic/hh-rlhf' (split train)")
        assert "Couldn't reach" in message and "point data.train.path at the local file" in message


def test_template_and_builtin_errors(tok, builtin_dir, tmp_path):
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(builtin_dir)
    counting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    message = _error(prep, fresh, tmp_path, train=str(FIXTURES / "pairs.jsonl"), chat_template=counting)
    assert message.startswith("data.chat_template: row 1: the prompt rendered with add_generation_prompt=True is not a prefix")
    broken = "{% for m in messages %}{{ m['content'] }"
    assert _error(prep, fresh, tmp_path, train=str(FIXTURES / "pairs.jsonl"), chat_template=broken).startswith(
        "data.chat_template: the template does not render"
    )
    assert _error(load_rows, DataSource(path="builtin:dmeo")) == "data.train.path: unknown built-in dataset 'dmeo'; known: demo, short-answers, facts"
    bad_role = write_jsonl(tmp_path / "tool.jsonl", [{"conversations": [{"from": "tool", "value": "x"}], "chosen": "a", "rejected": "b"}])
    assert "has a turn from 'tool'" in _error(prep, tok, tmp_path, train=str(bad_role), format="sharegpt")


# ------------------------------------------------------------------------------------------ split, cache
def test_split_is_deterministic_grouped_and_disjoint(tok, tmp_path):
    rows = [{"prompt": f"Question {i // 2}?", "chosen": f"Good {i}.", "rejected": f"Bad {i}."} for i in range(40)]
    src = str(write_jsonl(tmp_path / "dup.jsonl", rows))
    a = prep(tok, tmp_path / "a", train=src, eval_ratio=0.25, seed=1)
    b = prep(tok, tmp_path / "b", train=src, eval_ratio=0.25, seed=1)
    c = prep(tok, tmp_path / "c", train=src, eval_ratio=0.25, seed=2)
    assert (a.train, a.eval) == (b.train, b.eval)
    assert a.eval != c.eval
    assert a.stats.rows == {"train": 30, "eval": 10}
    train_prompts = {tuple(p.prompt_ids) for p in a.train}
    assert not train_prompts & {tuple(p.prompt_ids) for p in a.eval}  # rows sharing a prompt stay together
    tiny = write_jsonl(tmp_path / "two.jsonl", rows[1:3])
    assert prep(tok, tmp_path / "d", train=str(tiny), eval_ratio=0.01).stats.rows == {"train": 1, "eval": 1}
    explicit = prep(tok, tmp_path / "e", train=src, eval=str(FIXTURES / "pairs.jsonl"))
    assert explicit.stats.rows == {"train": 40, "eval": 8} and len(explicit.eval) == 4


def test_one_to_many_rows_are_split_before_expansion(tok, tmp_path):
    out = prep(
        tok, tmp_path, train=str(FIXTURES / "truthfulqa.csv"), format="one_to_many", eval_ratio=0.5,
        columns={"prompt": "Question", "chosen": "Correct Answers", "rejected": "Incorrect Answers"},
    )
    assert out.stats.rows == {"train": 1, "eval": 1}
    assert len({tuple(p.prompt_ids) for p in out.train}) == 1 == len({tuple(p.prompt_ids) for p in out.eval})


def test_cache_hit_skips_tokenizing(tok, tmp_path, monkeypatch):
    settings = DataSettings(train=str(FIXTURES / "pairs.jsonl"), eval_ratio=0.25)
    first = prepare_data(settings, OrpoSettings(), tok, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and not first.stats.from_cache
    assert not list(tmp_path.glob("*.tmp"))

    def boom(*args, **kwargs):
        raise AssertionError("the tokenizer ran on a cache hit")

    with monkeypatch.context() as patch:
        patch.setattr(type(tok), "__call__", boom)
        patch.setattr(tokenizing, "_encode", boom)
        second = prepare_data(settings, OrpoSettings(), tok, cache_dir=tmp_path)
    assert second.stats.from_cache and "loaded from cache" in second.stats.summary()
    assert (second.train, second.eval) == (first.train, first.eval)
    assert second.stats.dropped == first.stats.dropped and second.stats.rows == first.stats.rows
    # Another max_length or another source file is another entry.
    prepare_data(settings, OrpoSettings(max_length=64, max_prompt_length=32), tok, cache_dir=tmp_path)
    changed = tmp_path / "pairs.jsonl"
    changed.write_text((FIXTURES / "pairs.jsonl").read_text().replace("blue", "azure"))
    prepare_data(DataSettings(train=str(changed), eval_ratio=0.25), OrpoSettings(), tok, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


# ------------------------------------------------------------------------------------------ real data
def test_real_hh_rlhf_implicit(tok, tmp_path):
    path = shared_file("hh-rlhf-harmless-base-test.jsonl.gz")
    rows = load_rows(DataSource(path=str(path), max_rows=60))
    raw = prep(tok, tmp_path, BIG, train=str(path), format="implicit", chat_template="none", eval_ratio=0)
    assert raw.stats.rows["train"] == 2312 and raw.stats.dropped == {DROP_EMPTY: 4}
    for row, pair in zip(rows, raw.train, strict=False):  # none of the first 60 rows is dropped
        cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        assert row["chosen"][:cut] == row["rejected"][:cut]
        assert texts(tok, pair) == (
            "<|bos|>" + row["chosen"][:cut], row["chosen"][cut:] + "<|end|>", row["rejected"][cut:] + "<|end|>"
        )
    templated = prep(tok, tmp_path, BIG, train={"path": str(path), "max_rows": 60}, format="implicit")
    for row, pair in zip(rows, templated.train, strict=True):
        prompt, chosen, rejected = texts(tok, pair)
        cut = row["chosen"].rfind("\n\nAssistant:")
        assert prompt.endswith("<|end|>\n<|assistant|>\n")
        assert prompt.count("<|user|>") == row["chosen"][:cut].count("\n\nHuman:")
        assert chosen == row["chosen"][cut + len("\n\nAssistant:") :].strip() + "<|end|>"
        assert rejected == row["rejected"][cut + len("\n\nAssistant:") :].strip() + "<|end|>"


def test_real_hh_rlhf_with_phi3(phi3, tmp_path):
    path = shared_file("hh-rlhf-harmless-base-test.jsonl.gz")
    out = prep(phi3, tmp_path, train=str(path), format="implicit", eval_ratio=0.1)
    assert out.stats.rows == {"train": 2081, "eval": 231}
    assert sum(out.stats.pairs.values()) == 2308
    user, assistant = phi3.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    cut = 0
    for pair in out.train + out.eval:
        assert pair.prompt_ids[0] == 1 and pair.prompt_ids[-1] == assistant
        assert len(pair.prompt_ids) <= 512 and len(pair.prompt_ids) + len(pair.chosen_ids) <= 1024
        cut += len(pair.prompt_ids) == 512
        assert pair.prompt_ids[1] == user or len(pair.prompt_ids) == 512  # a left cut keeps BOS, drops turns
    assert 0 < cut <= out.stats.truncated


def test_real_sharegpt(tok, tmp_path):
    path = shared_file("sharegpt-dpo-en-demo.json")
    rows = json.loads(path.read_text())
    out = prep(tok, tmp_path, BIG, train=str(path), format="sharegpt")
    assert out.stats.pairs == {"train": 300, "eval": 0}
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for row, pair in list(zip(rows, out.train, strict=True))[:120]:
        messages = [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]
        prompt, chosen, rejected = texts(tok, pair)
        assert prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert (chosen, rejected) == (row["chosen"]["value"] + "<|end|>", row["rejected"]["value"] + "<|end|>")
    assert any(row["conversations"][0]["from"] == "system" for row in rows[:120])


def test_real_stack_exchange_paired(tok, tmp_path):
    path = shared_file("stack-exchange-paired-tiny.json")
    rows = json.loads(path.read_text())
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    check_source(DataSettings(train=str(path), columns=columns))
    out = prep(tok, tmp_path, BIG, train=str(path), columns=columns)
    assert len(out.train) == 25
    for row, pair in zip(rows, out.train, strict=True):
        assert texts(tok, pair) == (U.format(row["question"]), row["response_j"] + "<|end|>", row["response_k"] + "<|end|>")


# ------------------------------------------------------------------------------------------ demo
def test_demo_rows():
    rows = demo_rows()
    assert rows == demo_rows() and rows != demo_rows(seed=1)
    assert len(rows) == 1200 and len(demo_rows(n=10)) == 10
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in rows)
    assert all(r["chosen"] != r["rejected"] for r in rows)
    chosen_words = [len(r["chosen"].split()) for r in rows]
    rejected_words = [len(r["rejected"].split()) for r in rows]
    assert min(chosen_words + rejected_words) >= 8 and max(chosen_words + rejected_words) <= 30
    assert abs(sum(chosen_words) - sum(rejected_words)) / len(rows) < 2  # length must not decide
    assert len({r["prompt"] for r in rows}) > 300 and len({r["chosen"] for r in rows}) > 1000


def test_builtin_demo_source(tok, tmp_path):
    check_source(DataSettings(train="builtin:demo"))
    out = prep(tok, tmp_path, train="builtin:demo", eval_ratio=0.1)
    assert out.stats.rows["train"] + out.stats.rows["eval"] == 1200
    assert 100 <= out.stats.rows["eval"] <= 140 and out.stats.dropped == {}
    assert max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in out.train) <= 90


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p", "chosen": "c", "rejected": "r"}, "pairs"),
        ({"chosen": [{"role": "user", "content": "p"}], "rejected": [{"role": "user", "content": "q"}]},
         "conversational"),
        ({"chosen": "\n\nHuman: p\n\nAssistant: c", "rejected": "\n\nHuman: p\n\nAssistant: r"}, "implicit"),
        ({"conversations": [{"from": "human", "value": "p"}], "chosen": "c", "rejected": "r"}, "sharegpt"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, None),
        ({"prompt": "p", "chosen": [], "rejected": []}, None),
    ],
)
def test_guess_format_names_the_shape_of_a_row(row, expected):
    from orpo_cli.data.formats import guess_format
    from orpo_cli.recipe import ColumnMap

    assert guess_format(row, ColumnMap()) == expected


def test_conversational_with_plain_strings_is_an_error_naming_the_row_and_the_format(tok, tmp_path):
    rows = [{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    message = _error(prepare_data, DataSettings(train=str(src), format="conversational"), OrpoSettings(), tok, tmp_path)
    assert message.startswith("data: row 1: column 'rejected' holds text, but data.format: conversational expects")
    src = write_jsonl(tmp_path / "strings.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3)
    message = _error(prepare_data, DataSettings(train=str(src), format="conversational"), OrpoSettings(), tok, tmp_path)
    assert "row 1: column 'chosen' holds text" in message and "look like data.format: pairs" in message


def test_csv_with_long_fields_reads_and_unreadable_csv_is_one_line(tmp_path, monkeypatch):
    from orpo_cli.data.sources import load_rows

    long = tmp_path / "long.csv"
    long.write_text("prompt,chosen,rejected\nq," + "word " * 40000 + ",b\n", encoding="utf-8")
    assert len(load_rows(DataSettings(train=str(long)).train)[0]["chosen"]) == 200000
    # what the csv module refuses (here: its default 128 KiB field cap, kept) is one line naming the file
    sources.csv.field_size_limit(131072)  # the default; load_rows raises it again on its next call
    monkeypatch.setattr(sources.csv, "field_size_limit", lambda *args: 131072)
    with pytest.raises(UserError, match=r"long.csv:\d+: invalid CSV: field larger than field limit"):
        load_rows(DataSettings(train=str(long)).train)


def test_builtin_short_answers_rows():
    from orpo_cli.data.builtin_sets import SHORT_ANSWERS_ROWS, short_answer_rows

    rows = short_answer_rows()
    assert rows == short_answer_rows() and rows != short_answer_rows(seed=1)  # a pure function of the seed
    assert len(rows) == SHORT_ANSWERS_ROWS == len(load_rows(DataSource(path="builtin:short-answers")))
    for row in rows:
        # chosen is the bare answer, rejected says the very same answer inside chat: only the style differs
        assert len(row["chosen"].split()) <= 2 and len(row["rejected"].split()) >= 10
        assert f" {row['chosen']}." in row["rejected"] or f" {row['chosen']} " in row["rejected"]
    assert len({r["prompt"] for r in rows}) > 150 and len({r["chosen"] for r in rows}) > 50


def test_builtin_facts_rows_prefer_the_right_answer_in_the_same_words():
    from orpo_cli.data.builtin_sets import FACTS_ROWS, fact_rows
    from orpo_cli.evaluate import score_answer

    rows = fact_rows()
    assert rows == fact_rows() and rows != fact_rows(seed=1)  # a pure function of the seed
    assert len(rows) == FACTS_ROWS == len(load_rows(DataSource(path="builtin:facts")))
    assert len({(r["prompt"], r["rejected"]) for r in rows}) == len(rows)  # no row twice
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "answer"}
        # the same sentence but for the answer: right-ness is the whole preference
        before = row["chosen"][: row["chosen"].rindex(row["answer"])]
        assert before and row["rejected"].startswith(before) and row["chosen"] != row["rejected"]
        assert score_answer(row["chosen"], row["answer"])[0] and not score_answer(row["rejected"], row["answer"])[0]
    assert len({r["prompt"] for r in rows}) > 150 and len({r["answer"] for r in rows}) > 50


def test_the_answer_column_reaches_the_pairs_and_the_cache(tok, tmp_path, monkeypatch):
    rows = [
        {"prompt": "What colour is the sky?", "chosen": "The sky is blue.", "rejected": "The sky is red.", "answer": "blue"},
        {"prompt": "What is two plus two?", "chosen": "It is 4.", "rejected": "It is 5.", "answer": 4},  # a number
        {"prompt": "What is a cat?", "chosen": "A cat is an animal.", "rejected": "A cat is a car.", "answer": " "},
    ]
    data = write_jsonl(tmp_path / "facts.jsonl", rows)
    first = prep(tok, tmp_path, train=str(data), columns={"answer": "answer"})
    assert [p.answer for p in first.train] == ["blue", "4", None]  # a blank answer is no known answer
    with monkeypatch.context() as patch:
        patch.setattr(tokenizing, "_encode", lambda *a, **k: pytest.fail("the tokenizer ran on a cache hit"))
        second = prep(tok, tmp_path, train=str(data), columns={"answer": "answer"})
    assert second.stats.from_cache and second.train == first.train
    # Without data.columns.answer the column is ignored; a cache entry of the other setting is not reused.
    assert [p.answer for p in prep(tok, tmp_path, train=str(data)).train] == [None, None, None]


def test_a_missing_or_non_text_answer_column_is_one_line(tok, tmp_path):
    rows = [{"prompt": "Q?", "chosen": "A.", "rejected": "B.", "answer": ["A"]}]
    data = write_jsonl(tmp_path / "facts.jsonl", rows)
    with pytest.raises(UserError, match=r"column 'answer' holds list, expected the answer as text or a number"):
        prep(tok, tmp_path, train=str(data), columns={"answer": "answer"})
    with pytest.raises(UserError, match=r"'solution'"):
        prep(tok, tmp_path, train=str(data), columns={"answer": "solution"})
