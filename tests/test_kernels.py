"""orpo_cli/kernels: the speed paths in one room: what is applied where, the log line, the switch, the undo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import orpo_cli.kernels.rotary as rotary
from orpo_cli.adapters import build_adapter
from orpo_cli.cli import app
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.kernels import STEP_PATHS, apply_speed_paths
from orpo_cli.recipe import LoraSettings
from orpo_cli.training.batching import collate_pairs
from orpo_cli.training.forward import orpo_forward

ROOT = Path(__file__).parents[1]
CPU_PATHS = {"lora_inplace", "rope", "rms_norm", "recompute", "gated_mlp"}


def _lora_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, attn_implementation="sdpa")
    adapter = build_adapter(LoraSettings(r=4, target_modules="all-linear"))
    model = adapter.attach(LlamaForCausalLM(config), quantized=False, gradient_checkpointing=False)
    for name, p in model.named_parameters():  # a non-zero update, so that LoRA's path computes something
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model, adapter


def _first_loss(model, adapter, layout: str = "packed") -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    pairs = [TokenizedPair(*(torch.randint(1, 96, (n,), generator=g).tolist() for n in ns)) for ns in [(5, 7, 4), (3, 6, 8)]]
    terms = orpo_forward(model, adapter, collate_pairs(pairs, 0, layout=layout), lam=0.1, nll_on_prompt=False,
                         layout=layout)
    params = [p for p in model.parameters() if p.requires_grad]
    return terms.loss.detach(), list(torch.autograd.grad(terms.loss, params))


def _originals():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    return modeling_llama.apply_rotary_pos_emb, ALL_ATTENTION_FUNCTIONS["sdpa"], sdpa_attention_forward


def _assert_untouched(model) -> None:
    rope, sdpa, transformers_sdpa = _originals()
    assert not hasattr(rope, rotary._ORIGINAL) and sdpa is transformers_sdpa
    for module in model.modules():
        assert "forward" not in vars(module), type(module).__name__  # no instance-level forward left
        assert not module._forward_hooks and not module._forward_pre_hooks, type(module).__name__
        assert not [k for k in vars(module) if k.startswith("_orpo")], type(module).__name__


def test_paths_off_is_peft_s_plain_step_and_auto_applies_each_path_once():
    model, adapter = _lora_llama()
    plain_loss, plain_grads = _first_loss(model, adapter)
    with apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=adapter, setting="off") as off:
        assert off.applied == {} and set(off.skipped) == CPU_PATHS | {"block_attention"}
        assert off.line().startswith("speed paths: none; skipped: lora_inplace (train.speed_paths: off)")
        loss, grads = _first_loss(model, adapter)
    assert torch.equal(loss, plain_loss) and all(torch.equal(a, b) for a, b in zip(grads, plain_grads, strict=True))

    with apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=adapter) as auto:
        # 7 LoRA linears and one attention per layer, two norms per layer and the final one, one MLP per layer
        assert auto.applied == {"lora_inplace": 14, "rope": 2, "rms_norm": 5, "recompute": 13, "gated_mlp": 2,
                                "block_attention": 2}
        assert auto.skipped == {}
        assert auto.line() == ("speed paths: lora_inplace 14 layers, rope 2 layers, rms_norm 5 norms, recompute 13 "
                               "hooks, gated_mlp 2 MLPs, block_attention 2 layers")
        calls = []
        apply = rotary._Rotary.apply
        rotary._Rotary.apply = lambda *a: calls.append(1) or apply(*a)
        try:
            fast_loss, fast_grads = _first_loss(model, adapter)
        finally:
            rotary._Rotary.apply = apply
        assert len(calls) == 2  # the fused RoPE ran, once per layer
    # The paths round differently in the last bits only.
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-6, atol=0)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    _assert_untouched(model)
    again, _ = _first_loss(model, adapter)
    assert torch.equal(again, plain_loss)  # undone: PEFT's and transformers' own code, bit for bit


def test_a_cuda_device_gets_none_of_the_cpu_paths():
    model, adapter = _lora_llama()
    paths = apply_speed_paths(model, device="cuda", dtype=torch.bfloat16, adapter=adapter)
    try:
        assert set(paths.applied) == {"block_attention"}
        assert paths.skipped == {name: "verified on cpu, not cuda" for name in CPU_PATHS}
        for module in model.modules():  # not installed at all: no forward, no hook, no mark
            assert "forward" not in vars(module) and not module._forward_hooks and not module._forward_pre_hooks
        rope, _, _ = _originals()
        assert not hasattr(rope, rotary._ORIGINAL)
    finally:
        paths.undo()
    _assert_untouched(model)
    # Each path declares where it was verified: the CPU-specific ones on the CPU alone.
    declared = {path.name: path.devices for path in (*adapter.speed_paths, *STEP_PATHS)}
    assert {name for name, devices in declared.items() if devices == ("cpu",)} == CPU_PATHS


def test_float16_and_sharded_weights_say_why_they_get_none():
    model, adapter = _lora_llama()
    with apply_speed_paths(model, device="cpu", dtype=torch.float16, adapter=adapter) as fp16:
        assert fp16.skipped["rope"] == "verified in float32/bfloat16, not float16"
    with apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=adapter, shards_weights=True) as fsdp:
        assert fsdp.applied == {"block_attention": 2}
        assert fsdp.skipped["lora_inplace"] == "weights sharded by FSDP/ZeRO-3"
    with apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=adapter,
                           gradient_checkpointing=True) as checkpointed:
        assert set(checkpointed.skipped) == {"recompute", "gated_mlp"}
        assert checkpointed.skipped["recompute"] == "gradient checkpointing recomputes whole layers"
    _assert_untouched(model)


def test_an_unrecognised_model_is_told_which_paths_were_skipped_and_why(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.llama import modeling_llama

    adapter = build_adapter(LoraSettings(r=4, target_modules=["c_attn"]))
    gpt2 = adapter.attach(GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4)),
                          quantized=False, gradient_checkpointing=False)
    with apply_speed_paths(gpt2, device="cpu", dtype=torch.float32, adapter=adapter) as paths:
        assert paths.skipped == {
            "lora_inplace": "no PEFT LoRA layer over a plain nn.Linear",  # GPT-2's Conv1D
            "rope": "model type gpt2 is not one of llama/mistral/qwen2/qwen3",
            "rms_norm": "model type gpt2 is not one of llama/mistral/phi3/qwen2/qwen3",
            "gated_mlp": "model type gpt2 is not one of llama/mistral/qwen2/qwen3",
        }
        assert set(paths.applied) == {"recompute", "block_attention"}  # any model: they check themselves
        assert "; skipped: lora_inplace (no PEFT LoRA layer over a plain nn.Linear), rope (model type gpt2 is not" in (
            paths.line()
        )

    # A recognised type whose code is not what a path was verified against: the guard says so, and installs nothing.
    def forward(self, hidden_states):  # noqa: ANN001, ANN202 - Llama's norm, changed
        return self.weight * hidden_states

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
    model, adapter = _lora_llama()
    with apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=adapter) as paths:
        assert paths.skipped == {"rms_norm": "LlamaRMSNorm.forward is not the code it was verified against"}
        assert "rms_norm (LlamaRMSNorm.forward is not the code it was verified against)" in paths.line()


def test_two_models_in_one_process_do_not_see_each_other_s_paths():
    first, first_adapter = _lora_llama(seed=0)
    second, second_adapter = _lora_llama(seed=1)
    calls = []
    apply = rotary._Rotary.apply
    rotary._Rotary.apply = lambda *a: calls.append(1) or apply(*a)
    try:
        with apply_speed_paths(first, device="cpu", dtype=torch.float32, adapter=first_adapter):
            _first_loss(second, second_adapter)
            assert calls == []  # the second model's attention runs transformers' function
            _first_loss(first, first_adapter)
            assert len(calls) == 2
            with apply_speed_paths(second, device="cpu", dtype=torch.float32, adapter=second_adapter):
                pass  # the second model in and out again: the first keeps its dispatcher
            _first_loss(first, first_adapter)
            assert len(calls) == 4
    finally:
        rotary._Rotary.apply = apply
    _assert_untouched(first)
    _assert_untouched(second)


def test_train_with_speed_paths_off_starts_at_the_same_loss_and_leaves_transformers_as_it_was(tmp_path, orpo_cache):
    """`orpo-tune train recipes/tiny-lora.yaml --set train.speed_paths=off`: transformers' and PEFT's plain code,
    the same first loss; RUN/speed_paths.json says what ran; after each run the functions are the originals."""
    before = _originals()
    first = {}
    for setting in ("auto", "off"):
        out = tmp_path / setting
        args = ["train", f"{ROOT}/recipes/tiny-lora.yaml", "--output-dir", str(out), "--max-steps", "1",
                "--set", f"train.speed_paths={setting}", "--set", "train.log_every=1", "--set", "train.tensorboard=false"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        record = json.loads((out / "speed_paths.json").read_text())
        assert set(record) == {"applied", "skipped"}
        if setting == "auto":
            assert {"lora_inplace", "rope", "rms_norm", "recompute", "gated_mlp"} <= set(record["applied"])
            assert "speed paths: lora_inplace " in result.output
        else:
            assert record["applied"] == {} and set(record["skipped"]) == CPU_PATHS | {"block_attention"}
            assert "speed paths: none; skipped: lora_inplace (train.speed_paths: off)" in result.output
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first[setting] = next(row["loss"] for row in rows if "loss" in row)
        assert _originals() == before
    assert first["off"] == pytest.approx(first["auto"], rel=1e-6)
