"""The planner: peak memory, tokens, FLOPs and time of one ORPO training step, from a model's config alone.

Nothing here loads weights or reads a recipe: :func:`plan_step` takes a :class:`ModelShape` (the few numbers of
a Llama/Mistral/Qwen2/Phi-3 config) and a :class:`StepSetup` (what the recipe decides: quantization, adapter,
optimizer, layout, lengths, micro batch, checkpointing, distribution) and adds up, in bytes:

* the weights as they sit on the device: 4-bit NF4 codes and their constants (bitsandbytes' layout, with or
  without double quantization), 8-bit weights, and what stays unquantized (fp32 after PEFT's
  `prepare_model_for_kbit_training`, the model's dtype otherwise);
* the trainable weights, their gradients and the optimizer's state (torch AdamW, bitsandbytes 8-bit AdamW with
  its 32-bit fallback for tensors under 4,096 elements, paged variants);
* what autograd keeps for the backward pass, tensor by tensor, for orpo-tune's own forward (forward.py): the
  residual stream at the norms, the LoRA inputs, the MLP intermediates, the attention inputs and outputs of
  the layout the batch runs in (block attention for packed and prefix rows, transformers' sdpa with a
  float mask for padded rows), the checkpointed layer inputs instead when gradient checkpointing is on;
* the loss head's transient (loss.py: one chunk of logits, and under autocast a low-precision copy of the head),
  the batch's dense 4-D mask, and an allowance for the backward pass's working set;
* per rank under DDP, FSDP and DeepSpeed ZeRO.

On a CPU (fp32, no autocast) the parameter, gradient and optimizer bytes are exact and the saved bytes are
checked against a real step (tests/test_plan.py). The CUDA-only terms are constants from documentation,
marked unverified in the output until a GPU measures them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from orpo_cli.errors import UserError

GIB = 2**30
MIB = 2**20

# ------------------------------------------------------------------------------------- CUDA constants
# UNVERIFIED: no GPU measured these. They are what the documentation and common reports give; the plan labels
# them as such. Replace them with measurements (torch.cuda.max_memory_allocated vs nvidia-smi) when a GPU is at hand.
CUDA_CONTEXT_BYTES = 512 * MIB
"""CUDA context, kernels of torch/cuBLAS/bitsandbytes loaded on first use: outside torch's allocator, counted by
nvidia-smi (commonly reported 300-800 MiB on recent drivers)."""
CUBLAS_WORKSPACE_BYTES = 32 * MIB
"""cuBLAS workspace per stream: CUBLAS_WORKSPACE_CONFIG's default :4096:8 is 8 x 4 MiB (32 MiB on Hopper)."""
ALLOCATOR_OVERHEAD = 0.05
"""Share added for the caching allocator's block rounding and fragmentation (reserved over allocated)."""
TIGHT_MARGIN = 0.9
"""A predicted peak above this share of the memory is `tight`: it may fit, or fail on a longer batch."""
REFUSE_MARGIN = 1.1
"""`train` refuses a recipe predicted to need more than this many times the free device memory."""

DEFAULT_MFU = 0.35
"""Model FLOPs utilisation assumed for the time estimate unless --mfu is given: a typical figure for a
well-fed single-GPU LoRA run; QLoRA's dequantization makes it lower, large full fine-tuning runs higher."""

# bitsandbytes' layouts (0.49/0.50): 4-bit blocks of 64 weights, double quantization blocks of 256 absmax values,
# 8-bit optimizer blocks of 256 elements, and the size under which 8-bit optimizers keep 32-bit state.
_NF4_BLOCK = 64
_NESTED_BLOCK = 256
_OPT8_BLOCK = 256
_OPT8_MIN_SIZE = 4096
CHUNK_ROWS = 256  # loss.CHUNK_ROWS, repeated so that planning imports no torch

Layout = Literal["packed", "prefix", "padded"]


# ---------------------------------------------------------------------------------------------- GPUs
@dataclass(frozen=True)
class Gpu:
    name: str
    memory_bytes: int
    bf16_flops: float  # dense (no sparsity) peak tensor-core throughput in bf16, FLOP/s
    source: str


def _gpu(name: str, gib: float, tflops: float, source: str) -> Gpu:
    return Gpu(name, int(gib * GIB), tflops * 1e12, source)


