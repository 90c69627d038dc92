"""What each adapter method adds to the planner's sums, behind one interface: the planner's side of orpo_cli/adapters.

The memory and FLOPs model (memory.py, step.py) asks the adapter on its StepSetup, never its kind: which tensors
train, which linears carry adapter weights beside them, what its matmuls compute in, what autocast caches of its
weights, whether the first layer's input needs a gradient, its own buffers, and whether LoRA's in-place update and
PEFT's k-bit preparation apply. :func:`terms_for` picks the method's terms once, from the recipe's `adapter:` section
(one entry per kind in `_TERMS`, as orpo_cli.adapters' `_ADAPTERS`; tests/test_plan.py holds the lists to each
other). No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from orpo_cli.recipe import AdapterSettings, FullSettings, LoraSettings, ReftSettings, parse_reft_positions

if TYPE_CHECKING:
    from orpo_cli.plan.shapes import Linear, ModelShape


class AdapterTerms(Protocol):
    """One adapter method's terms in the planner (all bytes are per full copy of the model, before sharding)."""

    kind: str  # the recipe's adapter.kind, for the JSON plan (nothing branches on it)
    trains_base: bool  # the base's own weights train (full fine-tuning): their gradients and state, every input kept
    first_grad: bool  # without checkpointing, the first layer's input needs a gradient (something before it trains)
    prepares_kbit: bool  # PEFT's prepare_model_for_kbit_training runs on a k-bit base: the unquantized rest goes fp32
    dropout: float  # dropout on the targeted linears' inputs (each target keeps its own dropped copy)
    rank: int  # the width each targeted linear's adapter computes beside it (LoRA's A output)

    def fields(self) -> dict[str, Any]:
        """The method's settings under the JSON plan's names (`orpo-tune plan --json`'s setup)."""
        ...

    def trainable_tensors(self, shape: ModelShape, weight_bytes: int) -> list[tuple[int, int]]:
        """(numel, element bytes) of every trainable tensor; `weight_bytes`: the base weights' element size."""
        ...

    def targets(self, shape: ModelShape) -> list[Linear]:
        """The decoder layer's linears that carry adapter weights beside them (and keep their inputs for them)."""
        ...

    def matmul_bytes(self, compute: int, autocast: bool, base: int) -> int:
        """Element size the adapter's matmuls keep their inputs in; `base`: the frozen linears'."""
        ...

    def autocast_copies(self, shape: ModelShape, compute: int) -> dict[str, int]:
        """Bytes of the low-precision copies autocast caches of the adapter's weights (once per forward), by term."""
        ...

    def buffers(self, shape: ModelShape) -> dict[str, int]:
        """Bytes the adapter holds beside its trainable weights, by term (weights: ...)."""
        ...

    def notes(self) -> list[str]:
        """What the plan should say about how exact the adapter's terms are."""
        ...

    def forward_flops(self, shape: ModelShape, columns: int) -> float:
        """The adapter's own forward FLOPs for `columns` tokens, beyond the base's."""
        ...

    def in_place(self, quantized: bool) -> bool:
        """The adapter's update can be added into the base output in place (adapters/lora_inplace.py), given
        whether the base is quantized; the rest of the conditions (fp32, no autocast, whole weights, the CPU
        paths) are StepSetup.lora_in_place's."""
        ...


