"""`export --format gguf`: the file, its two checks (transformers' GGUF reader, llama.cpp), what is refused, the
Ollama Modelfile and model card, the LoRA GGUF, and `generate` through llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from orpo_cli.errors import RunFailed, UserError

pytest.importorskip("llama_cpp", reason="llama-cpp-python (the GGUF runtime) is not installed")

CLI = [sys.executable, "-m", "orpo_cli"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f16"
    proc = _cli("export", str(tiny_lora_run.root), "--out", str(out), "--format", "gguf", "--quant", "f16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_tiny_f16_export_passes_both_checks_and_carries_what_a_runtime_needs(tiny_gguf, tiny_lora_run):
    import gguf

    from orpo_cli.data import prompts
    from orpo_cli.models.tuned import load_saved_tokenizer

    out, stdout = tiny_gguf
    manifest = json.loads((out / "orpo-gguf.json").read_text())
    assert manifest["quant"] == "f16" and manifest["adapter"] is None
    assert "verified: read back by transformers" in stdout and "verified in llama.cpp" in stdout
    reader = gguf.GGUFReader(out / manifest["model"])
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.", "tokenizer.ggml.b",
                                                                                 "tokenizer.ggml.e", "tokenizer.chat"))}
    tokenizer = load_saved_tokenizer(tiny_lora_run.tokenizer)
    assert fields["general.architecture"] == "llama"
    assert fields["general.name"] == "tiny-lora"
    assert fields["tokenizer.chat_template"] == prompts.template_of(tokenizer)
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert types <= {"F16"} and types
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{manifest['model']}" in modelfile
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile
    assert "{{ .Prompt }}" in modelfile and "<|assistant|>" in modelfile
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: gguf\ntags: [orpo, orpo-tune, gguf]\n---")
    assert "## Recipe" in card and "In llama.cpp: greedy answers agree" in card


def test_generate_answers_through_llama_cpp_as_transformers_does(tiny_gguf, tiny_lora_run):
    out, _ = tiny_gguf
    args = ["--prompt", "What colour is a banana?", "--max-new-tokens", "12"]
    through_gguf, through_hf = _cli("generate", str(out), *args), _cli("generate", str(tiny_lora_run.root), *args)
    assert through_gguf.returncode == 0, through_gguf.stderr[-2000:]
    assert through_gguf.stdout.strip() and through_gguf.stdout.strip() == through_hf.stdout.strip()


def _export(run, out, **kwargs):
    from orpo_cli.export_gguf import export_gguf_run

    return export_gguf_run(run, out, **kwargs)


def test_a_swapped_tensor_fails_the_read_back_and_leaves_nothing(tiny_lora_run, tmp_path):
    def swap(name, data):  # blk.0's q rows reversed: the kind of mistake a wrong permutation makes
        return data[::-1].copy() if name == "blk.0.attn_q.weight" else data

    out = tmp_path / "wrong"
    with pytest.raises(RunFailed, match="read back by transformers differs"):
        _export(tiny_lora_run, out, quant="f16", tensor_hook=swap)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_wrong_rope_fails_the_read_back(tiny_lora_run, tmp_path, monkeypatch):
    import gguf

    real = gguf.GGUFWriter.add_rope_freq_base
    monkeypatch.setattr(gguf.GGUFWriter, "add_rope_freq_base", lambda self, value: real(self, value * 4))
    with pytest.raises(RunFailed, match="conversion is wrong"):
        _export(tiny_lora_run, tmp_path / "wrong", quant="f16")
    assert not (tmp_path / "wrong").exists()


def test_llama_cpp_alone_catches_a_swapped_tensor(tiny_lora_run, tmp_path, monkeypatch):
    """With the read-back made blind, the runtime check still fails a wrong file: each check can fail."""
    from orpo_cli import export_gguf

    monkeypatch.setattr(export_gguf, "_transformers_readback", lambda path, probes: None)
    monkeypatch.setattr(export_gguf, "max_abs_diff", lambda a, b: 0.0)

    def swap(name, data):
        return data[::-1].copy() if name in ("blk.0.ffn_down.weight", "blk.1.attn_q.weight") else data

    with pytest.raises(RunFailed, match="in llama.cpp"):
        _export(tiny_lora_run, tmp_path / "wrong", quant="f16", tensor_hook=swap)
    assert not (tmp_path / "wrong").exists()


def test_lora_gguf_applied_by_llama_cpp_agrees_with_the_merged_one(tiny_lora_run, tmp_path):
    import gguf

    result = _export(tiny_lora_run, tmp_path / "lora", quant="f16", adapter_only=True)
    assert result.lora_runtime is not None and result.lora_runtime.answers_equal == result.lora_runtime.probes
    files = sorted(p.name for p in (tmp_path / "lora").glob("*.gguf"))
    assert files == [result.model_file, result.adapter_file]
    reader = gguf.GGUFReader(tmp_path / "lora" / result.adapter_file)
    assert reader.fields["adapter.type"].contents() == "lora"
    assert any(t.name.endswith(".lora_a") for t in reader.tensors)
    assert f"ADAPTER ./{result.adapter_file}" in (tmp_path / "lora" / "Modelfile").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quant", "q3_k"], "--quant: 'q3_k' is not one of"),
        (["--dtype", "bf16"], "--dtype is for --format hf"),
    ],
)
def test_gguf_user_errors_are_one_line(tiny_lora_run, tmp_path, args, message):
    proc = _cli("export", str(tiny_lora_run.root), "--out", str(tmp_path / "x"), "--format", "gguf", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()


def test_quant_without_gguf_is_refused(tiny_lora_run, tmp_path):
    proc = _cli("export", str(tiny_lora_run.root), "--out", str(tmp_path / "x"), "--quant", "q8_0")
    assert proc.returncode == 2 and "add --format gguf" in proc.stderr


def test_reft_is_refused_with_the_reason(tiny_reft_run, tmp_path):
    proc = _cli("export", str(tiny_reft_run.root), "--out", str(tmp_path / "x"), "--format", "gguf")
    assert proc.returncode == 2, proc.stderr
    assert "edits activations, not weights" in proc.stderr and "bundle" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_unsupported_architectures_are_refused_in_one_line():
    from transformers import AutoConfig

    from orpo_cli.gguf_conversion import architecture_of

    assert architecture_of(AutoConfig.for_model("qwen2")).arch_name == "qwen2"
    assert architecture_of(AutoConfig.for_model("llama")).permute_qk
    with pytest.raises(UserError, match="model type 'gpt2' is not supported.*convert_hf_to_gguf"):
        architecture_of(AutoConfig.for_model("gpt2"))
    scaled = AutoConfig.for_model("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                        "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192})
    with pytest.raises(UserError, match="RoPE scaling"):
        architecture_of(scaled)


def test_quantizing_in_memory_is_what_the_file_holds(tmp_path):
    """quantize_like_gguf (the checks' reference) equals what gguf-py reads back from a written tensor."""
    import gguf
    import numpy as np
    import torch

    from orpo_cli.gguf_conversion import quantize_like_gguf

    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for quant in ("q8_0", "q4_0", "bf16", "f16"):
        qtype = gguf.GGMLQuantizationType[quant.upper()]
        data = weight.numpy().astype(np.float16) if quant == "f16" else gguf.quants.quantize(weight.numpy(), qtype)
        writer = gguf.GGUFWriter(str(tmp_path / f"{quant}.gguf"), "llama")
        writer.add_tensor("t", data, raw_dtype=None if quant == "f16" else qtype)
        writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
        tensor = gguf.GGUFReader(tmp_path / f"{quant}.gguf").tensors[0]
        back = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(8, 64)
        expected = quantize_like_gguf(weight, quant).numpy()
        assert np.array_equal(back, expected), quant
        assert quant == "f16" or not np.array_equal(expected, weight.numpy())  # it does quantize
    odd = torch.randn(4, 40)  # rows that do not split into 32-blocks: F16, as the writer falls back
    assert torch.equal(quantize_like_gguf(odd, "q4_0"), odd.half().float())


@pytest.mark.real
@pytest.mark.slow
def test_real_model_f16_gguf_passes_both_checks_and_answers_paris_in_llama_cpp(smollm2_run, tmp_path):
    """The acceptance on the real SmolLM2-135M: the f16 file reads back exactly, llama.cpp's greedy answers are the
    model's, and the tuned model answers through llama.cpp."""
    result = _export(smollm2_run, tmp_path / "smol", quant="f16")
    assert result.readback_diff <= result.tolerance
    rt = result.runtime
    assert rt.answers_equal == rt.probes and rt.fp32_equal == rt.probes
    proc = _cli("generate", str(tmp_path / "smol"), "--prompt", "What is the capital of France?",
                "--max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