GPUS: dict[str, Gpu] = {
    g.name.lower(): g
    for g in (
        _gpu("H200", 141 * 1e9 / GIB, 989.4, "NVIDIA H200 datasheet: 141 GB HBM3e, BF16 1,979 TFLOPS with sparsity"),
        _gpu("H100-SXM", 80, 989.4, "NVIDIA H100 datasheet: 80 GB, BF16 1,979 TFLOPS with sparsity (SXM)"),
        _gpu("H100-PCIe", 80, 756.0, "NVIDIA H100 datasheet: 80 GB, BF16 1,513 TFLOPS with sparsity (PCIe)"),
        _gpu("A100-80GB", 80, 312.0, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense"),
        _gpu("A100-40GB", 40, 312.0, "NVIDIA A100 datasheet: BF16 312 TFLOPS dense"),
        _gpu("L40S", 48, 362.05, "NVIDIA L40S datasheet: 48 GB, BF16 733 TFLOPS with sparsity"),
        _gpu("RTX-A6000", 48, 154.8, "NVIDIA RTX A6000 datasheet: 48 GB, tensor 309.7 TFLOPS with sparsity"),
        _gpu("L4", 24, 121.0, "NVIDIA L4 datasheet: 24 GB, BF16 242 TFLOPS with sparsity"),
        _gpu("A10", 24, 125.0, "NVIDIA A10 datasheet: 24 GB, BF16 125 TFLOPS dense"),
        _gpu("RTX-4090", 24, 165.2, "NVIDIA Ada whitepaper: RTX 4090 BF16 (FP32 accumulate) 165.2 TFLOPS dense"),
        _gpu("RTX-3090", 24, 71.0, "NVIDIA GA102 whitepaper: RTX 3090 BF16 (FP32 accumulate) 71 TFLOPS dense"),
    )
}


def find_gpu(name: str) -> Gpu:
    """The GPU called `name` (case-insensitive); a UserError listing the known ones otherwise."""
    gpu = GPUS.get(name.strip().lower())
    if gpu is None:
        raise UserError(
            f"--gpu: unknown GPU {name!r}; use one of {', '.join(g.name for g in GPUS.values())}, "
            "or give the memory with --gpu-memory (e.g. 24GiB)"
        )
    return gpu


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of '24GiB', '24 GB', '80gib', '16000MiB' (GB = 10^9 bytes, GiB = 2^30)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text or "")
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UserError(
            f"--gpu-memory: cannot read {text!r}; give a positive size with a unit, e.g. 24GiB, 80GB or 16000MiB"
        )
    return int(float(match.group(1)) * _UNITS[unit])


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
                max_positions=config.get("max_position_embeddings"),
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
    adapter: Literal["lora", "reft", "none"] = "lora"
    lora_r: int = 16
    lora_targets: tuple[str, ...] | None = None  # None: all-linear
    lora_dropout: float = 0.0
    use_dora: bool = False
    reft_layers: int = 0
    reft_rank: int = 4
    reft_interventions_per_layer: int = 1
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
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

    @property
    def prepared(self) -> bool:
        """PEFT's prepare_model_for_kbit_training ran: everything not quantized is fp32 (LoRA on a k-bit base,
        not under FSDP)."""
        return self.quantization != "none" and self.adapter == "lora" and self.strategy != "fsdp"


# ------------------------------------------------------------------------------------------ the result
@dataclass
class StepPlan:
    """Bytes per rank of one training step and of the eval pass, by term; tokens and FLOPs per optimizer step."""

    weights: dict[str, int]
    trainable_params: int
    trainable: int  # bytes of trainable weights beside the base (the adapter's); 0 for full fine-tuning
    gradients: int
    optimizer: int
    activations: dict[str, int]  # kept from the forward to the backward pass
    head_transient: int  # at the end of the forward pass, while the loss projects its targets
    recompute: int  # in the backward pass, with checkpointing: the layer being recomputed
    mask: int
    backward: int
    cuda: dict[str, int]
    eval_peak: int
    tokens_per_micro_batch: int
    computed_tokens_per_micro_batch: int
    flops_per_optimizer_step: float
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations.values())

    @property
    def train_peak(self) -> int:
        return (
            self.weight_bytes + self.trainable + self.gradients + self.optimizer + self.activation_bytes
            + self.transient_peak + self.mask + sum(self.cuda.values())
        )

    @property
    def transient_peak(self) -> int:
        """What comes on top of the kept activations at the larger of the two moments: the end of the forward
        pass (the head's transient) or the backward pass (a recomputed layer and the backward's working set)."""
        return max(self.head_transient, self.recompute + self.backward)

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.eval_peak)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(
            weight_bytes=self.weight_bytes,
            activation_bytes=self.activation_bytes,
            transient_peak=self.transient_peak,
            train_peak=self.train_peak,
            peak=self.peak,
        )
        return data


