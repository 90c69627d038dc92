"""What the planner takes: a model's shape (the few numbers of its config.json), the setup of a step (what the
recipe decides, as plain values) and the shape of the micro batch that setup collates to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from orpo_cli.errors import UserError
from orpo_cli.layouts import Layout
from orpo_cli.plan.adapter_terms import AdapterTerms, LoraTerms


# ------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Linear:
    name: str
    fan_in: int
    fan_out: int
    bias: bool = False

    @property
    def weight_numel(self) -> int:
        return self.fan_in * self.fan_out


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only config that memory and FLOPs depend on."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    max_positions: int | None = None
    stored_dtype: str = "bf16"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a transformers config.json (as a dict). Llama, Mistral, Qwen2 and Phi-3 shaped models."""
        model_type = str(config.get("model_type", ""))
        if model_type not in _KNOWN_TYPES:
            raise UserError(
                f"plan: model_type {model_type!r} is not one the planner knows ({', '.join(sorted(_KNOWN_TYPES))})"
            )
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            shape = cls(
                model_type=model_type,
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
                o_bias=model_type != "qwen2" and bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                sliding_window=_window(config),
                max_positions=context_limit(config),
                stored_dtype=_dtype_name(config.get("torch_dtype") or config.get("dtype") or "float32"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"plan: the model config lacks or garbles {err}; is it a causal LM's config.json?") from None
        return shape

    def layer_linears(self) -> list[Linear]:
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        if self.model_type == "phi3":  # fused projections
            return [
                Linear("qkv_proj", h, q + 2 * kv, self.qkv_bias),
                Linear("o_proj", q, h, self.o_bias),
                Linear("gate_up_proj", h, 2 * i, self.mlp_bias),
                Linear("down_proj", i, h, self.mlp_bias),
            ]
        return [
            Linear("q_proj", h, q, self.qkv_bias),
            Linear("k_proj", h, kv, self.qkv_bias),
            Linear("v_proj", h, kv, self.qkv_bias),
            Linear("o_proj", q, h, self.o_bias),
            Linear("gate_proj", h, i, self.mlp_bias),
            Linear("up_proj", h, i, self.mlp_bias),
            Linear("down_proj", i, h, self.mlp_bias),
        ]

    def counts(self) -> dict[str, int]:
        """Parameters by kind: linear weights of the decoder, their biases, norms, embeddings, head."""
        linears = self.layer_linears()
        return {
            "linear": self.layers * sum(lin.weight_numel for lin in linears),
            "bias": self.layers * sum(lin.fan_out for lin in linears if lin.bias),
            "norm": (2 * self.layers + 1) * self.hidden,
            "embed": self.vocab * self.hidden,
            "head": 0 if self.tied_embeddings else self.vocab * self.hidden,
        }

    @property
    def num_parameters(self) -> int:
        return sum(self.counts().values())


_KNOWN_TYPES = {"llama", "mistral", "qwen2", "phi3"}


# The names model configs give their context length under (Llama/Qwen/Mistral, GPT-2, Falcon/MPT, ChatGLM, ...)
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length", "n_ctx")


def context_limit(config: Mapping[str, Any] | Any) -> int | None:
    """The longest sequence a model's positions cover, from its config (a config.json dict or a transformers
    config object); None when the config does not say. The one reading of it: train, plan, eval and generate."""
    for key in _CONTEXT_KEYS:
        value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _window(config: Mapping[str, Any]) -> int | None:
    window = config.get("sliding_window")
    if window is None or config.get("use_sliding_window", True) is False:
        return None
    return int(window)


def _dtype_name(value: Any) -> str:
    text = str(value).removeprefix("torch.")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(text, text)


# ------------------------------------------------------------------------------------------ the setup
@dataclass(frozen=True)
class PairLengths:
    prompt: int
    chosen: int
    rejected: int

    @property
    def tokens(self) -> int:
        return self.prompt + self.chosen + self.rejected


@dataclass(frozen=True)
class StepSetup:
    """What decides a step's memory, as plain values (the command layer fills it from a recipe)."""

    pairs: tuple[PairLengths, ...]  # one micro batch, per rank
    quantization: Literal["none", "4bit", "8bit"] = "none"
    double_quant: bool = True
    weight_bytes: int = 2  # element size of the base weights as loaded (model.dtype)
    autocast_bytes: int | None = 2  # element size autocast computes in; None: no autocast
    quant_compute_bytes: int | None = None  # bitsandbytes' compute dtype; None: autocast's (or the weights')
    # the adapter method's terms (plan/adapter_terms.py: LoraTerms, ReftTerms, FullTerms; terms_for picks one from a
    # recipe's adapter settings): all the planner asks of the method
    adapter: AdapterTerms = LoraTerms()
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    # The CPU speed paths (orpo_cli/kernels: verified on a CPU only) are installed: a CPU run with
    # train.speed_paths auto. LoRA's in-place update (`lora_in_place`) needs them.
    cpu_paths: bool = True
    # Norm outputs and the MLP's act(gate) and act(gate) * up recomputed in the backward instead of kept
    # (kernels/recompute.py, one of the CPU paths): unless checkpointing is on or the strategy shards the weights.
    # The default is a plain single-process CPU run's; a setup that cannot recompute must say False (checked below).
    recompute: bool = True
    layout: Layout = "packed"
    gradient_accumulation: int = 1
    eval_pairs: int = 0  # pairs per eval forward (0: no eval)
    world_size: int = 1
    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    fsdp_sharding: str = "full_shard"
    zero_stage: int = 2
    offload_optimizer: bool = False
    cuda: bool = True  # CUDA's rules where they differ from the CPU's (GQA in block attention, constants)
    pack_width: int = 4096  # prefix.PACK_WIDTH

    def __post_init__(self) -> None:
        if self.recompute and (self.gradient_checkpointing or self.shards_weights or not self.cpu_paths):
            why = (
                "gradient checkpointing" if self.gradient_checkpointing
                else f"{self.strategy}'s sharded weights" if self.shards_weights else "no CPU speed paths"
            )
            raise ValueError(f"StepSetup: recompute=True under {why}, where training does not recompute: pass recompute=False")

    @property
    def shards_weights(self) -> bool:
        """No rank holds the whole model (FSDP, ZeRO-3): training's Strategy.shards_weights."""
        return self.strategy == "fsdp" or (self.strategy == "deepspeed" and self.zero_stage == 3)

    @property
    def trains_base(self) -> bool:
        """The adapter's capability: the base's own weights train (full fine-tuning)."""
        return self.adapter.trains_base

    @property
    def lora_in_place(self) -> bool:
        """LoRA's update is added into the base output in place (adapters/lora_inplace.py, installed by setup.py
        where the weights are whole): plain LoRA on plain linears of the adapter's fp32, no dropout, no autocast;
        every other case runs PEFT's forward."""
        plain = self.adapter.in_place(quantized=self.quantization != "none")
        return plain and self.cpu_paths and not self.shards_weights and self.autocast_bytes is None and self.weight_bytes == 4

    @property
    def prepared(self) -> bool:
        """PEFT's prepare_model_for_kbit_training ran: everything not quantized is fp32 (LoRA on a k-bit base,
        not under FSDP)."""
        return self.quantization != "none" and self.adapter.prepares_kbit and self.strategy != "fsdp"



# --------------------------------------------------------------------------------------- the batch shape
@dataclass(frozen=True)
class BatchShape:
    rows: int
    width: int
    pieces: tuple[PairLengths, ...]  # the pairs

    @property
    def columns(self) -> int:
        return self.rows * self.width


def batch_shape(pairs: Sequence[PairLengths], layout: Layout, pack_width: int = 4096) -> BatchShape:
    """Rows and width of a collated micro batch (batching.collate_pairs, prefix.collate_prefix)."""
    if not pairs:
        raise ValueError("a micro batch needs at least one pair")
    if layout == "padded":
        width = max(max(p.prompt + p.chosen, p.prompt + p.rejected) for p in pairs)
        return BatchShape(2 * len(pairs), width, tuple(pairs))
    if layout == "prefix":
        return BatchShape(len(pairs), max(p.tokens for p in pairs), tuple(pairs))
    rows, used, width = 0, 0, 0
    for p in pairs:  # prefix.pack_rows: next fit, order kept
        if used and used + p.tokens > pack_width:
            rows, used = rows + 1, 0
        used += p.tokens
        width = max(width, used)
    return BatchShape(rows + 1, width, tuple(pairs))


def loss_targets(pairs: Sequence[PairLengths]) -> int:
    """Hidden rows the loss projects: every chosen and rejected response token (nll_on_prompt off)."""
    return sum(p.chosen + p.rejected for p in pairs)


def worst_case_pairs(micro_batch: int, max_length: int, max_prompt_length: int) -> tuple[PairLengths, ...]:
    """The longest pairs a recipe allows per memory: responses of max_length - 1 after a 1-token prompt, both
    sides (a long prompt, counted once in the packed and prefix layouts, needs less)."""
    return (PairLengths(1, max_length - 1, max_length - 1),) * micro_batch


def pairs_of(micro_batch: int, prompt: int, response: int) -> tuple[PairLengths, ...]:
    return (PairLengths(prompt, response, response),) * micro_batch
