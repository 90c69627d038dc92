"""The benchmark script runs end to end at a tiny shape, both implementations, and its figures hang together.

The figures themselves are for `make bench` (docs/performance.md); this only keeps the script from rotting:
each child runs, prints its JSON line, and orpo-tune's first loss equals TRL's on the same objective.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHI3 = ROOT.parent / "shared" / "tokenizers" / "phi3"

pytestmark = pytest.mark.skipif(
    not (PHI3 / "tokenizer_config.json").exists(), reason="the Phi-3 tokenizer in ../shared/tokenizers/phi3 is absent"
)


def test_bench_runs_both_implementations_and_agrees_on_the_first_loss(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "bench" / "orpo_bench.py"), "--hidden", "32", "--layers", "1", "--heads", "2",
        "--kv-heads", "1", "--intermediate", "64", "--batch", "2", "--max-length", "64", "--steps", "1",
        "--warmup", "1", "--threads", "1", "--nll-on-prompt", "true", "--workdir", str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_impl = {line["impl"]: line for line in lines if "impl" in line}
    assert set(by_impl) == {"trl", "orpo-tune"}
    for result in by_impl.values():
        assert result["steps"] == 1 and result["tokens_per_s"] > 0 and result["peak_mem_mb"] > 0
        assert result["tokens_per_step"] > 0 and result["device"] == "cpu" and result["mfu"] is None
    ratio = next(line for line in lines if "ratios" in line)
    assert ratio["same_objective"] is True
    assert ratio["first_loss_diff"] == pytest.approx(
        abs(by_impl["orpo-tune"]["first_loss"] - by_impl["trl"]["first_loss"])
    )
    assert ratio["first_loss_diff"] < 1e-4  # the same objective on the same token ids
