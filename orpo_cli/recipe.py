"""The recipe: one YAML file, validated by pydantic before any model is loaded.

Settings are grouped by concern (model, quantization, adapter, orpo, data, train). Every field carries a
one-line description: `--help`, `orpo-tune schema` and docs/recipe-reference.md all come from it.
Unknown keys are errors that name the YAML path and the nearest valid key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orpo_cli.errors import UserError

# model.name_or_path and a data source's path name a built-in model or data set as builtin:NAME
BUILTIN_PREFIX = "builtin:"


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` mean nothing in any field of a recipe (an infinite lr trains
    # until the loss is NaN), so every float field refuses them.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True, allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------- model
class ModelSettings(_Section):
    name_or_path: str = Field(
        description="Base model: a hub id (e.g. mistralai/Mistral-7B-v0.1), a local directory, or builtin:NAME "
        "(builtin:tiny-llama trains on a CPU). Every recipe names it.",
    )
    revision: str | None = Field(
        None, description="Hub revision (branch, tag or commit) to load; None for the default."
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto",
        description="Weight dtype: auto picks bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.",
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention kernel passed to transformers."
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model repository to run its own Python code. Off unless you trust it."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: auto uses CUDA when available, else the CPU."
    )


class QuantizationSettings(_Section):
    mode: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Quantize the frozen base weights with bitsandbytes: none, 4bit (QLoRA) or 8bit."
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type: nf4 (QLoRA's NormalFloat) or fp4."
    )
    double_quant: bool = Field(
        True, description="Also quantize the 4-bit quantization constants (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Dtype the 4-bit matmuls compute in; auto follows model.dtype."
    )


# --------------------------------------------------------------------------------------------- adapter
class LoraSettings(_Section):
    kind: Literal["lora"] = Field("lora", description="Low-rank adapters on linear layers (PEFT).")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(
        32,
        gt=0,
        description="LoRA scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora).",
    )
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]) or all-linear for every linear layer but the head.",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling alpha/sqrt(r).")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list) and not v:
            raise ValueError("must name at least one module, or be all-linear")
        return v


_POSITIONS = re.compile(r"^(f\d+)?(\+?l\d+)?$")


class ReftSettings(_Section):
    kind: Literal["reft"] = Field(
        "reft", description="Representation fine-tuning (LoReFT and variants) on the residual stream."
    )
    layers: list[int] | Literal["all"] = Field(
        "all", description="Decoder layers whose output is edited (0-based), or all."
    )
    positions: str = Field(
        "f1+l1", description="Prompt positions edited: fK (first K tokens), lK (last K), or fK+lK."
    )
    rank: int = Field(4, ge=1, description="Rank r of the low-rank subspace.")
    tied: bool = Field(
        True, description="Share one intervention between the first and last positions of a layer."
    )
    intervention: Literal["loreft", "noreft", "direft"] = Field(
        "loreft",
        description="loreft: orthonormal R; noreft: R without orthogonality; direft: h + Rᵀ act(Wh+b).",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the intervention's output.")
    act_fn: Literal["linear", "relu", "gelu", "tanh", "silu"] = Field(
        "linear", description="Activation applied to Wh + b."
    )

    @field_validator("positions")
    @classmethod
    def _check_positions(cls, v: str) -> str:
        v = v.strip()
        if not v or not _POSITIONS.match(v) or v.startswith("+"):
            raise ValueError(f"'{v}' is not a position spec; use fK, lK or fK+lK, e.g. f1+l1")
        return v

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list):
            if not v:
                raise ValueError("name at least one layer, or all")
            if any(i < 0 for i in v):
                raise ValueError("layer indices start at 0")
            if len(set(v)) != len(v):
                raise ValueError("a layer is listed twice")
        return v


class FullSettings(_Section):
    kind: Literal["none"] = Field("none", description="No adapter: train every weight (small models only).")


# The adapter methods, by `adapter.kind`: the one list. The recipe's union type, its description, its error
# texts, `init`'s section lookup and the recipe reference derive from it; orpo_cli.adapters maps each kind
# to its implementation.
ADAPTER_MODELS: dict[str, type[BaseModel]] = {
    "lora": LoraSettings,
    "reft": ReftSettings,
    "none": FullSettings,
}
ADAPTER_KINDS = tuple(ADAPTER_MODELS)
_KINDS_OR = f"{', '.join(ADAPTER_KINDS[:-1])} or {ADAPTER_KINDS[-1]}"  # "lora, reft or none"

AdapterSettings = Annotated[Union[tuple(ADAPTER_MODELS.values())], Field(discriminator="kind")]  # noqa: UP007


# ------------------------------------------------------------------------------------------------ orpo
class OrpoSettings(_Section):
    lam: float = Field(
        0.1,
        ge=0,
        alias="lambda",
        validation_alias=AliasChoices("lambda", "beta"),
        description="λ, the weight of the odds-ratio term (paper default 0.1). `beta` (TRL's name) is accepted as an alias.",
    )
    max_length: int = Field(
        1024, ge=2, description="Longest prompt + response in tokens; longer pairs are truncated."
    )
    max_prompt_length: int = Field(
        512, ge=1, description="Longest prompt in tokens; longer prompts lose their left part."
    )
    nll_on_prompt: bool = Field(
        False,
        description="Take the NLL over prompt and response tokens as TRL does (the paper: response only).",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_name_for_lambda(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lambda" in data and "beta" in data:
            raise ValueError("give either `lambda` or its alias `beta`, not both")
        return data

    @model_validator(mode="after")
    def _prompt_fits(self) -> OrpoSettings:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length ({self.max_length})"
            )
        return self


# ------------------------------------------------------------------------------------------------ data
class DataSource(_Section):
    path: str = Field(
        description="A local .jsonl/.json/.csv/.parquet file (or .gz of the text ones), builtin:NAME, or a hub dataset id."
    )
    split: str = Field("train", description="Split to read when path is a hub dataset.")
    subset: str | None = Field(None, description="Hub dataset configuration name, if it has several.")
    max_rows: int | None = Field(None, ge=1, description="Read at most this many rows (for quick tries).")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"path": data} if isinstance(data, str) else data


class ColumnMap(_Section):
    prompt: str = Field(
        "prompt", description="Column holding the prompt (pairs, one_to_many, optional in conversational)."
    )
    chosen: str = Field(
        "chosen", description="Column holding the preferred response (a string or message list)."
    )
    rejected: str = Field("rejected", description="Column holding the dispreferred response.")
    system: str | None = Field(None, description="Column holding a per-row system prompt, if any.")
    conversations: str = Field(
        "conversations", description="Column holding the ShareGPT conversation (sharegpt format)."
    )


class DataSettings(_Section):
    train: DataSource = Field(
        description="Training data: a local file, a hub dataset id, or builtin:demo (a path, or a mapping "
        "with path/split/subset/max_rows). Every recipe names it."
    )
    eval: DataSource | None = Field(
        None, description="Held-out data; when absent, eval_ratio of train is split off with data.seed."
    )
    format: Literal["pairs", "conversational", "implicit", "sharegpt", "one_to_many"] = Field(
        "pairs",
        description="pairs: prompt/chosen/rejected strings; conversational: message lists; implicit: "
        "whole transcripts sharing a prompt prefix (HH-RLHF); sharegpt: conversations+chosen/rejected; "
        "one_to_many: answer lists joined by a separator (TruthfulQA).",
    )
    columns: ColumnMap = Field(
        default_factory=ColumnMap, description="Where each field lives in the dataset."
    )
    prompt_template: str | None = Field(
        None, description="Build the prompt from columns with {column} placeholders, e.g. 'Q: {question}'."
    )
    system_prompt: str | None = Field(None, description="A system message put before every prompt.")
    chat_template: str = Field(
        "auto",
        description="auto: the tokenizer's chat template if it has one, else plain text; none: plain text; "
        "or a Jinja template string.",
    )
    separator: str = Field(";", description="one_to_many: separator between answers inside one field.")
    pairing: Literal["zip", "all"] = Field(
        "zip",
        description="one_to_many: zip answers to the shorter list, or all chosen×rejected combinations.",
    )
    max_pairs_per_row: int = Field(
        8, ge=1, description="one_to_many with pairing=all: cap on pairs from one row."
    )
    eval_ratio: float = Field(
        0.1, ge=0, lt=1, description="Share of train held out for eval when no eval source is given."
    )
    seed: int = Field(42, description="Seed of the train/eval split and shuffling.")


# ----------------------------------------------------------------------------------------------- train
class TrainSettings(_Section):
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    micro_batch_size: int = Field(2, ge=1, description="Preference pairs per forward pass per device.")
    gradient_accumulation: int = Field(4, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(8e-6, gt=0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "inverse_sqrt"] = Field(
        "cosine", description="Learning-rate schedule after warmup (transformers.get_scheduler)."
    )
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps with linear warmup from 0.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides warmup_ratio.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw", description="adamw (torch) or a bitsandbytes 8-bit / paged AdamW."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="Clip the gradient norm to this; null to disable."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast dtype; auto follows the model dtype on GPU and is off on CPU."
    )
    eval_batch_size: int | None = Field(
        None, ge=1, description="Pairs per eval forward; defaults to micro_batch_size."
    )
    log_every: int = Field(10, ge=1, description="Log training metrics every N optimizer steps.")
    eval_every: int | None = Field(
        100, ge=1, description="Evaluate every N steps (and at step 0 and the end); null: only at the ends."
    )
    save_every: int | None = Field(
        200, ge=1, description="Checkpoint every N steps (and at the end); null: only at the end."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest N checkpoints.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files under the run directory.")


# ----------------------------------------------------------------------------------------- distributed
class FsdpSettings(_Section):
    sharding_strategy: Literal["full_shard", "shard_grad_op", "hybrid_shard", "no_shard"] = Field(
        "full_shard",
        description="full_shard: weights, gradients and optimizer state sharded (ZeRO-3-like); shard_grad_op: "
        "gradients and optimizer state only (ZeRO-2-like); hybrid_shard: full_shard inside a machine, "
        "replicated across machines; no_shard: plain data parallel.",
    )
    auto_wrap: Literal["decoder_layers", "none"] = Field(
        "decoder_layers",
        description="decoder_layers: one FSDP unit per decoder layer (and per trainable adapter module); "
        "none: one unit for the whole model.",
    )
    cpu_offload: bool = Field(
        False, description="Keep the sharded parameters (and their gradients) in CPU memory between uses."
    )


class DeepSpeedSettings(_Section):
    zero_stage: Literal[2, 3] = Field(
        2,
        description="ZeRO stage: 2 shards gradients and optimizer state; 3 also shards the weights "
        "(not with quantized weights).",
    )
    offload_optimizer: bool = Field(
        False, description="Keep the optimizer state in CPU memory and step it there (ZeRO-Offload)."
    )


class DistributedSettings(_Section):
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto",
        description="How several processes share the work: auto (ddp when there are several, nothing for "
        "one), ddp, fsdp or deepspeed. Mixed precision is train.mixed_precision.",
    )
    num_processes: Literal["auto"] | int = Field(
        "auto",
        description="Processes per machine (one per GPU): auto uses every visible GPU (1 on CPU), or what "
        "torchrun/accelerate launch started; N launches N (--nproc N sets it).",
    )
    fsdp: FsdpSettings = Field(
        default_factory=FsdpSettings, description="FSDP options (used when strategy is fsdp)."
    )
    deepspeed: DeepSpeedSettings = Field(
        default_factory=DeepSpeedSettings, description="DeepSpeed options (used when strategy is deepspeed)."
    )

    @field_validator("num_processes", mode="before")
    @classmethod
    def _auto_or_positive(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("must be auto or a whole number of processes >= 1")


# ---------------------------------------------------------------------------------------------- recipe
class Recipe(_Section):
    name: str | None = Field(None, description="Run name; defaults to the recipe file's name.")
    output_dir: str | None = Field(None, description="Run directory; defaults to runs/<name>.")
    seed: int = Field(42, description="Seed for model init, dropout and data order.")
    model: ModelSettings = Field(description="The base model (required: at least model.name_or_path).")
    quantization: QuantizationSettings = Field(
        default_factory=QuantizationSettings, description="bitsandbytes quantization of the base."
    )
    adapter: AdapterSettings = Field(
        default_factory=LoraSettings, description=f"What trains: {_KINDS_OR}."
    )
    orpo: OrpoSettings = Field(default_factory=OrpoSettings, description="The ORPO objective.")
    data: DataSettings = Field(description="Preference data and its mapping (required: at least data.train).")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Optimisation and bookkeeping.")
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings,
        description="Several GPUs or machines: strategy (ddp, fsdp, deepspeed) and processes per machine.",
    )

    @model_validator(mode="before")
    @classmethod
    def _adapter_defaults_to_lora(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("adapter"), dict) and "kind" not in data["adapter"]:
            data = {**data, "adapter": {"kind": "lora", **data["adapter"]}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.quantization.mode != "none" and isinstance(self.adapter, FullSettings):
            raise ValueError(
                "adapter.kind: none trains every weight and cannot train quantized weights; "
                "set quantization.mode: none or use a lora/reft adapter"
            )
        return self

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data (aliases as in YAML), e.g. to save beside a run."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem becomes one UserError line per issue."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give the recipe's YAML file")
    if not path.is_file():
        raise UserError(f"{path}: no such recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the recipe as UTF-8") from None
    data = parse_yaml(text, str(path))
    empty = data is None  # no text, or only comments
    if empty:
        data = {}
    if not isinstance(data, dict):
        raise UserError(
            f"{path}: a recipe is a YAML mapping of sections (model:, data:, train:, ...), not {type(data).__name__}"
        )
    data = apply_overrides(data, overrides or [])
    data.setdefault("name", path.stem)
    try:
        return validate_recipe(data, source=str(path))
    except UserError:
        if not empty:
            raise
        raise UserError(
            f"{path}: the recipe is empty; it needs at least model.name_or_path and data.train "
            "(`orpo-tune init` writes a complete starter)"
        ) from None


def validate_recipe(data: dict[str, Any], source: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError("\n".join(f"{source}: {line}" for line in describe_errors(err))) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars) to a nested mapping."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set train.lr=1e-5")
        try:
            value = parse_yaml(raw, f"--set {item!r}") if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise UserError(
                    f"--set {item!r}: {'.'.join(parts[: depth + 1])} is a value ({child!r}), not a section; "
                    "write it as a mapping in the recipe to override its keys"
                )
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def parse_yaml(text: str, source: str) -> Any:
    """`yaml.safe_load`, but a key given twice in one mapping is an error naming both lines.

    PyYAML keeps the last of two equal keys without a word: a second `train:` section silently replaces the
    first whole, dropping every key set there. Merge keys (`<<: *anchor`) may still be overridden.
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except yaml.YAMLError as err:
            if source.startswith("--set"):
                raise
            raise UserError(_yaml_error_line(Path(source), err)) from None
        if node is None:
            return None
        _refuse_duplicate_keys(node, source, [], set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_duplicate_keys(node: yaml.Node, source: str, where: list[str], seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                _refuse_duplicate_keys(value_node, source, where, seen)
                continue
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in first:
                dotted = ".".join([*where, key])
                line, again = first[key].start_mark.line + 1, key_node.start_mark.line + 1
                raise UserError(
                    f"{source}:{again}: duplicate key `{dotted}` (also on line {line}); YAML would keep only the "
                    "last one and drop the other without a word: merge them into one"
                )
            if key is not None:
                first[key] = key_node
            _refuse_duplicate_keys(value_node, source, [*where, key or "?"], seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            inner = [*where[:-1], f"{where[-1]}[{i}]"] if where else [f"[{i}]"]
            _refuse_duplicate_keys(item, source, inner, seen)


def _yaml_error_line(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None:
        return f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {problem}"
    return f"{path}: invalid YAML: {problem}"


# ------------------------------------------------------------------------------------- error messages
def describe_errors(err: ValidationError) -> list[str]:
    """One line per problem: the YAML path, what is wrong, and for unknown keys the nearest valid one."""
    lines = []
    for e in err.errors():
        fields, model = _walk(e["loc"])
        where = ".".join(fields) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent, key = fields[:-1], fields[-1] if fields else ""
            valid = _valid_keys(model)
            hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            prefix = ".".join(parent)
            suggestion = f"; did you mean `{prefix + '.' if prefix else ''}{hint[0]}`?" if hint else ""
            known = f" (valid keys here: {', '.join(valid)})" if not hint and valid else ""
            lines.append(f"{where}: unknown key{suggestion}{known}")
            continue
        if e["type"] == "missing":
            lines += _missing(fields, model)
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "finite_number":
            msg = "must be a finite number; .inf and .nan mean nothing in a recipe"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown kind {e['input'].get('kind')!r}; use one of {', '.join(ADAPTER_KINDS)}"
        elif e["type"] == "union_tag_not_found":
            msg = f"needs a `kind:` ({_KINDS_OR})"
        value = e.get("input")
        shown = (
            ""
            if isinstance(value, dict) or e["type"] in {"missing", "union_tag_invalid"}
            else f" (got {value!r})"
        )
        lines.append(f"{where}: {msg}{shown}")
    return lines


def _missing(fields: list[str], holder: type[BaseModel] | None) -> list[str]:
    """A required key, or a section holding required keys, that the recipe does not give: one line per key."""
    key = fields[-1] if fields else ""
    section = section_model(holder, key) if holder is not None else None
    info = holder.model_fields.get(key) if holder is not None else None
    if section is None or section is DataSource:  # a data source may be given as one string
        what = f" ({info.description})" if info is not None and info.description else ""
        return [f"{'.'.join(fields)}: required and missing{what}"]
    lines = []
    for name, sub in section.model_fields.items():
        if sub.is_required():
            lines += _missing([*fields, sub.alias or name], section)
    return lines


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """Turn pydantic's error location into YAML keys, dropping union tags; return the model holding the last key."""
    fields: list[str] = []
    model: type[BaseModel] | None = Recipe
    holder: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            fields[-1] = f"{fields[-1]}[{part}]" if fields else f"[{part}]"
            continue
        if model is None:
            fields.append(str(part))
            continue
        if part in ADAPTER_MODELS and fields and fields[-1] == "adapter":
            model = ADAPTER_MODELS[part]
            continue
        holder = model
        fields.append(str(part))
        model = section_model(model, str(part))
    return fields, holder


def section_model(model: type[BaseModel], key: str) -> type[BaseModel] | None:
    """The pydantic model of the section `key` of `model` (by field name or alias), or None for a plain value."""
    for name, info in model.model_fields.items():
        if key in {name, info.alias}:
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                return ann
            for arg in getattr(ann, "__args__", ()):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    return arg
            return None
    return None


def _valid_keys(model: type[BaseModel] | None) -> list[str]:
    if model is None:
        return []
    return [info.alias or name for name, info in model.model_fields.items()]
