"""The planner: peak memory, tokens, FLOPs and time of one ORPO training step, from a model's config alone.

Nothing here loads weights or reads a recipe: :func:`orpo_cli.plan.step.plan_step` takes a :class:`ModelShape` (the few numbers of
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
  float mask for padded rows), less what training's recomputation keeps a recipe for instead (training/
  recompute.py: the norms' and the MLP's outputs that a linear keeps uncast, and SiLU(gate)), the checkpointed
  layer inputs instead when gradient checkpointing is on;
* the loss head's transient (training/head.py: one chunk of logits, and under autocast a low-precision copy of the head),
  the batch's dense 4-D mask, and an allowance for the backward pass's working set;
* per rank under DDP, FSDP and DeepSpeed ZeRO (that sum is plan/step.py).

On a CPU (fp32, no autocast) the parameter, gradient and optimizer bytes are exact and the saved bytes are
checked against a real step (tests/test_plan.py). The CUDA-only terms are constants from documentation,
marked unverified in the output until a GPU measures them.
"""


from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orpo_cli.errors import UserError
from orpo_cli.plan.shapes import BatchShape, ModelShape, StepSetup, loss_targets
from orpo_cli.plan.units import MIB

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

# bitsandbytes' layouts (0.49/0.50): 4-bit blocks of 64 weights, double quantization blocks of 256 absmax values,
# 8-bit optimizer blocks of 256 elements, and the size under which 8-bit optimizers keep 32-bit state.
_NF4_BLOCK = 64
_NESTED_BLOCK = 256
_OPT8_BLOCK = 256
_OPT8_MIN_SIZE = 4096
CHUNK_ROWS = 256  # training/head.CHUNK_ROWS, repeated so that planning imports no torch


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
def trainable_tensors(shape: ModelShape, setup: StepSetup) -> list[tuple[int, int]]:
    """(numel, element bytes) of every trainable tensor on one full copy of the model."""
    return setup.adapter.trainable_tensors(shape, setup.weight_bytes)


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



# ------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class LayerDtypes:
    """Element sizes of one layer's tensors: they decide which casts autocast and PEFT make, and what they keep."""

    residual: int  # the residual stream and the norms' outputs (fp32 after prepare_model_for_kbit_training)
    compute: int  # autocast's dtype (the residual's when there is no autocast)
    autocast: bool
    matmul: int  # the output of an adapted linear layer: the base's output promoted with the adapter's

    @property
    def attention(self) -> int:
        """q, k, v as sdpa keeps them: autocast casts them; else RoPE promotes q and k with the cos/sin dtype."""
        return self.compute if self.autocast else max(self.matmul, self.residual)


def layer_dtypes(setup: StepSetup) -> LayerDtypes:
    residual = 4 if setup.prepared else setup.weight_bytes
    autocast = setup.autocast_bytes is not None
    compute = setup.autocast_bytes if setup.autocast_bytes is not None else residual
    if setup.quantization != "none":  # bitsandbytes computes in its compute dtype, inside its own autograd function
        base = setup.quant_compute_bytes or compute
    else:
        base = compute if autocast else setup.weight_bytes
    adapter = setup.adapter.matmul_bytes(compute, autocast, base)
    return LayerDtypes(residual, compute, autocast, max(base, adapter))


