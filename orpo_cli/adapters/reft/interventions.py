"""ReFT (Wu et al. 2024, arXiv 2404.03592), natively: interventions on the residual stream at a few prompt positions.

LoReFT edits a hidden state h at a chosen position and layer as

    Φ(h) = h + Rᵀ(act(Wh + b) − Rh)          R ∈ ℝ^{r×d} with orthonormal rows, W ∈ ℝ^{r×d}, b ∈ ℝ^r

NoReFT is the same formula with an unconstrained R; DiReFT drops the −Rh term (h + Rᵀ act(Wh + b)).
Untrained, each is the identity (Φ(h) = h exactly, so step 0 of a run is the base model), with its
gradients alive: LoReFT and NoReFT start at W = R, b = 0; DiReFT at R = 0 (see each class for a nonlinear act).
The interventions live in fp32 and compute in fp32 whatever the base model's dtype (and with autocast off):
h is cast up, edited, and the result cast back to h's dtype.

Where the edits land
--------------------
A forward hook on each chosen decoder layer edits that layer's output (the residual stream after layer l).
Which positions it edits is decided once per forward call by a pre-hook on the decoder stack, from

* each row's prompt length n (given to `ReftStack.prompts`, i.e. the adapter's `forward_context`), and
* each column's *real-token index*: the number of non-padding tokens before it, counted from the 2-D
  attention mask, which under the Hugging Face convention covers the cached past and the current chunk.

The edited tokens are the real-token indices [0, kf) and [n − kl, n), where kf = min(K_first, n // 2) and
kl = min(K_last, n // 2), so the two groups never overlap. Counting real tokens instead of columns makes
this the same under left or right padding, with or without a KV cache, and with the prompt prefilled in
several chunks; every generated token has a real-token index ≥ n, so decode steps are never edited.
When the model gets a 4-D mask instead (the prefix-shared training layout, training/shared_prompt.py: one
`[prompt | chosen | rejected]` row per pair), `position_ids` stand for the real-token index: the prompt
holds positions 0..n-1 exactly once per row, so it is edited once and both responses attend to that copy.

Selected positions are gathered into a small [rows, K, d] tensor (K = K_first + K_last), edited, and
scattered back, without host syncs or loops over tokens. Slots with nothing to edit (a short prompt, or a
position outside the current chunk) point to a scratch column that is dropped afterwards.

Gradient checkpointing recomputes a layer, and so its hook, during backward, after the forward context has
closed: the per-call plan is therefore kept until the next forward call replaces it (backward must follow
its own forward, as in every training loop).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrizations

from orpo_cli.recipe import parse_reft_positions

FORMAT_VERSION = 1
CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "reft_adapter.safetensors"
# Where the stack hangs on the model, so that its parameters appear in named_parameters (and checkpoints).
ATTRIBUTE = "reft_interventions"

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}


# ------------------------------------------------------------------------------------------ interventions
class _Intervention(nn.Module):
    """Shared parts: R (`rotate`, [r, d]), W and b (`source`, Linear d -> r), activation, dropout on the edit."""

    def __init__(self, hidden_size: int, rank: int, *, dropout: float, act_fn: str, orthogonal: bool):
        super().__init__()
        self.rotate = nn.Linear(hidden_size, rank, bias=False, dtype=torch.float32)
        nn.init.orthogonal_(self.rotate.weight)
        if orthogonal:
            parametrizations.orthogonal(self.rotate)
        self.source = nn.Linear(hidden_size, rank, dtype=torch.float32)
        self.act = _ACTIVATIONS[act_fn]()
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            self._start_as_identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            # 2-D matmuls on a contiguous copy: torch picks its matmul path by strides and requires_grad,
            # and a different path may round differently; this keeps a loaded adapter bitwise equal.
            x = h.reshape(-1, h.shape[-1]).to(torch.float32).contiguous()
            r = self.rotation()  # materialised once per call
            edit = self._low_rank(x, r) @ r
            return (x + self.dropout(edit)).to(h.dtype).reshape(h.shape)

    def rotation(self) -> torch.Tensor:
        """R [r, d]; for LoReFT the orthonormal matrix the parametrization makes of its raw parameter.

        torch's Householder map reads the signs of its parameter's diagonal through `.int()` and trains
        only the strictly lower part. Weight decay shrinks that diagonal from ±1 towards 0, where `.int()`
        turns it to 0 and R would collapse to zero rows; so the diagonal is read as its sign, here.
        """
        if not _is_orthogonal(self.rotate):
            return self.rotate.weight
        param = self.rotate.parametrizations.weight
        raw = param.original
        diagonal = raw.diagonal()
        signs = torch.where(diagonal < 0, -torch.ones_like(diagonal), torch.ones_like(diagonal))
        return param[0](torch.diagonal_scatter(raw, signs))

    def _low_rank(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _start_as_identity(self) -> None:
        raise NotImplementedError

    @property
    def linear(self) -> bool:
        return isinstance(self.act, nn.Identity)


class _SubspaceReFT(_Intervention):
    """LoReFT and NoReFT: h + Rᵀ(act(Wh + b) − Rh), which replaces h's component in R's subspace.

    Starts as the identity where the formula can be: W = R and b = 0 make Wh + b − Rh exactly zero (a linear
    act computes it as (W − R)h + b, so the zero is exact, not two products that round alike), while every
    gradient is alive at once: ∂/∂W = (R g)hᵀ, ∂/∂b = R g, ∂/∂R = −(R g)hᵀ for the edit's gradient g. With
    a nonlinear act, act(Wh + b) = Rh for every h is impossible: LoReFT keeps W = R, b = 0 (not the
    identity), NoReFT starts from R = 0 instead (the identity; W and b get gradients once R has moved).
    """

    def _low_rank(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if self.linear:
            return self.act(nn.functional.linear(x, self.source.weight - r, self.source.bias))
        return self.act(self.source(x)) - x @ r.T

    def _start_as_identity(self) -> None:
        self.source.weight.copy_(self.rotation())
        self.source.bias.zero_()


class LoReFT(_SubspaceReFT):
    """Φ(h) = h + Rᵀ(act(Wh + b) − Rh), R with orthonormal rows (torch's orthogonal parametrization)."""

    def __init__(self, hidden_size: int, rank: int, *, dropout: float = 0.0, act_fn: str = "linear"):
        super().__init__(hidden_size, rank, dropout=dropout, act_fn=act_fn, orthogonal=True)


class NoReFT(_SubspaceReFT):
    """LoReFT's formula with an unconstrained R."""

    def __init__(self, hidden_size: int, rank: int, *, dropout: float = 0.0, act_fn: str = "linear"):
        super().__init__(hidden_size, rank, dropout=dropout, act_fn=act_fn, orthogonal=False)

    def _start_as_identity(self) -> None:
        if self.linear:
            super()._start_as_identity()
        else:
            self.rotate.weight.zero_()


class DiReFT(_Intervention):
    """Φ(h) = h + Rᵀ act(Wh + b), R unconstrained.

    Starts as the identity as LoRA does (B = 0): R = 0, W and b as initialised, for every act. R's gradient
    act(Wh + b)gᵀ is alive at once; W's and b's (through R) from the second step, once R has moved. No
    start that is the identity keeps both factors alive unless R's rows cancel each other's edits (RᵀW = 0
    with R, W ≠ 0), which would tie pairs of rows together; this is the plain choice, LoRA's.
    """

    def __init__(self, hidden_size: int, rank: int, *, dropout: float = 0.0, act_fn: str = "linear"):
        super().__init__(hidden_size, rank, dropout=dropout, act_fn=act_fn, orthogonal=False)

    def _low_rank(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return self.act(self.source(x))

    def _start_as_identity(self) -> None:
        self.rotate.weight.zero_()


INTERVENTIONS: dict[str, type[_Intervention]] = {"loreft": LoReFT, "noreft": NoReFT, "direft": DiReFT}


def get_weights(module: _Intervention) -> dict[str, torch.Tensor]:
    """R (materialised: for LoReFT the plain orthonormal matrix), W and b, as fp32 CPU tensors."""
    with torch.no_grad():
        return {
            "R": module.rotation().detach().to("cpu", torch.float32).contiguous().clone(),
            "W": module.source.weight.detach().to("cpu", torch.float32).contiguous().clone(),
            "b": module.source.bias.detach().to("cpu", torch.float32).contiguous().clone(),
        }


@torch.no_grad()
def set_weights(module: _Intervention, weights: dict[str, torch.Tensor]) -> None:
    """Load R, W, b so that `module.rotation()` materialises to exactly (bitwise) the saved R.

    For LoReFT the orthogonal parametrization computes R = (base · Q(original))ᵀ restricted to r columns.
    With `original` = −I (Householder vectors all zero), Q(original) is exactly the identity's first r
    columns, so R comes out as the first r columns of `base`, which we set to Rᵀ completed to an orthogonal
    d×d matrix: the product base·[I; 0] only adds exact zeros, so R is reproduced bit for bit and stays
    trainable on the orthogonal manifold.
    """
    rotate, source = module.rotate, module.source
    device = source.weight.device
    r = weights["R"].to(device, torch.float32)
    if tuple(r.shape) != tuple(rotate.weight.shape):
        raise ValueError(f"R has shape {tuple(r.shape)}, expected {tuple(rotate.weight.shape)}")
    if _is_orthogonal(rotate):
        param = rotate.parametrizations.weight
        param[0].base = complete_orthonormal(r.T)
        neg_identity = torch.zeros_like(param.original)
        neg_identity.diagonal().fill_(-1.0)
        param.original.copy_(neg_identity)
    else:
        rotate.weight.copy_(r)
    source.weight.copy_(weights["W"].to(device, torch.float32))
    source.bias.copy_(weights["b"].to(device, torch.float32))


def _is_orthogonal(module: nn.Module) -> bool:
    return hasattr(module, "parametrizations") and "weight" in module.parametrizations


def complete_orthonormal(columns: torch.Tensor) -> torch.Tensor:
    """A d×d orthogonal matrix whose first k columns are exactly `columns` (d×k, orthonormal)."""
    d, k = columns.shape
    generator = torch.Generator(device="cpu").manual_seed(0)
    extra = torch.randn(d, d - k, generator=generator, dtype=columns.dtype).to(columns.device)
    q, r = torch.linalg.qr(torch.cat([columns, extra], dim=1))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # QR is unique up to signs: keep the columns' signs
    q[:, :k] = columns  # equal up to rounding; make it exact
    return q


# -------------------------------------------------------------------------------------------- positions
@dataclass(frozen=True)
class Positions:
    """`fK+lK`: the first K and last K prompt tokens."""

    first: int
    last: int

    @classmethod
    def parse(cls, spec: str) -> Positions:
        """The recipe's grammar (recipe.parse_reft_positions): ValueError for what the recipe refuses."""
        return cls(*parse_reft_positions(spec))


def real_token_index(
    rows: int,
    length: int,
    *,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_length: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, real) for the current chunk's columns, each [rows, length].

    index: how many real tokens precede the column in its row (the token's position in the unpadded
    sequence); real: whether the column holds a token at all (False on padding).
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = attention_mask.to(device)
        index = (mask.long().cumsum(-1) - 1)[:, -length:]
        real = mask[:, -length:] != 0
        return index, real
    if position_ids is not None:
        index = (
            position_ids.to(device)
            .long()
            .reshape(-1, position_ids.shape[-1])[:, -length:]
            .expand(rows, length)
        )
    else:
        index = (torch.arange(length, device=device) + past_length).unsqueeze(0).expand(rows, length)
    return index, torch.ones(rows, length, dtype=torch.bool, device=device)


def edit_slots(
    index: torch.Tensor, real: torch.Tensor, prompt_lengths: torch.Tensor, positions: Positions
) -> torch.Tensor:
    """The chunk column of each edit slot, [rows, first + last]; `length` (a scratch column) where none.

    Slots 0..first-1 are the first prompt tokens, the rest the last ones; each group is clamped to n // 2
    of the row's prompt length n. Tensor ops only: no host sync.
    """
    rows, length = index.shape
    n = prompt_lengths.to(index.device).long().reshape(rows, 1)
    half = n // 2
    k_first = torch.clamp(half, max=positions.first)
    k_last = torch.clamp(half, max=positions.last)
    first = torch.arange(positions.first, device=index.device).unsqueeze(0).expand(rows, -1)
    last = torch.arange(positions.last, device=index.device).unsqueeze(0).expand(rows, -1)
    target = torch.cat([first, n - k_last + last], dim=1)  # [rows, K] real-token indices to edit
    wanted = torch.cat([first < k_first, last < k_last], dim=1)
    match = (index.unsqueeze(1) == target.unsqueeze(2)) & real.unsqueeze(1)  # [rows, K, length]
    # Take the last matching column: with 4-D masks, left padding may repeat position 0 before the real token.
    column = length - 1 - match.flip(-1).to(torch.uint8).argmax(-1)
    hit = wanted & match.any(-1)
    return torch.where(hit, column, torch.full_like(column, length))


# -------------------------------------------------------------------------------------------- the stack
class ReftStack(nn.Module):
    """The interventions of every edited layer, and the hooks that apply them.

    Parameters are named `layers.<layer>.<group>.…` with group `tied` (one module for both position groups)
    or `first` / `last` (untied).
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        layers: list[int],
        positions: Positions,
        rank: int,
        tied: bool,
        intervention: str,
        dropout: float,
        act_fn: str,
    ):
        super().__init__()
        if positions.first == 0 and positions.last == 0:
            raise ValueError("positions edit nothing (f0/l0)")
        self.hidden_size = hidden_size
        self.positions = positions
        self.tied = tied
        self.rank = rank
        self.intervention = intervention
        self.dropout = dropout
        self.act_fn = act_fn
        cls = INTERVENTIONS[intervention]
        groups = self.group_names(positions, tied)
        self.layers = nn.ModuleDict(
            {
                str(layer): nn.ModuleDict(
                    {g: cls(hidden_size, rank, dropout=dropout, act_fn=act_fn) for g in groups}
                )
                for layer in layers
            }
        )
        self.enabled = True
        self._prompt_lengths: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None  # the current forward call's plan: [rows, K] columns
        self._shape: tuple[int, int] = (0, 0)  # (rows, length) of the call it was made for
        self._handles: list[Any] = []

    @staticmethod
    def group_names(positions: Positions, tied: bool) -> list[str]:
        if tied:
            return ["tied"]
        return [g for g, k in (("first", positions.first), ("last", positions.last)) if k > 0]

    @property
    def layer_indices(self) -> list[int]:
        return [int(k) for k in self.layers]

    def settings(self) -> dict[str, Any]:
        """What reft_config.json records about the interventions."""
        return {
            "hidden_size": self.hidden_size,
            "layers": self.layer_indices,
            "positions": _format_positions(self.positions),
            "rank": self.rank,
            "tied": self.tied,
            "type": self.intervention,
            "act_fn": self.act_fn,
            "dropout": self.dropout,
        }

    # ---- hooks
    def install(self, model: nn.Module) -> None:
        """Register the decoder pre-hook (plans the edits of each call) and one output hook per edited layer."""
        self.remove_hooks()
        decoder = model.get_decoder()
        blocks = decoder_layers(model)
        self._handles.append(decoder.register_forward_pre_hook(self._plan, with_kwargs=True))
        for key in self.layers:
            # a partial of a bound method (not a closure), so that a deep copy of the model edits with its copy
            self._handles.append(
                blocks[int(key)].register_forward_hook(functools.partial(self._edit_output, key))
            )

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def prompts(self, prompt_lengths: torch.Tensor) -> Iterator[None]:
        """Edit the rows of the enclosed forward calls at positions taken from these prompt lengths."""
        previous, self._prompt_lengths = self._prompt_lengths, prompt_lengths
        try:
            yield
        finally:
            self._prompt_lengths = previous

    @contextlib.contextmanager
    def off(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def _plan(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.enabled:
            self._slots = None
            return
        if self._prompt_lengths is None:
            raise RuntimeError(
                "ReFT interventions need each row's prompt length: run the model inside "
                "adapter.forward_context(model, batch) (or adapter.disabled(model) for the base model)"
            )
        inputs = kwargs.get("input_ids", args[0] if args else None)
        if inputs is None:
            inputs = kwargs["inputs_embeds"]
        rows, length = inputs.shape[0], inputs.shape[1]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        position_ids = kwargs.get("position_ids")
        cache = kwargs.get("past_key_values")
        past = 0
        if (mask is None or mask.dim() != 2) and position_ids is None and cache is not None:
            past = cache.get_seq_length()
        index, real = real_token_index(
            rows,
            length,
            attention_mask=mask,
            position_ids=position_ids,
            past_length=past,
            device=inputs.device,
        )
        self._slots = edit_slots(index, real, _expand_rows(self._prompt_lengths, rows), self.positions)
        self._shape = (rows, length)

    def _edit_output(self, key: str, _module: nn.Module, _args: Any, output: Any) -> Any:
        """Forward hook of decoder layer `key`: a Llama layer returns a tensor, older/other ones a tuple."""
        if not self.enabled or self._slots is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if tuple(hidden.shape[:2]) != self._shape:
            raise RuntimeError(
                f"ReFT: positions were planned for {self._shape}, layer {key} sees {tuple(hidden.shape[:2])}"
            )
        edited = self.edit(key, hidden, self._slots)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    def edit(self, key: str, hidden: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Edit `hidden` [rows, length, d] at the chunk columns in `slots` (`length` = nothing to edit)."""
        rows, length, d = hidden.shape
        padded = torch.cat([hidden, hidden.new_zeros(rows, 1, d)], dim=1)  # column `length`: scratch
        index = slots.unsqueeze(-1).expand(-1, -1, d)
        picked = padded.gather(1, index)  # [rows, K, d]
        groups = self.layers[key]
        if self.tied:
            values = groups["tied"](picked)
        else:
            parts = []
            if self.positions.first:
                parts.append(groups["first"](picked[:, : self.positions.first]))
            if self.positions.last:
                parts.append(groups["last"](picked[:, self.positions.first :]))
            values = torch.cat(parts, dim=1)
        return padded.scatter(1, index, values)[:, :length]


def _expand_rows(prompt_lengths: torch.Tensor, rows: int) -> torch.Tensor:
    """One prompt length per row of the call; generate() repeats each prompt's row for beams/samples."""
    count = prompt_lengths.shape[0]
    if rows == count:
        return prompt_lengths
    if count and rows % count == 0:
        return prompt_lengths.repeat_interleave(rows // count)
    raise RuntimeError(f"ReFT: a forward call over {rows} rows, but prompt lengths were given for {count}")


def _format_positions(p: Positions) -> str:
    return "+".join(s for s in (f"f{p.first}" if p.first else "", f"l{p.last}" if p.last else "") if s)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama-style `layers`, GPT-2-style `h`)."""
    decoder = model.get_decoder()
    for name in ("layers", "h", "blocks"):
        blocks = getattr(decoder, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def find_stack(model: nn.Module) -> ReftStack:
    """The ReftStack attached to `model` (looking through DDP-style `.module` wrappers)."""
    seen = model
    while True:
        stack = getattr(seen, ATTRIBUTE, None)
        if isinstance(stack, ReftStack):
            return stack
        if not hasattr(seen, "module"):
            raise ValueError(f"{type(model).__name__} has no ReFT interventions attached")
        seen = seen.module


def orthogonality_error(module: _Intervention) -> float:
    """max |R·Rᵀ − I|: 0 up to rounding for LoReFT."""
    r = module.rotation().detach().double()
    return float((r @ r.T - torch.eye(r.shape[0], dtype=r.dtype, device=r.device)).abs().max())
