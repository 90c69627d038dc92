"""Where orpo-tune keeps things on disk between runs, and how it fingerprints a file's bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_ENV = "ORPO_TUNE_CACHE"


def cache_root() -> Path:
    """The cache's root: ``$ORPO_TUNE_CACHE`` if set, else ``~/.cache/orpo-tune`` (built-in models, tokenized
    data, logs of failures before a run directory exists)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "orpo-tune"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
