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


# ------------------------------------------------------------------------------------------ --model, --shape
def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("orpo_bench", ROOT / "bench" / "orpo_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_bench(tmp_path: Path, *args: str) -> tuple[dict, dict, dict]:
    """(the model line, the results by implementation, the ratios) of one tiny benchmark run."""
    cmd = [
        sys.executable, str(ROOT / "bench" / "orpo_bench.py"), *args, "--batch", "2", "--max-length", "64",
        "--steps", "1", "--warmup", "1", "--threads", "1", "--nll-on-prompt", "true", "--workdir", str(tmp_path / "work"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    model = next(line["model"] for line in lines if "model" in line)
    by_impl = {line["impl"]: line for line in lines if "impl" in line}
    ratio = next(line for line in lines if "ratios" in line)
    return model, by_impl, ratio


def _saved_shape(work: Path) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(work / "model")
    return {"model_type": config.model_type, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "intermediate": config.intermediate_size, "vocab": config.vocab_size, "tie": config.tie_word_embeddings}


@pytest.mark.slow
def test_model_builtin_takes_its_shape_and_tokenizer(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from orpo_cli.models.builtin import resolve_model_path

    source = resolve_model_path("builtin:tiny-llama")
    model, by_impl, ratio = _run_bench(tmp_path, "--model", "builtin:tiny-llama", "--layers", "1")
    config = AutoConfig.from_pretrained(source)
    expected = {"model_type": "llama", "hidden": config.hidden_size, "layers": 1, "heads": config.num_attention_heads,
                "kv_heads": config.num_key_value_heads, "intermediate": config.intermediate_size,
                "vocab": config.vocab_size, "tie": config.tie_word_embeddings}
    assert expected["tie"] is True and expected["vocab"] == 2048 and config.num_hidden_layers == 4
    assert _saved_shape(tmp_path / "work") == expected  # the model both implementations trained
    assert {k: model[k] for k in expected} == expected and model["source"] == "builtin:tiny-llama"
    saved = AutoTokenizer.from_pretrained(tmp_path / "work" / "model")
    assert saved.get_vocab() == AutoTokenizer.from_pretrained(source).get_vocab()
    assert set(by_impl) == {"trl", "orpo-tune"} and ratio["first_loss_diff"] < 1e-4
    for result in by_impl.values():
        assert result["peak_above_start_mb"] == pytest.approx(result["peak_mem_mb"] - result["rss_at_start_mb"], abs=0.2)


@pytest.mark.slow
def test_model_local_directory_with_overrides_and_a_tied_qwen2(tmp_path):
    from transformers import Qwen2Config

    local = tmp_path / "qwen2-config"
    Qwen2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=32128, tie_word_embeddings=True).save_pretrained(local)
    model, by_impl, ratio = _run_bench(tmp_path, "--model", str(local), "--tokenizer", str(PHI3),
                                       "--hidden", "64", "--intermediate", "128")
    expected = {"model_type": "qwen2", "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
                "vocab": 32128, "tie": True}
    assert _saved_shape(tmp_path / "work") == expected
    assert {k: model[k] for k in expected} == expected and model["head_dim"] == 16
    assert set(by_impl) == {"trl", "orpo-tune"} and ratio["first_loss_diff"] < 1e-4


def test_named_shape_and_bad_model_sources(tmp_path):
    bench = _bench_module()
    config, tokenizer, shape = bench._model_config(bench._parse(["--shape", "smollm2-135m"]))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.tie_word_embeddings, config.head_dim) == (
        576, 30, 9, 3, 1536, 49152, True, 64
    )
    assert shape["source"] == "shape smollm2-135m" and len(tokenizer) <= 49152
    config, _, _ = bench._model_config(bench._parse(["--shape", "smollm2-135m", "--layers", "2", "--no-tie"]))
    assert (config.num_hidden_layers, config.tie_word_embeddings, config.hidden_size) == (2, False, 576)

    def refusal(*argv: str) -> str:
        with pytest.raises(SystemExit) as err:
            bench._model_config(bench._parse(list(argv)))
        return str(err.value)

    assert "not a builtin:NAME nor a local directory with a config.json" in refusal("--model", str(tmp_path / "none"))
    assert refusal("--model", "builtin:nope").startswith("bench: --model builtin:nope: ")
    (tmp_path / "no-tokenizer").mkdir()
    (tmp_path / "no-tokenizer" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "pass --tokenizer DIR" in refusal("--model", str(tmp_path / "no-tokenizer"))
    assert "smaller than the tokenizer's 32045 tokens" in refusal("--vocab", "1000")
    assert "hidden must divide by heads" in refusal("--hidden", "100", "--heads", "8")
    with pytest.raises(SystemExit):  # argparse: --model and --shape exclude each other
        bench._parse(["--model", "builtin:tiny-llama", "--shape", "smollm2-135m"])


# ------------------------------------------------------------------------------------------ the token floor
def test_token_floor_counts_trl_padding_and_the_prompt_twice():
    from types import SimpleNamespace

    from orpo_cli.data.pairs import TokenizedPair

    bench = _bench_module()
    pairs = [TokenizedPair([1] * p, [2] * c, [3] * r) for p, c, r in [(3, 4, 2), (5, 1, 6), (2, 2, 2), (4, 3, 1)]]
    args = SimpleNamespace(warmup=1, steps=1, batch=2, layout=None)
    # The timed step is the second pair of pairs: TRL runs 2 x 2 rows of max(2 + 2, 4 + 3) = 7 columns; orpo-tune
    # packs 6 + 8 = 14 tokens in one row.
    assert bench.token_floor(args, pairs) == {"trl_tokens_run": 28, "ours_tokens_run": 14, "token_floor": 2.0}
    args.warmup = 0  # the first step: 4 x max(7, 11) = 44 against 9 + 12 = 21
    assert bench.token_floor(args, pairs) == {"trl_tokens_run": 44, "ours_tokens_run": 21, "token_floor": 2.1}


def test_step_profile_prints_saved_bytes_by_part_and_what_setup_saves(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "bench" / "orpo_bench.py"), "--hidden", "32", "--layers", "2", "--heads", "2",
        "--kv-heads", "1", "--intermediate", "64", "--batch", "2", "--max-length", "64", "--steps", "1",
        "--warmup", "0", "--threads", "1", "--nll-on-prompt", "true", "--impl", "ours", "--workdir", str(tmp_path),
    ]
    assert subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False).returncode == 0
    totals = {}
    for plain in (False, True):
        profile = [sys.executable, str(ROOT / "bench" / "step_profile.py"), "--workdir", str(tmp_path), "--batch", "2",
                   "--max-length", "64", "--top", "3"] + (["--plain"] if plain else [])
        env = {**__import__("os").environ, "ORPO_TUNE_CACHE": str(tmp_path / "cache")}
        proc = subprocess.run(profile, capture_output=True, text=True, timeout=600, check=False, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        saved = next(line for line in lines if "saved_bytes_per_token" in line)
        timeline = next(line for line in lines if "forward_mb" in line)
        assert {"attention", "qkv_lora", "mlp_product"} <= set(saved["saved_bytes_per_token"]) and timeline["step_peak_mb"] >= 0
        assert next(line for line in lines if "step_cpu_s" in line)["step_cpu_s"] > 0
        totals[plain] = saved["total_per_token"]
    # Per layer and token the recomputation keeps two norm outputs and two MLP tensors fewer: (2 x 32 + 2 x 64) x 4 B.
    assert totals[True] - totals[False] >= 2 * (2 * 32 + 2 * 64) * 4 * 0.9
