"""The plan of one training step: the memory terms of plan/memory.py added up per rank (under DDP, FSDP and
DeepSpeed), the verdict of a peak against a GPU's memory, and the levers that bring a peak under it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from orpo_cli.plan.memory import (
    ALLOCATOR_OVERHEAD,
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    activation_bytes,
    backward_bytes,
    flops_per_micro_batch,
    head_transient,
    layer_dtypes,
    mask_bytes,
    optimizer_state_bytes,
    recompute_bytes,
    trainable_tensors,
    weight_bytes,
)
from orpo_cli.plan.shapes import ModelShape, PairLengths, StepSetup, batch_shape, loss_targets

TIGHT_MARGIN = 0.9
"""A predicted peak above this share of the memory is `tight`: it may fit, or fail on a longer batch."""
REFUSE_MARGIN = 1.1
"""`train` refuses a recipe predicted to need more than this many times the free device memory."""


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
    weights.update(setup.adapter.buffers(shape))  # what the adapter holds beside what trains (LoReFT's bases)
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
    if setup.shards_weights:
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
    notes += setup.adapter.notes()
    if setup.strategy == "ddp" and setup.world_size > 1:
        notes.append("ddp: every rank holds the whole model; gradient buckets add a copy of the gradients")
    if setup.trains_base:
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
        # no gradients and nothing kept: the larger of a layer's moment (the mask, the hidden states going in and
        # out of the layer, and one MLP's intermediates: SiLU(gate), the up projection's base and adapter outputs
        # and their sum, with the norm's input and output; with LoRA's update added in place the up projection's
        # output is its own sum, one MLP-wide tensor fewer) and the head's (the boolean mask alone, its
        # temporaries long gone, the last hidden state, the gathered rows and the head's transient); checked on
        # the CPU allocator
        d = layer_dtypes(setup)
        t, h = eval_batch.columns, shape.hidden
        targets = loss_targets(eval_pairs)
        mlp = 3 if setup.lora_in_place else 4
        layer = mask_bytes(setup, eval_batch) + 2 * t * h * 4 + t * (mlp * shape.intermediate * d.matmul + 2 * h * 4)
        bool_mask = 0 if setup.layout == "padded" else eval_batch.rows * eval_batch.width * eval_batch.width
        head = bool_mask + t * h * 4 + head_transient(shape, setup, targets, training=False) + targets * h * d.residual
        static = sum(weights.values()) + trainable + optimizer
        eval_peak = static + max(layer, head)
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
        "train.gradient_checkpointing: true", replace(current, gradient_checkpointing=True, recompute=False)
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
    if current.quantization == "none" and not current.trains_base and take(
        "quantization.mode: 4bit", replace(current, quantization="4bit", double_quant=True)
    ):
        return out
    # More GPUs: FSDP (DeepSpeed runs keep DeepSpeed), the fewest that fit (16 if none do)
    keep = current.strategy in ("fsdp", "deepspeed")
    sharded = None
    for n in (2, 4, 8, 16):
        if n <= current.world_size:
            continue
        changes = {"world_size": n} if keep else {"strategy": "fsdp", "world_size": n, "fsdp_sharding": "full_shard",
                                                  "recompute": False}  # FSDP's sharded weights: setup.py does not
        sharded = (n, replace(current, **changes))
        if peak(sharded[1]) <= goal:
            break
    if sharded is not None:
        what = f"--nproc {sharded[0]}" if keep else f"distributed.strategy: fsdp, --nproc {sharded[0]}"
        take(what, sharded[1])
    return out
