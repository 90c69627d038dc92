"""`make gpu-check` (bench/gpu_check.py) and `make gpu-bundle` (bench/gpu_bundle.py), on a CPU.

The check's dry run runs every stage at tiny shapes here, so that the one command meant for a GPU cannot rot
between GPU runs; the bundle test builds the wheel folder from the local wheel cache (skipped, with the
reason, where a wheel is neither cached nor downloadable).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]


def _module(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


gpu_check = _module("gpu_check")
gpu_bundle = _module("gpu_bundle")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--cpu-dry-run" in lines[0]
    assert captured.out == "" and not (tmp_path / "out").exists()  # nothing written


def test_cpu_dry_run_runs_every_stage_at_tiny_shapes(tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_check.main(["--cpu-dry-run", "--out", str(out), "--workdir", str(work), "--budget-s", "0"]) == 0
    check_dry_run(json.loads((out / "gpu-check-cpu-dry-run.json").read_text()), capsys.readouterr().out)


def check_dry_run(data: dict, printed: str) -> None:
    """What a dry run's JSON and table must show (also run by hand on a dry run's output)."""
    assert data["dry_run"] is True and data["device"] == "cpu (dry run)"
    stages = {s["name"]: s for s in data["stages"]}
    assert list(stages) == ["environment", "plan", "recipes", "real-shape", "bench-smollm2", "attention-kernels",
                            "gpu-tests", "bench-llama3-8b-4bit", "speed-paths"]
    status = {name: s["status"] for name, s in stages.items()}
    assert status == {"environment": "pass", "plan": "skip", "recipes": "pass", "real-shape": "pass",
                      "bench-smollm2": "pass", "attention-kernels": "skip", "gpu-tests": "skip",
                      "bench-llama3-8b-4bit": "skip", "speed-paths": "pass"}, {n: s["summary"] for n, s in stages.items()}
    # what needs CUDA is skipped with its reason, in the table too
    for name in ("plan", "attention-kernels", "gpu-tests", "bench-llama3-8b-4bit"):
        assert "CUDA" in stages[name]["summary"], stages[name]["summary"]
        assert f"{name}" in printed and stages[name]["summary"][:40] in printed
    assert "tests/test_distributed.py" in stages["gpu-tests"]["summary"]
    env = stages["environment"]["figures"]
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] and env["unmet_requirements"] == []
    # the planner was asked about the very step that ran: every pair cut to 16 + 48 + 48 tokens
    plan = stages["plan"]["figures"]
    assert plan["pair_lengths"] == [[16, 48, 48]]
    for config in ("lora", "qlora-checkpointing", "full"):
        assert plan[config]["planned"]["allocated"] > 0 and plan[config]["planned"]["pairs"] == [16, 48, 48]
        assert plan[config]["measured"]["steps"] == 3
    assert plan["full"]["planned"]["allocated"] > plan["lora"]["planned"]["allocated"]  # every weight trains
    # every tiny recipe trained with finite losses; LoRA's was killed with SIGKILL and resumed, bitwise equal
    recipes = stages["recipes"]["figures"]
    assert set(recipes) == {"lora", "qlora", "reft", "full"}
    assert recipes["lora"]["resume"]["bitwise"] is True and recipes["lora"]["resume"]["max_abs_diff"] == 0.0
    assert all(0 <= r["eval_accuracy"][1] <= 1 for r in recipes.values())
    real = stages["real-shape"]["figures"]
    for mode in ("lora", "qlora"):
        assert real[mode]["eval"]["accuracy"] is not None and real[mode]["eval"]["base_accuracy"] is not None
        assert "config.json" in real[mode]["export"] and real[mode]["export_verified"].startswith("verified: ")
        assert isinstance(real[mode]["generated"], str)  # a random model's answer: whitespace, here
    bench = stages["bench-smollm2"]["figures"]
    ours = next(v for k, v in bench.items() if k.startswith("orpo-tune"))
    assert ours["tokens_per_s"] > 0 and ours["device"] == "cpu" and "--impl ours" in bench["command"]
    assert "not recorded" in stages["speed-paths"]["summary"] or "applied" in stages["speed-paths"]["summary"]


def test_a_failing_stage_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(gpu_check.GpuCheck, "environment", broken)
    args = ["--cpu-dry-run", "--out", str(tmp_path), "--workdir", str(tmp_path / "w"), "--stages",
            "environment,speed-paths"]
    assert gpu_check.main(args) == 1
    stages = json.loads((tmp_path / "gpu-check-cpu-dry-run.json").read_text())["stages"]
    assert [(s["name"], s["status"]) for s in stages] == [("environment", "fail"), ("speed-paths", "pass")]
    assert stages[0]["summary"] == "RuntimeError: boom" and "traceback" in stages[0]["figures"]
    assert gpu_check.main([*args[:-1], "speed-paths"]) == 0  # and a clean run exits 0


def test_stages_past_the_budget_are_skipped_and_unknown_stages_refused(tmp_path, capsys):
    args = ["--cpu-dry-run", "--out", str(tmp_path), "--workdir", str(tmp_path / "w")]
    assert gpu_check.main([*args, "--budget-s", "1e-9", "--stages", "environment"]) == 0
    (stage,) = json.loads((tmp_path / "gpu-check-cpu-dry-run.json").read_text())["stages"]
    assert stage["status"] == "skip" and "out of time" in stage["summary"]
    assert gpu_check.main([*args, "--stages", "environment,warp-drive"]) == 2
    assert "unknown warp-drive" in capsys.readouterr().err


def test_resume_comparison_and_requirement_checks_catch_differences():
    a = {"w": torch.tensor([1.0, 2.0])}
    assert gpu_check._compare(a, {"w": torch.tensor([1.0, 2.0])})["bitwise"] is True
    moved = gpu_check._compare(a, {"w": torch.tensor([1.0, 2.5])})
    assert moved["bitwise"] is False and moved["max_abs_diff"] == 0.5 and moved["relative_diff"] == 0.25
    with pytest.raises(gpu_check.Failed):
        gpu_check._compare(a, {"v": torch.tensor([1.0, 2.0])})
    assert gpu_check._unmet(["orpo-tune"]) == []  # the lock's versions meet orpo-tune's ranges
    # a package whose requirement the installed version refuses is named, with what is installed
    from importlib import metadata

    unmet = _unmet_with_fake_requirement(gpu_check)
    assert unmet == [f"fake-needs needs torch>=99 (installed: {metadata.version('torch')})"]


def _unmet_with_fake_requirement(module) -> list[str]:
    from importlib import metadata

    real = metadata.requires
    try:
        metadata.requires = lambda name: ["torch>=99", "numpy"] if name == "fake-needs" else real(name)
        return module._unmet(["fake-needs"])
    finally:
        metadata.requires = real


def test_junit_counts_passes_failures_and_skip_reasons(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
                   '<testcase name="c"><skipped message="NCCL DDP needs 2 CUDA GPUs"/></testcase></testsuite></testsuites>')
    figures = gpu_check._junit(xml)
    assert (figures["passed"], figures["failed"], figures["skipped"]) == (1, 1, 1)
    assert figures["failures"] == ["b"] and figures["skip_reasons"] == {"c": "NCCL DDP needs 2 CUDA GPUs"}


# ------------------------------------------------------------------------------------------------ the bundle
WHEEL_CACHE = Path.home() / ".cache" / "orpo-tune-gpu-wheels"


def test_gpu_bundle_holds_the_locks_versions_for_cp312_manylinux_within_60_mib(tmp_path):
    from orpo_cli.models.builtin import materialize_builtin

    out = tmp_path / "bundle"
    model = materialize_builtin("micro-llama")  # any model directory: only its config and tokenizer are taken
    try:
        manifest = gpu_bundle.build_bundle(out, wheel_cache=WHEEL_CACHE, model_dir=model)
    except gpu_bundle.BundleError as err:
        if "cannot download" in str(err):
            pytest.skip(f"wheels neither in {WHEEL_CACHE} nor downloadable: {err}")
        raise
    lock = gpu_bundle.lock_versions()
    wanted = {*gpu_bundle.MISSING, gpu_bundle.BITSANDBYTES}
    assert set(manifest["lock"]) == wanted and all(manifest["lock"][n] == lock[n] for n in wanted)
    wheels = sorted((out / "wheels").glob("*.whl"))
    found = dict(gpu_bundle.wheel_name_version(w.name) for w in wheels)
    assert {n: found[n] for n in wanted} == {n: lock[n] for n in wanted}  # each at exactly the lock's version
    assert set(found) == wanted | {"orpo-tune"}  # and nothing else
    core = next(w.name for w in wheels if w.name.startswith("pydantic_core"))
    assert "-cp312-cp312-" in core and "manylinux" in core and core.endswith("x86_64.whl")
    bnb = next(w.name for w in wheels if w.name.startswith("bitsandbytes"))
    assert "manylinux" in bnb and "x86_64" in bnb and manifest["bitsandbytes"] is True
    with zipfile.ZipFile(out / "wheels" / manifest["project"]["file"]) as project:
        assert "orpo_cli/cli.py" in project.namelist()
    assert manifest["project"]["source_sha256"] == gpu_bundle.source_digest()
    models = out / "models" / gpu_bundle.SMOLLM2
    assert (models / "config.json").is_file() and not list(models.glob("*.safetensors"))
    size = gpu_bundle.folder_bytes(out)
    assert manifest["bytes"] == size <= gpu_bundle.LIMIT_BYTES == 60 * 2**20
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_gpu_bundle_over_the_limit_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    cached = list(WHEEL_CACHE.glob("*.whl")) if WHEEL_CACHE.is_dir() else []
    lock = gpu_bundle.lock_versions()
    if not all(gpu_bundle._cached_wheel(WHEEL_CACHE, n, lock[n]) for n in gpu_bundle.MISSING) or not cached:
        pytest.skip(f"the bundle's wheels are not in {WHEEL_CACHE} (make gpu-bundle fills it)")
    monkeypatch.setattr(gpu_bundle, "LIMIT_BYTES", 2**20)
    monkeypatch.setattr(gpu_bundle, "build_project_wheel", lambda dest: _fake_wheel(dest))
    with pytest.raises(gpu_bundle.BundleError, match="over 1 MiB"):
        gpu_bundle.build_bundle(tmp_path / "bundle", wheel_cache=WHEEL_CACHE, model_dir=None, bitsandbytes=False)
    assert list(tmp_path.iterdir()) == []


def _fake_wheel(dest: Path) -> Path:
    path = dest / "orpo_tune-0.1.0-py3-none-any.whl"
    path.write_bytes(b"")
    return path
