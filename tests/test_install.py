"""The environment the tests run in is the one uv.lock describes: a fresh machine gets what CI tested."""

from __future__ import annotations

import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _locked_versions() -> dict[str, set[str]]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions: dict[str, set[str]] = {}
    for package in lock["package"]:
        if "version" in package:
            versions.setdefault(_canonical(package["name"]), set()).add(package["version"])
    return versions


def _direct_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [*project["project"]["dependencies"], *project["dependency-groups"]["dev"]]
    return [_canonical(re.split(r"[<>=!~;\[ ]", n, maxsplit=1)[0]) for n in names]


def test_every_installed_locked_package_has_the_locked_version():
    if not (ROOT / "uv.lock").is_file():
        pytest.fail("uv.lock is missing: `make lock` writes it")
    locked = _locked_versions()
    wrong = []
    for dist in metadata.distributions():
        name = _canonical(dist.metadata["Name"])
        if name in locked and name != "orpo-tune" and dist.version not in locked[name]:
            wrong.append(f"{name} {dist.version} (lock: {', '.join(sorted(locked[name]))})")
    assert not wrong, "installed versions differ from uv.lock; run `make install`: " + "; ".join(wrong)


def test_every_direct_dependency_is_locked_and_installed():
    locked = _locked_versions()
    missing = [n for n in _direct_requirements() if n not in locked]
    assert not missing, f"in pyproject.toml but not in uv.lock (run `make lock`): {missing}"
    for name in _direct_requirements():
        assert metadata.version(name) in locked[name], name