def _layer_saved(shape: ModelShape, setup: StepSetup, batch: BatchShape, input_grad: bool) -> dict[str, int]:
    """Bytes autograd keeps for one decoder layer, by what keeps them; `input_grad`: whether the layer's input
    requires grad (the first layer's does not in LoRA without checkpointing: nothing before it trains)."""
    d = layer_dtypes(setup)
    h, i, t = shape.hidden, shape.intermediate, batch.columns
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    full = setup.trains_base
    targets = {lin.name for lin in setup.adapter.targets(shape)}
    by_name = {lin.name: lin for lin in shape.layer_linears()}
    out: dict[str, int] = {}
    # autocast makes a low-precision copy of every weight of another dtype it multiplies: a trainable weight's once
    # per forward (cached), a frozen one's per call, kept for the input's gradient where the input needs one
    casts_weights = d.autocast and setup.quantization == "none" and setup.weight_bytes != d.compute
    weight_copies = 0
    # kernels/recompute.py: a linear that keeps a norm's output or (in a gate/up/down MLP; Phi-3's fused
    # gate_up_proj is not one) the product down_proj reads keeps a recipe instead, when it keeps that tensor
    # itself; a cast copy of it (autocast's, PEFT's fp32 one, dropout's) is kept as before
    mlp_recomputed = setup.recompute and "gate_proj" in by_name

    def norm(key: str, requires_grad: bool) -> None:
        # RMSNorm in fp32: x.pow(2) and x * rsqrt(var) keep x (fp32) and rsqrt; weight * normed keeps normed only
        # when the weight trains.
        if requires_grad:
            out[key] = t * (4 * h + 4) + (t * h * d.residual if full else 0)

    def linear_inputs(
        key: str, names: Sequence[str], fan_in: int, source: int, input_grad: bool, recomputed: bool = False
    ) -> bool:
        """What these linears keep of their input (of element size `source`) for their weights' gradients;
        `recomputed`: the input is an output the recomputation notes. True where they keep the input itself
        and it is recomputed instead (nothing counted)."""
        nonlocal weight_copies
        names = [n for n in names if n in by_name]
        if casts_weights and (full or input_grad):
            weight_copies += sum(by_name[n].weight_numel for n in names) * d.compute
        if full:  # autocast casts the input for each linear when it is of another dtype
            cast = d.autocast and source != d.compute
            if recomputed and not cast:
                return True
            out[key] = (len(names) if cast else 1) * t * fan_in * (d.compute if cast else source)
            return False
        chosen = [n for n in names if n in targets]
        if not chosen:
            return False
        dropped = False
        # PEFT casts the input to the adapter's fp32 (a copy unless it is fp32), autocast casts it back (a copy)
        cast = d.compute if d.autocast else 4
        if setup.adapter.dropout > 0:
            # each adapter drops out its own copy: the dropped input, and the mask when the input needs a gradient
            # (a bool mask from CUDA's fused kernel; on the CPU, dropout multiplies by a mask of the input's fp32)
            mask = (1 if setup.cuda else 4) if input_grad else 0
            out[key] = len(chosen) * t * fan_in * (cast + mask)
        elif not d.autocast and source == 4:
            # no copy at all: the adapters share the input itself (or its recipe)
            dropped = recomputed
            if not dropped:
                out[key] = t * fan_in * 4
        else:
            out[key] = len(chosen) * t * fan_in * cast
        out[key + ": LoRA A outputs"] = len(chosen) * t * setup.adapter.rank * cast
        return dropped

    norm("input norm", input_grad)
    attn_names = ["qkv_proj"] if "qkv_proj" in by_name else ["q_proj", "k_proj", "v_proj"]
    if linear_inputs("q/k/v inputs", attn_names, h, d.residual, input_grad, setup.recompute) and not input_grad:
        # the recipe holds the norm's input, which nothing else keeps when it needs no gradient (the embeddings)
        out["input norm's input (for its recomputation)"] = t * h * d.residual
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
        elif not setup.cuda:
            # the CPU's tiled block attention (kernels/attention_tiles.py): q, k and v themselves, its output
            # (every column, [rows, W, heads, dim]) and a float log-sum-exp per head and column
            out["attention output"] = t * q_dim * c + t * shape.heads * 4
        else:
            # block attention: the rejected piece attends to a concatenated [prompt | rejected] copy of k and v
            # (repeated to every head on CUDA), through a float mask of R x (P + R)
            kv_copy = q_dim if (setup.cuda and shape.kv_heads != shape.heads) else kv_dim
            out["attention q, k, v"] += sum(2 * (p.prompt + p.rejected) * kv_copy * c for p in batch.pieces)
            out["attention output"] = real * q_dim * c + real * shape.heads * 4
            out["attention mask (float)"] = sum(p.rejected * (p.prompt + p.rejected) for p in batch.pieces) * c
    laid_out = setup.layout == "padded" or not setup.cuda
    if laid_out and (full or (not d.autocast and attention_out == 4 and setup.adapter.dropout == 0)):
        # sdpa's output (the CPU tiles' too) is already laid out [rows, W, heads, dim]: o_proj's input is that tensor
        if casts_weights:
            weight_copies += by_name["o_proj"].weight_numel * d.compute
    else:
        linear_inputs("o input", ["o_proj"], q_dim, attention_out, attn_grad)
    residual_grad = attn_grad or "o_proj" in targets
    norm("post-attention norm", residual_grad)
    mlp_names = ["gate_up_proj"] if "gate_up_proj" in by_name else ["gate_proj", "up_proj"]
    linear_inputs("gate/up inputs", mlp_names, h, d.residual, residual_grad, setup.recompute)
    gate_grad = residual_grad or full or any(n in targets for n in mlp_names)
    if gate_grad:
        # SiLU keeps the gate output, the product keeps SiLU(gate) (a recipe, when recomputed) and the up output
        out["MLP gate, up"] = 2 * t * i * d.matmul
        if not mlp_recomputed:
            out["MLP SiLU output"] = t * i * d.matmul
    linear_inputs("down input", ["down_proj"], i, d.matmul, gate_grad, mlp_recomputed)
    if weight_copies:
        out["autocast copies of the weights"] = weight_copies
    if d.autocast:  # autocast's cached low-precision copies of the adapter's weights
        out.update(setup.adapter.autocast_copies(shape, d.compute))
    return out


def activation_bytes(shape: ModelShape, setup: StepSetup, batch: BatchShape) -> dict[str, int]:
    """What autograd keeps between the forward and the backward pass of one micro batch, by term.

    With gradient checkpointing, each layer keeps only its inputs (the residual stream, and the rotary tables
    they share); the layer recomputed in the backward pass is :func:`recompute_bytes`.
    """
    d = layer_dtypes(setup)
    t, h = batch.columns, shape.hidden
    full = setup.trains_base
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
        first_grad = setup.adapter.first_grad
        per_layer = _layer_saved(shape, setup, batch, input_grad=True)
        first = _layer_saved(shape, setup, batch, input_grad=first_grad)
        for key in per_layer:
            out[f"layers: {key}"] = per_layer[key] * (shape.layers - 1) + first.get(key, 0)
        for key in [k for k in first if k not in per_layer]:
            out[f"first layer: {key}"] = first[key]
    n = loss_targets(batch.pieces)
    # the final norm's output is kept by nobody (the loss gathers its target rows): recomputation drops nothing here
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
    d = layer_dtypes(setup)
    rows = min(CHUNK_ROWS, max(targets, 1))
    v, h = shape.vocab, shape.hidden
    if setup.trains_base:
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
    d = layer_dtypes(setup)
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
    forward += setup.adapter.forward_flops(shape, batch.columns)
    factor = 2.0 + (1.0 if setup.trains_base else 0.0) + (1.0 if setup.gradient_checkpointing else 0.0)
    head = 2 * 2 * shape.vocab * shape.hidden * loss_targets(batch.pieces)
    if setup.trains_base:
        head *= 2  # the trainable head is recomputed under checkpointing and has weight gradients
    return forward * factor + head