# ------------------------------------------------------------------------------------------- weights
def nf4_bytes(numel: int, double_quant: bool) -> tuple[int, int]:
    """(packed codes, constants) bytes of one bitsandbytes 4-bit weight of `numel` elements."""
    blocks = -(-numel // _NF4_BLOCK)
    codes = -(-numel // 2)
    code_table = 16 * 4  # the NF4/FP4 value table, fp32, kept per quant state
    if double_quant:
        nested = -(-blocks // _NESTED_BLOCK)
        # absmax as uint8 codes, their fp32 scales, the 256-entry fp32 table of the 8-bit code, the fp32 offset
        constants = blocks + 4 * nested + 256 * 4 + 4 + code_table
    else:
        constants = 4 * blocks + code_table
    return codes, constants


def weight_bytes(shape: ModelShape, setup: StepSetup) -> dict[str, int]:
    """The base model's bytes on one device, by kind, before any adapter is added (full-model copies: DDP)."""
    counts = shape.counts()
    rest = counts["bias"] + counts["norm"] + counts["embed"] + counts["head"]
    rest_elt = 4 if setup.prepared else setup.weight_bytes
    if setup.quantization == "4bit":
        codes = constants = 0
        for lin in shape.layer_linears():
            c, k = nf4_bytes(lin.weight_numel, setup.double_quant)
            codes, constants = codes + c * shape.layers, constants + k * shape.layers
        kind = "double" if setup.double_quant else "single"
        out = {"4-bit linear weights (NF4 codes)": codes, f"4-bit constants ({kind} quantization)": constants}
    elif setup.quantization == "8bit":
        rows = shape.layers * sum(lin.fan_out for lin in shape.layer_linears())
        out = {"8-bit linear weights": counts["linear"], "8-bit row scales (fp32)": 4 * rows}
    else:
        out = {f"linear weights ({_elt_name(setup.weight_bytes)})": counts["linear"] * setup.weight_bytes}
    what = "embeddings, head, norms, biases" if not shape.tied_embeddings else "embeddings (tied head), norms, biases"
    out[f"{what} ({_elt_name(rest_elt)})"] = rest * rest_elt
    return out


def _elt_name(n: int) -> str:
    return {4: "fp32", 2: "bf16", 1: "int8"}.get(n, f"{n} B")


# ------------------------------------------------------------------------------------ trainable state
def _targeted(shape: ModelShape, setup: StepSetup) -> list[Linear]:
    linears = shape.layer_linears()
    if setup.lora_targets is None:
        return linears
    wanted = set(setup.lora_targets)
    return [lin for lin in linears if lin.name in wanted]


def trainable_tensors(shape: ModelShape, setup: StepSetup) -> list[tuple[int, int]]:
    """(numel, element bytes) of every trainable tensor on one full copy of the model."""
    if setup.adapter == "lora":
        out: list[tuple[int, int]] = []
        for lin in _targeted(shape, setup):
            out += [(setup.lora_r * lin.fan_in, 4), (setup.lora_r * lin.fan_out, 4)]
            if setup.use_dora:
                out.append((lin.fan_out, 4))
        return out * shape.layers
    if setup.adapter == "reft":
        h, r = shape.hidden, setup.reft_rank
        per = [(r * h, 4), (r * h, 4), (r, 4)]  # R (orthogonal parametrization's original), W, b
        return per * setup.reft_layers * setup.reft_interventions_per_layer
    elt = setup.weight_bytes
    tensors = []
    for lin in shape.layer_linears():
        tensors.append((lin.weight_numel, elt))
        if lin.bias:
            tensors.append((lin.fan_out, elt))
    tensors += [(shape.hidden, elt)] * 2
    tensors *= shape.layers
    tensors += [(shape.vocab * shape.hidden, elt), (shape.hidden, elt)]
    if not shape.tied_embeddings:
        tensors.append((shape.vocab * shape.hidden, elt))
    return tensors


def optimizer_state_bytes(tensors: Sequence[tuple[int, int]], optimizer: str, cuda: bool) -> int:
    """Bytes of the optimizer's state for `tensors` after its first step."""
    if optimizer == "adamw":
        # torch AdamW: exp_avg and exp_avg_sq like the parameter, and a scalar fp32 `step` tensor per parameter,
        # which stays on the CPU for CUDA parameters (not fused/capturable), so it counts only on a CPU.
        return sum(2 * n * elt + (0 if cuda else 4) for n, elt in tensors)
    if optimizer == "paged_adamw_32bit":
        return sum(2 * n * 4 for n, _ in tensors)
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        # the two 256-entry fp32 quantization maps, shared by every tensor that has 8-bit state
        total = 2 * 256 * 4 if any(n >= _OPT8_MIN_SIZE for n, _ in tensors) else 0
        for n, _ in tensors:
            if n < _OPT8_MIN_SIZE:
                total += 2 * n * 4
            else:
                total += 2 * n + 2 * 4 * -(-n // _OPT8_BLOCK)
        return total
    raise UserError(f"train.optimizer: the planner does not know {optimizer!r}")


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


# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class _Dtypes:
    """Element sizes of one layer's tensors: they decide which casts autocast and PEFT make, and what they keep."""

    residual: int  # the residual stream and the norms' outputs (fp32 after prepare_model_for_kbit_training)
    compute: int  # autocast's dtype (the residual's when there is no autocast)
    autocast: bool
    matmul: int  # the output of an adapted linear layer: the base's output promoted with the adapter's

    @property
    def attention(self) -> int:
        """q, k, v as sdpa keeps them: autocast casts them; else RoPE promotes q and k with the cos/sin dtype."""
        return self.compute if self.autocast else max(self.matmul, self.residual)


def _dtypes(setup: StepSetup) -> _Dtypes:
    residual = 4 if setup.prepared else setup.weight_bytes
    autocast = setup.autocast_bytes is not None
    compute = setup.autocast_bytes if setup.autocast_bytes is not None else residual
    if setup.quantization != "none":  # bitsandbytes computes in its compute dtype, inside its own autograd function
        base = setup.quant_compute_bytes or compute
    else:
        base = compute if autocast else setup.weight_bytes
    adapter = (compute if autocast else 4) if setup.adapter == "lora" else base
    return _Dtypes(residual, compute, autocast, max(base, adapter))


def _layer_saved(shape: ModelShape, setup: StepSetup, batch: BatchShape, input_grad: bool) -> dict[str, int]:
    """Bytes autograd keeps for one decoder layer, by what keeps them; `input_grad`: whether the layer's input
    requires grad (the first layer's does not in LoRA without checkpointing: nothing before it trains)."""
    d = _dtypes(setup)
    h, i, t = shape.hidden, shape.intermediate, batch.columns
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    full = setup.adapter == "none"
    targets = {lin.name for lin in _targeted(shape, setup)} if setup.adapter == "lora" else set()
    by_name = {lin.name: lin for lin in shape.layer_linears()}
    out: dict[str, int] = {}
    # autocast makes a low-precision copy of every weight of another dtype it multiplies: a trainable weight's once
    # per forward (cached), a frozen one's per call, kept for the input's gradient where the input needs one
    casts_weights = d.autocast and setup.quantization == "none" and setup.weight_bytes != d.compute
    weight_copies = 0

    def norm(key: str, requires_grad: bool) -> None:
        # RMSNorm in fp32: x.pow(2) and x * rsqrt(var) keep x (fp32) and rsqrt; weight * normed keeps normed only
        # when the weight trains.
        if requires_grad:
            out[key] = t * (4 * h + 4) + (t * h * d.residual if full else 0)

    def linear_inputs(key: str, names: Sequence[str], fan_in: int, source: int, input_grad: bool) -> None:
        """What these linears keep of their input (of element size `source`) for their weights' gradients."""
        nonlocal weight_copies
        names = [n for n in names if n in by_name]
        if casts_weights and (full or input_grad):
            weight_copies += sum(by_name[n].weight_numel for n in names) * d.compute
        if full:  # autocast casts the input for each linear when it is of another dtype
            cast = d.autocast and source != d.compute
            out[key] = (len(names) if cast else 1) * t * fan_in * (d.compute if cast else source)
            return
        chosen = [n for n in names if n in targets]
        if not chosen:
            return
        # PEFT casts the input to the adapter's fp32 (a copy unless it is fp32), autocast casts it back (a copy)
        cast = d.compute if d.autocast else 4
        if setup.lora_dropout > 0:
            # each adapter drops out its own copy: the dropped input, and the mask when the input needs a gradient
            # (a bool mask from CUDA's fused kernel; on the CPU, dropout multiplies by a mask of the input's fp32)
            mask = (1 if setup.cuda else 4) if input_grad else 0
            out[key] = len(chosen) * t * fan_in * (cast + mask)
        elif not d.autocast and source == 4:
            out[key] = t * fan_in * 4  # no copy at all: the adapters share the input itself
        else:
            out[key] = len(chosen) * t * fan_in * cast
        out[key + ": LoRA A outputs"] = len(chosen) * t * setup.lora_r * cast

    norm("input norm", input_grad)
    attn_names = ["qkv_proj"] if "qkv_proj" in by_name else ["q_proj", "k_proj", "v_proj"]
    linear_inputs("q/k/v inputs", attn_names, h, d.residual, input_grad)
    attn_grad = input_grad or full or any(n in targets for n in attn_names)
    attention_out = d.attention
    if attn_grad:
        c = d.attention
        out["attention q, k, v"] = t * (q_dim + 2 * kv_dim) * c
        real = sum(p.tokens for p in batch.pieces)
        if setup.layout == "padded":
            # transformers' sdpa with a mask repeats k and v to every query head, and sdpa keeps its float mask
            out["attention q, k, v"] = t * 3 * q_dim * c
            out["attention output"] = t * q_dim * c + t * shape.heads * 4
            out["attention mask (float)"] = batch.rows * batch.width * batch.width * c
        else:
            # block attention: the rejected piece attends to a concatenated [prompt | rejected] copy of k and v
            # (repeated to every head on CUDA), through a float mask of R x (P + R)
            kv_copy = q_dim if (setup.cuda and shape.kv_heads != shape.heads) else kv_dim
            out["attention q, k, v"] += sum(2 * (p.prompt + p.rejected) * kv_copy * c for p in batch.pieces)
            out["attention output"] = real * q_dim * c + real * shape.heads * 4
            out["attention mask (float)"] = sum(p.rejected * (p.prompt + p.rejected) for p in batch.pieces) * c
    if setup.layout == "padded" and (full or (not d.autocast and attention_out == 4 and setup.lora_dropout == 0)):
        # sdpa's output is already laid out [rows, W, heads, dim]: o_proj's input is that same tensor
        if casts_weights:
            weight_copies += by_name["o_proj"].weight_numel * d.compute
    else:
        linear_inputs("o input", ["o_proj"], q_dim, attention_out, attn_grad)
    residual_grad = attn_grad or "o_proj" in targets
    norm("post-attention norm", residual_grad)
    mlp_names = ["gate_up_proj"] if "gate_up_proj" in by_name else ["gate_proj", "up_proj"]
    linear_inputs("gate/up inputs", mlp_names, h, d.residual, residual_grad)
    gate_grad = residual_grad or full or any(n in targets for n in mlp_names)
    if gate_grad:
        # SiLU keeps the gate output, the product keeps SiLU(gate) and the up output
        out["MLP gate, SiLU, up"] = 3 * t * i * d.matmul
    linear_inputs("down input", ["down_proj"], i, d.matmul, gate_grad)
    if weight_copies:
        out["autocast copies of the weights"] = weight_copies
    if d.autocast and setup.adapter == "lora":  # autocast's cached low-precision copies of the adapter's weights
        out["autocast copies of the LoRA weights"] = sum(
            setup.lora_r * (lin.fan_in + lin.fan_out) for lin in _targeted(shape, setup)
        ) * d.compute
    return out


def activation_bytes(shape: ModelShape, setup: StepSetup, batch: BatchShape) -> dict[str, int]:
    """What autograd keeps between the forward and the backward pass of one micro batch, by term.

    With gradient checkpointing, each layer keeps only its inputs (the residual stream, and the rotary tables
    they share); the layer recomputed in the backward pass is :func:`recompute_bytes`.
    """
    d = _dtypes(setup)
    t, h = batch.columns, shape.hidden
    full = setup.adapter == "none"
    out: dict[str, int] = {}
    # the rotary cos/sin tables, one pair per forward, shared by every layer: one row of them for the padded
    # layout (no position ids), one per row for the others
    positions = batch.width if setup.layout == "padded" else t
    out["rotary cos/sin"] = 2 * positions * shape.head_dim * d.residual
    if full:
        out["embedding indices"] = 8 * t
    if setup.gradient_checkpointing:
        out[f"layer inputs ({shape.layers} checkpointed layers)"] = shape.layers * t * h * d.residual
    else:
        first_grad = full or setup.adapter == "reft"
        per_layer = _layer_saved(shape, setup, batch, input_grad=True)
        first = _layer_saved(shape, setup, batch, input_grad=first_grad)
        for key in per_layer:
            out[f"layers: {key}"] = per_layer[key] * (shape.layers - 1) + first.get(key, 0)
    n = loss_targets(batch.pieces)
    out["final norm"] = t * (4 * h + 4) + (t * h * d.residual if full else 0)
    out["loss: target rows"] = 8 * n + n * h * d.residual  # the gathered rows' index, and their gradient rows
    out["loss: per pair"] = 64 * len(batch.pieces)
    return out


def recompute_bytes(shape: ModelShape, setup: StepSetup, batch: BatchShape) -> int:
    """With gradient checkpointing: what one layer keeps while the backward pass recomputes it."""
    if not setup.gradient_checkpointing:
        return 0
    return sum(_layer_saved(shape, setup, batch, input_grad=True).values())


def head_transient(shape: ModelShape, setup: StepSetup, targets: int, training: bool = True) -> int:
    """Peak extra bytes while the loss projects its target rows (loss.py), above what it keeps.

    Frozen head (LoRA, ReFT): one chunk's fp32 logits, turned into probabilities in place, and [chunk, h]
    products for the gradient rows; under autocast also a low-precision copy of the whole head for the call,
    the chunk's low-precision logits before their fp32 cast and a low-precision copy of the probabilities.
    Trainable head (full fine-tuning): each chunk runs under checkpointing, so the peak is in the backward pass,
    when a chunk is recomputed and differentiated.
    """
    d = _dtypes(setup)
    rows = min(CHUNK_ROWS, max(targets, 1))
    v, h = shape.vocab, shape.hidden
    if setup.adapter == "none":
        if not training:
            return 2 * rows * v * 4  # the chunk's logits and logsumexp's work
        # the backward pass of a chunk: its recomputed logits (kept by logsumexp), their softmax, the gradients of the
        # gather and of logsumexp and their sum; with several chunks also the sum of their weight gradients, which
        # autograd collects in a [V, h] buffer before it reaches the head's .grad
        return 4 * rows * v * 4 + (v * h * setup.weight_bytes if targets > rows else 0)
    total = rows * v * 4
    if training:
        total += 3 * rows * h * 4  # weight[ids], probabilities @ weight, its division
    if d.autocast:
        head_elt = 4 if setup.prepared else setup.weight_bytes
        if head_elt != d.compute:
            total += v * h * d.compute
        total += rows * v * d.compute + (rows * v * d.compute if training else 0) + rows * h * d.compute
    return total


def mask_bytes(setup: StepSetup, batch: BatchShape) -> int:
    """The boolean 4-D attention mask of a prefix/packed batch ([rows, 1, W, W]) and the temporaries that build it."""
    if setup.layout == "padded":
        return 0
    return 5 * batch.rows * batch.width * batch.width


def backward_bytes(shape: ModelShape, setup: StepSetup, batch: BatchShape) -> int:
    """An allowance (not a count) for the backward pass's working set: the residual stream's gradient (two of them
    in flight) and, without checkpointing, the gradients of one layer's MLP intermediates; with checkpointing those
    take the place of the recomputed layer's own saved tensors as they are freed (checked on the CPU: the whole
    step's peak, tests/test_plan.py)."""
    d = _dtypes(setup)
    t = batch.columns
    mlp = 0 if setup.gradient_checkpointing else 3 * t * shape.intermediate * d.matmul
    return 2 * t * shape.hidden * 4 + mlp


# ------------------------------------------------------------------------------------------- FLOPs
def flops_per_micro_batch(shape: ModelShape, setup: StepSetup, batch: BatchShape) -> float:
    """Matmul FLOPs of one micro batch's forward and backward (2 FLOPs per multiply-add).

    Forward: the decoder's linear layers on every column (padding included: it is computed), attention on the
    blocks each token sees, the head on the target rows only (twice: logits and gradient rows). Backward: input
    gradients (one forward's worth), plus weight gradients for trainable weights (another, for full fine-tuning),
    plus the recomputed forward under gradient checkpointing.
    """
    linear = sum(lin.weight_numel for lin in shape.layer_linears())
    q_dim = shape.heads * shape.head_dim
    if setup.layout == "padded":
        seen = sum(n * (n + 1) / 2 for p in batch.pieces for n in (p.prompt + p.chosen, p.prompt + p.rejected))
    else:
        seen = sum(
            (p.prompt + p.chosen) * (p.prompt + p.chosen + 1) / 2 + p.rejected * p.prompt + p.rejected * (p.rejected + 1) / 2
            for p in batch.pieces
        )
    forward = shape.layers * (2 * linear * batch.columns + 4 * q_dim * seen)
    if setup.adapter == "lora":
        forward += shape.layers * batch.columns * 2 * setup.lora_r * sum(
            lin.fan_in + lin.fan_out for lin in _targeted(shape, setup)
        )
    factor = 2.0 + (1.0 if setup.adapter == "none" else 0.0) + (1.0 if setup.gradient_checkpointing else 0.0)
    head = 2 * 2 * shape.vocab * shape.hidden * loss_targets(batch.pieces)
    if setup.adapter == "none":
        head *= 2  # the trainable head is recomputed under checkpointing and has weight gradients
    return forward * factor + head


# ------------------------------------------------------------------------------------------- sharding
def _shares(setup: StepSetup) -> tuple[float, float, float]:
    """Per-rank share of (weights, gradients, optimizer state) under the setup's strategy."""
    n = max(1, setup.world_size)
    if setup.strategy == "fsdp":
        if setup.fsdp_sharding in ("full_shard", "hybrid_shard"):
            return 1 / n, 1 / n, 1 / n
        if setup.fsdp_sharding == "shard_grad_op":
            return 1.0, 1 / n, 1 / n
        return 1.0, 1.0, 1.0
    if setup.strategy == "deepspeed":
        if setup.zero_stage == 3:
            return 1 / n, 1 / n, (0.0 if setup.offload_optimizer else 1 / n)
        return 1.0, 1 / n, (0.0 if setup.offload_optimizer else 1 / n)
    return 1.0, 1.0, 1.0


def plan_step(shape: ModelShape, setup: StepSetup) -> StepPlan:
    """The memory of one training step on one rank, its eval pass, and the work of one optimizer step."""
    notes: list[str] = []
    batch = batch_shape(setup.pairs, setup.layout, setup.pack_width)
    weights = weight_bytes(shape, setup)
    tensors = trainable_tensors(shape, setup)
    w_share, g_share, o_share = _shares(setup)
    trainable_numel = sum(n for n, _ in tensors)
    trainable = sum(n * elt for n, elt in tensors)
    gradients = trainable
    if setup.strategy == "deepspeed":
        # ZeRO keeps fp32 master weights (of what trains in 16 bits) and fp32 moments, in the optimizer's shards
        fp32 = [(n, 4) for n, _ in tensors]
        optimizer = optimizer_state_bytes(fp32, setup.optimizer, setup.cuda) + sum(4 * n for n, e in tensors if e != 4)
    else:
        optimizer = optimizer_state_bytes(tensors, setup.optimizer, setup.cuda)
    if setup.strategy == "fsdp" or (setup.strategy == "deepspeed" and setup.zero_stage == 3):
        # one decoder layer's weights are gathered at a time (and the next one prefetched); under FSDP the output
        # layer stays whole on every rank (run._shape_fsdp_units ignores it: the embedding too, when tied)
        rest_elt = 4 if setup.prepared else setup.weight_bytes
        head = shape.vocab * shape.hidden * rest_elt
        embeddings = head * (1 if shape.tied_embeddings else 2)
        sharded = {k: int(v * w_share) for k, v in weights.items()}
        if setup.strategy == "fsdp":
            sharded["output layer, whole on every rank"] = int(head * (1 - w_share))
        layer = (sum(weights.values()) - embeddings) // max(shape.layers, 1)
        sharded["one gathered layer (x2: prefetch)"] = 2 * int(layer * (1 - w_share))
        weights = sharded
        trainable = int(trainable * w_share)
    if setup.adapter == "reft":
        notes.append("reft: weights, interventions, gradients and optimizer state are exact; its saved activations "
                     "are estimated from the frozen layers' (not checked against a real step)")
    if setup.strategy == "ddp" and setup.world_size > 1:
        notes.append("ddp: every rank holds the whole model; gradient buckets add a copy of the gradients")
    if setup.adapter == "none":
        trainable = 0  # full fine-tuning trains the base weights themselves: nothing beside them
    gradients = int(gradients * g_share) + (gradients if setup.strategy == "ddp" and setup.world_size > 1 else 0)
    optimizer = int(optimizer * o_share)

    activations = activation_bytes(shape, setup, batch)
    recompute = recompute_bytes(shape, setup, batch)
    targets = loss_targets(setup.pairs)
    transient = head_transient(shape, setup, targets)
    backward = backward_bytes(shape, setup, batch)
    mask = mask_bytes(setup, batch)
    cuda: dict[str, int] = {}
    if setup.cuda:
        static = sum(weights.values()) + trainable + gradients + optimizer
        moving = sum(activations.values()) + max(transient, recompute + backward) + mask
        cuda = {
            "CUDA context (unverified)": CUDA_CONTEXT_BYTES,
            "cuBLAS workspace (unverified)": CUBLAS_WORKSPACE_BYTES,
            f"allocator rounding, fragmentation ({ALLOCATOR_OVERHEAD:.0%}, unverified)": int(
                ALLOCATOR_OVERHEAD * (static + moving)
            ),
        }

    eval_peak = 0
    if setup.eval_pairs:
        eval_pairs = tuple(setup.pairs[i % len(setup.pairs)] for i in range(setup.eval_pairs))
        eval_batch = batch_shape(eval_pairs, setup.layout, setup.pack_width)
        # no gradients and nothing kept: the hidden states going in and out of a layer, and the larger of one MLP's
        # intermediates (SiLU(gate), the up projection's base and adapter outputs and their sum, with the norm's
        # input and output) and the head's transient with the gathered rows (checked on the CPU allocator)
        d = _dtypes(setup)
        t, h = eval_batch.columns, shape.hidden
        targets = loss_targets(eval_pairs)
        layer = t * (4 * shape.intermediate * d.matmul + 2 * h * 4)
        head = head_transient(shape, setup, targets, training=False) + targets * h * d.residual
        static = sum(weights.values()) + trainable + optimizer
        eval_peak = static + mask_bytes(setup, eval_batch) + 2 * t * h * 4 + max(layer, head)
        if setup.cuda:
            eval_peak += CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + int(ALLOCATOR_OVERHEAD * eval_peak)

    tokens = sum(2 * p.prompt + p.chosen + p.rejected for p in setup.pairs)  # batching.count_tokens
    flops = flops_per_micro_batch(shape, setup, batch) * setup.gradient_accumulation * max(1, setup.world_size)
    return StepPlan(
        weights=weights,
        trainable_params=trainable_numel,
        trainable=trainable,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        head_transient=transient,
        recompute=recompute,
        mask=mask,
        backward=backward,
        cuda=cuda,
        eval_peak=eval_peak,
        tokens_per_micro_batch=tokens,
        computed_tokens_per_micro_batch=batch.columns,
        flops_per_optimizer_step=flops,
        notes=notes,
    )


# ------------------------------------------------------------------------------------------- verdicts
Verdict = Literal["fits", "tight", "does not fit"]


def verdict(peak: int, memory: int) -> Verdict:
    if peak <= TIGHT_MARGIN * memory:
        return "fits"
    if peak <= memory:
        return "tight"
    return "does not fit"


@dataclass(frozen=True)
class Lever:
    change: str  # what to change, in recipe terms
    peak: int  # the predicted peak with this lever and every one before it


def _with_pairs(setup: StepSetup, max_length: int, max_prompt: int) -> tuple[PairLengths, ...]:
    return tuple(
        PairLengths(min(p.prompt, max_prompt), min(p.chosen, max_length - min(p.prompt, max_prompt)),
                    min(p.rejected, max_length - min(p.prompt, max_prompt)))
        for p in setup.pairs
    )


def levers(shape: ModelShape, setup: StepSetup, memory: int, max_length: int, max_prompt_length: int) -> list[Lever]:
    """The cheapest changes that bring the peak under `memory` x TIGHT_MARGIN, in order, each applied on top of the
    ones before: gradient checkpointing, a smaller micro batch with more accumulation (halved down to one pair), a
    shorter max_length (only a halving that fits: it truncates the data), an 8-bit optimizer, a 4-bit base, more
    GPUs with FSDP. Stops at the first that fits; empty when it fits already."""
    goal = TIGHT_MARGIN * memory
    out: list[Lever] = []
    current = setup

    def peak(s: StepSetup) -> int:
        return plan_step(shape, s).peak

    def take(change: str, s: StepSetup) -> bool:
        nonlocal current
        current = s
        out.append(Lever(change, peak(s)))
        return out[-1].peak <= goal

    if peak(current) <= goal:
        return []
    if not current.gradient_checkpointing and take(
        "train.gradient_checkpointing: true", replace(current, gradient_checkpointing=True)
    ):
        return out
    while len(current.pairs) > 1:
        half = len(current.pairs) // 2
        s = replace(current, pairs=current.pairs[:half],
                    gradient_accumulation=current.gradient_accumulation * len(current.pairs) // half,
                    eval_pairs=min(current.eval_pairs, half) if current.eval_pairs else 0)
        if take(f"train.micro_batch_size: {half}, train.gradient_accumulation: {s.gradient_accumulation} "
                "(same pairs per step)", s):
            return out
    # Shorter pairs truncate the data: offered only where the halving that fits exists, as the last change
    length, prompt = max_length, max_prompt_length
    while length > 256:
        length, prompt = length // 2, max(1, min(prompt, length // 2))
        shorter = replace(current, pairs=_with_pairs(current, length, prompt))
        if peak(shorter) <= goal:
            take(f"orpo.max_length: {length}, orpo.max_prompt_length: {prompt}", shorter)
            return out
    if current.optimizer in ("adamw", "paged_adamw_32bit") and current.strategy != "deepspeed" and take(
        "train.optimizer: paged_adamw_8bit", replace(current, optimizer="paged_adamw_8bit")
    ):
        return out
    if current.quantization == "none" and current.adapter != "none" and take(
        "quantization.mode: 4bit", replace(current, quantization="4bit", double_quant=True)
    ):
        return out
    # More GPUs: FSDP (DeepSpeed runs keep DeepSpeed), the fewest that fit (16 if none do)
    keep = current.strategy in ("fsdp", "deepspeed")
    sharded = None
    for n in (2, 4, 8, 16):
        if n <= current.world_size:
            continue
        changes = {"world_size": n} if keep else {"strategy": "fsdp", "world_size": n, "fsdp_sharding": "full_shard"}
        sharded = (n, replace(current, **changes))
        if peak(sharded[1]) <= goal:
            break
    if sharded is not None:
        what = f"--nproc {sharded[0]}" if keep else f"distributed.strategy: fsdp, --nproc {sharded[0]}"
        take(what, sharded[1])
    return out


def step_seconds(flops: float, gpu: Gpu, mfu: float, world_size: int) -> float:
    """Seconds per optimizer step at `mfu` of `gpu`'s bf16 peak on each of `world_size` GPUs."""
    return flops / (mfu * gpu.bf16_flops * max(1, world_size))


def worst_case_pairs(micro_batch: int, max_length: int, max_prompt_length: int) -> tuple[PairLengths, ...]:
    """The longest pairs a recipe allows per memory: responses of max_length - 1 after a 1-token prompt, both
    sides (a long prompt, counted once in the packed and prefix layouts, needs less)."""
    return (PairLengths(1, max_length - 1, max_length - 1),) * micro_batch


def pairs_of(micro_batch: int, prompt: int, response: int) -> tuple[PairLengths, ...]:
    return (PairLengths(prompt, response, response),) * micro_batch


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def human_flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:.2f} {unit}"
    return f"{f:.0f} FLOP"


def human_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.2f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