@dataclass(frozen=True)
class LoraTerms:
    """Low-rank A [r, in] and B [out, r] in fp32 beside each targeted linear (PEFT), a magnitude [out] with DoRA."""

    r: int = 16
    target_names: tuple[str, ...] | None = None  # None: all-linear
    dropout: float = 0.0
    use_dora: bool = False
    kind = "lora"
    trains_base = LoraSettings.trains_base  # declared once, on the recipe's settings
    first_grad = False  # nothing before the first layer trains: its input needs no gradient
    prepares_kbit = True

    def fields(self) -> dict[str, Any]:
        return {"lora_r": self.r, "lora_targets": self.target_names, "lora_dropout": self.dropout, "use_dora": self.use_dora}

    @property
    def rank(self) -> int:
        return self.r

    def targets(self, shape: ModelShape) -> list[Linear]:
        linears = shape.layer_linears()
        if self.target_names is None:
            return linears
        wanted = set(self.target_names)
        return [lin for lin in linears if lin.name in wanted]

    def trainable_tensors(self, shape: ModelShape, weight_bytes: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for lin in self.targets(shape):
            out += [(self.r * lin.fan_in, 4), (self.r * lin.fan_out, 4)]
            if self.use_dora:
                out.append((lin.fan_out, 4))
        return out * shape.layers

    def matmul_bytes(self, compute: int, autocast: bool, base: int) -> int:
        return compute if autocast else 4  # PEFT casts the input to the adapter's fp32; autocast casts it back

    def autocast_copies(self, shape: ModelShape, compute: int) -> dict[str, int]:
        copies = sum(self.r * (lin.fan_in + lin.fan_out) for lin in self.targets(shape)) * compute
        return {"autocast copies of the LoRA weights": copies}

    def buffers(self, shape: ModelShape) -> dict[str, int]:
        return {}

    def notes(self) -> list[str]:
        return []

    def forward_flops(self, shape: ModelShape, columns: int) -> float:
        return shape.layers * columns * 2 * self.r * sum(lin.fan_in + lin.fan_out for lin in self.targets(shape))

    def in_place(self, quantized: bool) -> bool:
        return not quantized and self.dropout == 0 and not self.use_dora


@dataclass(frozen=True)
class ReftTerms:
    """Interventions on the residual stream at `layers` layers: R [r, hidden], W [r, hidden], b [r] each, in fp32."""

    layers: int = 0
    rank: int = 4
    interventions_per_layer: int = 1
    orthogonal: bool = True  # LoReFT: each intervention's R is parametrized over a [hidden, hidden] fp32 basis
    kind = "reft"
    trains_base = ReftSettings.trains_base  # declared once, on the recipe's settings
    first_grad = True  # the interventions edit the residual stream: every layer's input needs a gradient
    prepares_kbit = False
    dropout = 0.0

    def fields(self) -> dict[str, Any]:
        return {"reft_layers": self.layers, "reft_rank": self.rank,
                "reft_interventions_per_layer": self.interventions_per_layer, "reft_orthogonal": self.orthogonal}

    def targets(self, shape: ModelShape) -> list[Linear]:
        return []

    def trainable_tensors(self, shape: ModelShape, weight_bytes: int) -> list[tuple[int, int]]:
        h, r = shape.hidden, self.rank
        per = [(r * h, 4), (r * h, 4), (r, 4)]  # R (orthogonal parametrization's original), W, b
        return per * self.layers * self.interventions_per_layer

    def matmul_bytes(self, compute: int, autocast: bool, base: int) -> int:
        return base

    def autocast_copies(self, shape: ModelShape, compute: int) -> dict[str, int]:
        return {}

    def buffers(self, shape: ModelShape) -> dict[str, int]:
        if not self.orthogonal:
            return {}
        # torch's orthogonal parametrization keeps a [hidden, hidden] fp32 basis (a buffer) beside each LoReFT's R:
        # 67 MB per intervention at hidden 4096, more than R, W and b (tests/test_plan.py holds it to the modules')
        return {"reft: LoReFT orthogonal bases": 4 * shape.hidden**2 * self.layers * self.interventions_per_layer}

    def notes(self) -> list[str]:
        return ["reft: weights, interventions, gradients and optimizer state are exact; its saved activations "
                "are estimated from the frozen layers' (not checked against a real step)"]

    def forward_flops(self, shape: ModelShape, columns: int) -> float:
        return 0

    def in_place(self, quantized: bool) -> bool:
        return False


@dataclass(frozen=True)
class FullTerms:
    """Full fine-tuning: the base's own weights train, in their dtype; no adapter weights beside them."""

    kind = "full"
    trains_base = FullSettings.trains_base  # declared once, on the recipe's settings
    first_grad = True
    prepares_kbit = False
    dropout = 0.0
    rank = 0

    def fields(self) -> dict[str, Any]:
        return {}

    def targets(self, shape: ModelShape) -> list[Linear]:
        return []

    def trainable_tensors(self, shape: ModelShape, weight_bytes: int) -> list[tuple[int, int]]:
        elt = weight_bytes
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

    def matmul_bytes(self, compute: int, autocast: bool, base: int) -> int:
        return base

    def autocast_copies(self, shape: ModelShape, compute: int) -> dict[str, int]:
        return {}  # the base's own weights: memory.py counts autocast's copies of every weight

    def buffers(self, shape: ModelShape) -> dict[str, int]:
        return {}

    def notes(self) -> list[str]:
        return []

    def forward_flops(self, shape: ModelShape, columns: int) -> float:
        return 0

    def in_place(self, quantized: bool) -> bool:
        return False


def _lora(settings: LoraSettings, shape: ModelShape) -> LoraTerms:
    targets = None if settings.target_modules == "all-linear" else tuple(settings.target_modules)
    return LoraTerms(r=settings.r, target_names=targets, dropout=settings.dropout, use_dora=settings.use_dora)


def _reft(settings: ReftSettings, shape: ModelShape) -> ReftTerms:
    layers = shape.layers if settings.layers == "all" else len(settings.layers)
    first, last = parse_reft_positions(settings.positions)
    both = first > 0 and last > 0  # untied, each group of positions that edits any has its own intervention
    return ReftTerms(layers=layers, rank=settings.rank, interventions_per_layer=2 if both and not settings.tied else 1,
                     orthogonal=settings.intervention == "loreft")


# The planner's terms of each `adapter.kind` of the recipe (orpo_cli.recipe.ADAPTER_MODELS lists the kinds).
_TERMS: dict[str, Callable[[Any, ModelShape], AdapterTerms]] = {
    "lora": _lora,
    "reft": _reft,
    "full": lambda _settings, _shape: FullTerms(),
}


def terms_for(settings: AdapterSettings, shape: ModelShape) -> AdapterTerms:
    """The planner's terms for a recipe's `adapter:` section (an orpo_cli.recipe.AdapterSettings) on `shape`."""
    return _TERMS[settings.kind](settings, shape)


def json_fields(terms: AdapterTerms) -> dict[str, Any]:
    """The JSON plan's adapter fields: the kind, whether the base trains, and every method's settings (the others'
    at their defaults, as the plan has always printed them)."""
    return {"adapter": terms.kind, "trains_base": terms.trains_base, **LoraTerms().fields(), **ReftTerms().fields(),
            **terms.fields()}
