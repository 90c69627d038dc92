"""The GPUs the planner knows (memory and bf16 throughput from their datasheets) and the time a step takes on them."""

from __future__ import annotations

from dataclasses import dataclass

from orpo_cli.errors import UserError
from orpo_cli.plan.units import GIB

DEFAULT_MFU = 0.35
"""Model FLOPs utilisation assumed for the time estimate unless --mfu is given: a typical figure for a
well-fed single-GPU LoRA run; QLoRA's dequantization makes it lower, large full fine-tuning runs higher."""


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


def step_seconds(flops: float, gpu: Gpu, mfu: float, world_size: int) -> float:
    """Seconds per optimizer step at `mfu` of `gpu`'s bf16 peak on each of `world_size` GPUs."""
    return flops / (mfu * gpu.bf16_flops * max(1, world_size))
