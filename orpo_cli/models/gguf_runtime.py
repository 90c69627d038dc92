"""A GGUF file run in llama.cpp (through llama-cpp-python): what `export --format gguf` checks an export in, and
what `generate` answers with when given a GGUF export.

llama-cpp-python is an optional dependency (the `gguf` extra; the dev group installs it): it has no wheel on
PyPI, so pip or uv build it from source once (docs/dependencies.md). Without it, everything GGUF is refused
with the install command.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from orpo_cli.errors import UserError

INSTALL = "uv pip install 'orpo-tune[gguf]' (builds llama-cpp-python from source once, a few minutes)"


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"GGUF needs llama.cpp's Python binding, which is not installed; install it with {INSTALL}"
                        ) from None
    return llama_cpp


def check_runtime() -> None:
    """UserError naming the install command when llama-cpp-python is missing."""
    _llama_cpp()


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """llama.cpp prints its load log on the C stderr even with verbose=False for some messages."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class GgufRuntime:
    """One GGUF model (and optionally a GGUF LoRA applied at load, as `llama-cli --lora`) in llama.cpp."""

    def __init__(self, model: Path, *, lora: Path | None = None, n_ctx: int = 2048, threads: int | None = None):
        llama_cpp = _llama_cpp()
        threads = threads or max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        with _quiet_stderr():
            self.llm = llama_cpp.Llama(
                model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_batch=n_ctx,
                n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False, seed=0,
            )

    def close(self) -> None:
        self.llm.close()

    def __enter__(self) -> GgufRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def eos(self) -> int:
        return int(self.llm.token_eos())

    def tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        """llama.cpp's own tokenization of `text`, special tokens parsed (as a chat prompt is)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def logits(self, ids: list[int]) -> np.ndarray:
        """The logits at every position of `ids` (len(ids) x vocabulary), as llama.cpp computes them."""
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, stops: set[int]) -> list[int]:
        """The argmax continuation of `ids` (the greedy answer), stopping after a token in `stops`."""
        self.llm.reset()
        self.llm.eval(ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            new.append(token)
            if token in stops or self.is_end(token):
                break
            self.llm.eval([token])
        return new

    def is_end(self, token: int) -> bool:
        """Whether llama.cpp ends generation at `token` (EOS, or another end-of-generation token the file names)."""
        return bool(_llama_cpp().llama_vocab_is_eog(self.llm._model.vocab, token))


# ------------------------------------------------------------------------------------------ an export
class GgufExport:
    """An `export --format gguf` directory loaded for `generate`: the runtime, the run's tokenizer (prompts
    are rendered by the renderer training used, then handed to llama.cpp as token ids) and the recipe."""

    def __init__(self, path: Path):
        import json

        from orpo_cli.models.tuned import EXPORT_RECIPE, GGUF_MANIFEST, load_saved_tokenizer, read_recipe

        try:
            manifest = json.loads((path / GGUF_MANIFEST).read_text(encoding="utf-8"))
            model = path / manifest["model"]
            adapter = path / manifest["adapter"] if manifest.get("adapter") else None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path / GGUF_MANIFEST}: not a readable orpo-tune GGUF manifest ({err})") from None
        for file in (model, adapter):
            if file is not None and not file.is_file():
                raise UserError(f"{path}: {file.name} is missing; export again")
        self.tokenizer = load_saved_tokenizer(path / "tokenizer")
        self.recipe = read_recipe(path / EXPORT_RECIPE) if (path / EXPORT_RECIPE).is_file() else None
        self.runtime = GgufRuntime(model, lora=adapter, n_ctx=4096)

    def stream(self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, seed: int,
               write: Any = None) -> str:
        """The answer to `prompt_ids`, printed as it comes (greedy at temperature 0)."""
        import sys

        write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        llm = self.runtime.llm
        llm.reset()
        sampling = {"temp": temperature, "top_k": 0 if temperature > 0 else 1, "top_p": 1.0, "min_p": 0.0,
                    "repeat_penalty": 1.0}
        if temperature > 0:
            llm.set_seed(seed)
        new: list[int] = []
        shown = ""
        for token in llm.generate(prompt_ids, reset=True, **sampling):
            if self.runtime.is_end(int(token)) or len(new) >= max_new_tokens:
                break
            new.append(int(token))
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # a multi-byte character is complete
                write(text[len(shown):])
                shown = text
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        write(text[len(shown):] + "\n")
        return text
