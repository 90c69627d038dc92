"""Tests for the offline built-in tiny models (``orpo_cli.models.builtin``)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BatchEncoding

from orpo_cli.errors import UserError
from orpo_cli.models import builtin
from orpo_cli.models.builtin import is_builtin, list_builtins, materialize_builtin, resolve_model_path

MESSAGES = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "What colour is the sky?"},
]
RENDERED_PROMPT = (
    "<|bos|><|system|>\nBe kind.<|end|>\n<|user|>\nWhat colour is the sky?<|end|>\n<|assistant|>\n"
)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("orpo-tune-cache")


@pytest.fixture(scope="module")
def tiny_llama_dir(cache_root: Path) -> Path:
    return materialize_builtin("tiny-llama", cache_root)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_registry_and_prefix() -> None:
    assert list_builtins() == ["micro-llama", "smollm2-135m-instruct", "tiny-llama", "tiny-qwen2"]
    assert is_builtin("builtin:tiny-llama")
    assert not is_builtin("meta-llama/Llama-3.2-1B")
    assert not is_builtin("./builtin/tiny-llama")


def test_resolve_model_path(tiny_llama_dir: Path, cache_root: Path) -> None:
    assert resolve_model_path("builtin:tiny-llama", cache_root) == str(tiny_llama_dir)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B", cache_root) == "Qwen/Qwen2.5-0.5B"
    assert resolve_model_path("/models/local", cache_root) == "/models/local"


def test_unknown_name_is_a_user_error_with_suggestion(tmp_path: Path) -> None:
    with pytest.raises(UserError) as err:
        resolve_model_path("builtin:tiny-lama", tmp_path)
    assert str(err.value) == (
        "model.name_or_path: unknown built-in model 'tiny-lama'; "
        "known: micro-llama, smollm2-135m-instruct, tiny-llama, tiny-qwen2 (did you mean 'tiny-llama'?)"
    )
    with pytest.raises(UserError, match=r"unknown built-in model 'gpt5'; known: [^(]*$"):
        materialize_builtin("gpt5", tmp_path)
    assert not any(tmp_path.iterdir()), "an unknown name must not touch the cache"


def test_directory_is_standard_hf_format(tiny_llama_dir: Path, tokenizer) -> None:
    assert tiny_llama_dir.name.startswith("tiny-llama-")
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_llama_dir / name).is_file(), name
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 1024
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= len(tokenizer)
    generation = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert generation["eos_token_id"] == config["eos_token_id"] == end_id
    assert generation["pad_token_id"] == config["pad_token_id"] == tokenizer.pad_token_id
    assert generation["bos_token_id"] == config["bos_token_id"] == tokenizer.bos_token_id


def test_tokenizer_special_tokens(tokenizer) -> None:
    assert len(tokenizer) == 2048
    assert tokenizer.bos_token == "<|bos|>"
    assert tokenizer.eos_token == "<|end|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.padding_side == "right"
    assert tokenizer.model_max_length == 1024
    special = set(tokenizer.all_special_tokens)
    assert {"<|system|>", "<|user|>", "<|assistant|>"} <= special
    assert tokenizer("<|user|>", add_special_tokens=False).input_ids == [
        tokenizer.convert_tokens_to_ids("<|user|>")
    ]


def test_plain_call_adds_no_bos_or_eos(tokenizer) -> None:
    ids = tokenizer("Hello there!").input_ids
    assert ids == tokenizer("Hello there!", add_special_tokens=False).input_ids
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids


def test_chat_template_renders_roles_and_generation_prompt(tokenizer) -> None:
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == RENDERED_PROMPT
    simple = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert simple == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"
    full = tokenizer.apply_chat_template(
        [*MESSAGES, {"role": "assistant", "content": "Blue."}], tokenize=False
    )
    assert full == RENDERED_PROMPT + "Blue.<|end|>\n"
    with pytest.raises(Exception, match="unsupported chat role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)


def test_chat_template_tokenized_has_exactly_one_bos(tokenizer) -> None:
    rendered = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    # No post-processor BOS, so forgetting add_special_tokens=False does not double it either.
    assert tokenizer(rendered).input_ids == ids
    # transformers 5: tokenize=True returns a BatchEncoding by default, a plain list with return_dict=False.
    encoded = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    assert isinstance(encoded, BatchEncoding)
    assert encoded["input_ids"] == ids
    as_list = tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert as_list == ids


@pytest.mark.parametrize(
    "text",
    [
        "Sure! Here is a short poem.",
        "Grüße aus Köln, ça va? Ñandú — “quotes” … ½ ∑ π",
        "emoji 🙂🚀👩‍👩‍👧 flags 🇫🇷 and CJK 中文字符 日本語 한국어",
        "  leading and trailing spaces  \n\ttabs\r\nwindows newlines\x00\x7f",
        "<not a special token> <|bos> |end|>",
        "",
    ],
    ids=["ascii", "latin", "emoji-cjk", "whitespace-control", "near-special", "empty"],
)
def test_unicode_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert all(0 <= i < len(tokenizer) for i in ids)
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    ("name", "architecture", "min_params", "max_params"),
    [
        ("micro-llama", "LlamaForCausalLM", 50_000, 200_000),
        ("tiny-llama", "LlamaForCausalLM", 500_000, 3_000_000),
        ("tiny-qwen2", "Qwen2ForCausalLM", 500_000, 3_000_000),
    ],
)
def test_forward_gives_finite_logits(
    cache_root: Path, tokenizer, name: str, architecture: str, min_params: int, max_params: int
) -> None:
    model = AutoModelForCausalLM.from_pretrained(materialize_builtin(name, cache_root))
    assert type(model).__name__ == architecture
    assert model.dtype == torch.float32
    assert min_params <= sum(p.numel() for p in model.parameters()) <= max_params
    batch = tokenizer(["Hello!", "What colour is the sky?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_build_is_deterministic_and_leaves_global_rng_alone(tiny_llama_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    other = materialize_builtin("tiny-llama", tmp_path)
    assert torch.equal(torch.rand(3), expected)
    assert other != tiny_llama_dir
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (tiny_llama_dir / name).read_bytes(), name


def test_cached_directory_is_reused_without_rebuilding(
    tiny_llama_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("rebuilt a cached built-in")

    monkeypatch.setattr(builtin, "_build_model", fail)
    monkeypatch.setattr(builtin, "build_tokenizer", fail)
    mtime = (tiny_llama_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = materialize_builtin("tiny-llama", cache_root)
    assert time.perf_counter() - start < 0.5
    assert again == tiny_llama_dir
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime


def test_cache_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORPO_TUNE_CACHE", str(tmp_path / "env-cache"))
    assert materialize_builtin("micro-llama").parent == tmp_path / "env-cache" / "builtin"
    monkeypatch.delenv("ORPO_TUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_model_path("builtin:micro-llama") == str(
        tmp_path / "home" / ".cache" / "orpo-tune" / "builtin" / builtin._REGISTRY["micro-llama"].cache_key
    )


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builds: list[Path] = []
    real_build = builtin._build_model

    def counting_build(spec: builtin.BuiltinSpec, tokenizer_dir: Path, out: Path) -> None:
        builds.append(out)
        time.sleep(0.2)  # widen the race window
        real_build(spec, tokenizer_dir, out)

    monkeypatch.setattr(builtin, "_build_model", counting_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(materialize_builtin("micro-llama", tmp_path)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(builds) == 1
    assert not list((tmp_path / "builtin").glob(".*.tmp-*"))


def test_failed_build_leaves_nothing_and_stale_leftovers_are_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("disk full")

    final = tmp_path / "builtin" / builtin._REGISTRY["micro-llama"].cache_key
    with monkeypatch.context() as patch:
        patch.setattr(builtin, "_build_model", crash)
        with pytest.raises(RuntimeError, match="disk full"):
            materialize_builtin("micro-llama", tmp_path)
    assert not final.exists()
    assert not list(final.parent.glob(".*.tmp-*"))

    stale_tmp = final.parent / f".{final.name}.tmp-crashed"
    stale_tmp.mkdir()
    final.mkdir()  # a directory without the completion marker, e.g. copied by hand
    (final / "junk.txt").write_text("half-written")
    assert materialize_builtin("micro-llama", tmp_path) == final
    assert not stale_tmp.exists() and not (final / "junk.txt").exists()
    assert (final / "model.safetensors").is_file()
