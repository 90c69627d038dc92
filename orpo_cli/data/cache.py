"""The tokenized-data cache: its key, and safetensors files of flat ids and offsets."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from orpo_cli.data.pairs import DataStats, PreparedData, TokenizedPair
from orpo_cli.recipe import BUILTIN_PREFIX, DataSettings, DataSource, OrpoSettings
from orpo_cli.storage import cache_root, file_sha256

log = logging.getLogger(__name__)

_CACHE_VERSION = "orpo-data-4"  # bump when the output of this module changes for the same inputs


# ------------------------------------------------------------------------------------------ cache
def _cache_dir(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return cache_root() / "data"


def _cache_key(data: DataSettings, orpo: OrpoSettings, tokenizer: Any) -> str:
    parts = {
        "version": _CACHE_VERSION,
        "data": data.model_dump(mode="json"),
        "columns_set": sorted(data.columns.model_fields_set),  # conversational: an explicit prompt column
        "train": _source_fingerprint(data.train),
        "eval": _source_fingerprint(data.eval) if data.eval is not None else None,
        "max_length": orpo.max_length,
        "max_prompt_length": orpo.max_prompt_length,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _source_fingerprint(source: DataSource) -> dict[str, Any]:
    fingerprint: dict[str, Any] = source.model_dump(mode="json")
    if source.path.startswith(BUILTIN_PREFIX):
        from orpo_cli.data.builtin_sets import DEMO_VERSION, FACTS_VERSION, SHORT_ANSWERS_VERSION

        fingerprint["builtin"] = [DEMO_VERSION, SHORT_ANSWERS_VERSION, FACTS_VERSION]
        return fingerprint
    local = Path(source.path).expanduser()
    if local.is_file():
        fingerprint["sha256"] = file_sha256(local)
    return fingerprint  # a hub id (or directory) is keyed by its name, subset and split


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    template = getattr(tokenizer, "chat_template", None)
    extra = [type(tokenizer).__name__, template, tokenizer.bos_token, tokenizer.eos_token,
             getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


_SPLITS = ("train", "eval")
_FIELDS = ("prompt", "chosen", "rejected")


def _save_cache(path: Path, prepared: PreparedData) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    answers = {split: [p.answer for p in getattr(prepared, split)] for split in _SPLITS}
    for split in _SPLITS:
        pairs: list[TokenizedPair] = getattr(prepared, split)
        for name in _FIELDS:
            seqs = [getattr(p, f"{name}_ids") for p in pairs]
            offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
            np.cumsum([len(s) for s in seqs], out=offsets[1:])
            flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
            tensors[f"{split}.{name}.ids"] = flat
            tensors[f"{split}.{name}.offsets"] = offsets
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            metadata = {"stats": prepared.stats.to_json(), "version": _CACHE_VERSION, "answers": json.dumps(answers)}
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:  # a read-only or full cache disk costs time on the next run, never the run
        log.warning("data: could not write the tokenized cache %s: %s", path, err)


def _load_cache(path: Path) -> PreparedData | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("version") != _CACHE_VERSION:
                return None
            splits = {}
            answers = json.loads(metadata["answers"])
            for split in _SPLITS:
                columns = []
                for name in _FIELDS:
                    flat = handle.get_tensor(f"{split}.{name}.ids").tolist()
                    offsets = handle.get_tensor(f"{split}.{name}.offsets").tolist()
                    columns.append([flat[a:b] for a, b in itertools.pairwise(offsets)])
                splits[split] = [
                    TokenizedPair(*triple, answer=answer)
                    for triple, answer in zip(zip(*columns, strict=True), answers[split], strict=True)
                ]
            stats = DataStats.from_json(metadata["stats"])
    except Exception as err:  # a damaged cache file is rebuilt, not fatal
        log.warning("data: ignoring unreadable cache %s: %s", path, err)
        return None
    stats.from_cache = True
    return PreparedData(train=splits["train"], eval=splits["eval"], stats=stats)
