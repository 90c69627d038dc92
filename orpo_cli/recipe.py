"""The recipe: one YAML file, validated by pydantic before any model is loaded.

Settings are grouped by concern (model, quantization, adapter, orpo, data, train). Every field carries a
one-line description: `--help`, `orpo-tune schema` and docs/recipe-reference.md all come from it.
Unknown keys are errors that name the YAML path and the nearest valid key (recipe_loading.py reads a file
and words the errors).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

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
    # Whether the method reads nothing per row, so pairs can be packed: declared here, once, for each kind (the
    # planner reads it without torch; the adapter's `packs_pairs` is this value).
    packs_pairs: ClassVar[bool] = True
    trains_base: ClassVar[bool] = False  # the base's own weights train (full fine-tuning); the adapter's is this
    kind: Literal["lora"] = Field("lora", description="Low-rank adapters on linear layers (PEFT).")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(
        32,
        gt=0,
        description="LoRA scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rslora).",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the LoRA input. Above 0 each adapted layer keeps its own dropped-out copy of its input "
        "for the backward pass and the LoRA update is no longer added in place (docs/performance.md).",
    )
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


_POSITIONS = re.compile(r"(?:f(\d+))?(?:\+?l(\d+))?")


def parse_reft_positions(spec: str) -> tuple[int, int]:
    """(K first, K last) of a ReFT position spec `fK`, `lK` or `fK+lK` (surrounding blanks ignored); ValueError
    otherwise. The one grammar: the recipe validates `adapter.positions` with it, the ReFT adapter parses with it."""
    text = spec.strip()
    match = _POSITIONS.fullmatch(text)
    if not text or match is None or text.startswith("+"):
        raise ValueError(f"'{text}' is not a position spec; use fK, lK or fK+lK, e.g. f1+l1")
    return int(match.group(1) or 0), int(match.group(2) or 0)


class ReftSettings(_Section):
    packs_pairs: ClassVar[bool] = False
    trains_base: ClassVar[bool] = False
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
        parse_reft_positions(v)
        return v.strip()

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
    packs_pairs: ClassVar[bool] = True
    trains_base: ClassVar[bool] = True
    kind: Literal["full"] = Field(
        "full",
        description="Full fine-tuning: no adapter, every weight trains (small models only). `none`, its old name, "
        "is accepted and read as full.",
    )


# The adapter methods, by `adapter.kind`: the one list. The recipe's union type, its description, its error
# texts, `init`'s section lookup and the recipe reference derive from it; orpo_cli.adapters maps each kind
# to its implementation.
ADAPTER_MODELS: dict[str, type[BaseModel]] = {
    "lora": LoraSettings,
    "reft": ReftSettings,
    "full": FullSettings,
}
ADAPTER_KINDS = tuple(ADAPTER_MODELS)
ADAPTER_KINDS_OR = f"{', '.join(ADAPTER_KINDS[:-1])} or {ADAPTER_KINDS[-1]}"  # "lora, reft or full"
OLD_ADAPTER_KINDS = {"none": "full"}  # names a kind had before, still read as the kind they name now

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
    answer: str | None = Field(
        None, description="Column holding the known right answer (text), if any: eval marks answers right or wrong."
    )
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
    speed_paths: Literal["auto", "off"] = Field(
        "auto",
        description="The step's speed paths (orpo_cli/kernels: fused RoPE, RMSNorm, SiLU product, recomputed "
        "activations, LoRA's in-place update, block attention): auto installs those verified for the device, "
        "dtype and model type (the run logs which, and RUN/speed_paths.json keeps it); off runs transformers' "
        "and PEFT's own code.",
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
    tensorboard: bool = Field(
        True,
        description="Write TensorBoard event files under the run directory; false takes tensorboard out of "
        "tracking.backends (the older switch, kept for existing recipes).",
    )


# ----------------------------------------------------------------------------------------- distributed

    @field_validator("speed_paths", mode="before")
    @classmethod
    def _off_as_yaml_reads_it(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false



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


# -------------------------------------------------------------------------------------------- tracking
# Each tracker is an optional extra: the package it needs and the extra that installs it.
TRACKER_PACKAGES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


class MlflowSettings(_Section):
    tracking_uri: str | None = Field(
        None,
        description="Where MLflow keeps runs: http(s)://HOST:PORT (an `mlflow server`), sqlite:///FILE.db or a "
        "directory; None: $MLFLOW_TRACKING_URI, else MLflow's default.",
    )


class WandbSettings(_Section):
    entity: str | None = Field(None, description="W&B team or user owning the project; None: your default.")
    mode: Literal["online", "offline"] | None = Field(
        None,
        description="online uploads as it trains (needs `wandb login` or WANDB_API_KEY); offline writes "
        "RUN/wandb/ for a later `wandb sync`; None: $WANDB_MODE, else online.",
    )


class TrackingSettings(_Section):
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where the run is tracked: tensorboard (RUN/tensorboard/), mlflow and/or wandb (each "
        "through its own client: pip install 'orpo-tune[mlflow]' / 'orpo-tune[wandb]'). [] for none.",
    )
    project: str = Field(
        "orpo-tune", description="The MLflow experiment and the W&B project the run is logged under."
    )
    run_name: str | None = Field(None, description="The tracked run's name; None: the recipe's name.")
    tags: list[str] = Field(
        default_factory=list,
        description="Tags of the tracked run: W&B tags as written; in MLflow KEY=VALUE sets tag KEY, a bare "
        "word sets it to true.",
    )
    artifacts: bool = Field(
        True,
        description="At the end, upload the adapter (the whole model for adapter kind full), the curves PNG and "
        "the eval table as artifacts of the tracked run.",
    )
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings, description="MLflow options.")
    wandb: WandbSettings = Field(default_factory=WandbSettings, description="Weights & Biases options.")

    @field_validator("backends")
    @classmethod
    def _installed_once(cls, v: list[str]) -> list[str]:
        from importlib.util import find_spec

        twice = sorted({b for b in v if v.count(b) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} listed twice; list each backend once")
        for backend in v:
            package, extra = TRACKER_PACKAGES.get(backend, (None, None))
            if package is not None and find_spec(package) is None:
                raise ValueError(
                    f"{backend} needs the Python package {package}, which is not installed: "
                    f"pip install 'orpo-tune[{extra}]' (or remove {backend} from the list)"
                )
        return v


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
        default_factory=LoraSettings, description=f"What trains: {ADAPTER_KINDS_OR}."
    )
    orpo: OrpoSettings = Field(default_factory=OrpoSettings, description="The ORPO objective.")
    data: DataSettings = Field(description="Preference data and its mapping (required: at least data.train).")
    train: TrainSettings = Field(default_factory=TrainSettings, description="Optimisation and bookkeeping.")
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings,
        description="Several GPUs or machines: strategy (ddp, fsdp, deepspeed) and processes per machine.",
    )
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings,
        description="Where runs are watched: TensorBoard, MLflow, Weights & Biases (docs/tracking.md).",
    )

    @model_validator(mode="before")
    @classmethod
    def _adapter_defaults_to_lora(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("adapter"), dict) and "kind" not in data["adapter"]:
            data = {**data, "adapter": {"kind": "lora", **data["adapter"]}}
        if isinstance(data, dict) and isinstance(data.get("adapter"), dict):
            kind = data["adapter"].get("kind")
            if isinstance(kind, str) and kind in OLD_ADAPTER_KINDS:  # an old recipe (recipe_loading says so)
                data = {**data, "adapter": {**data["adapter"], "kind": OLD_ADAPTER_KINDS[kind]}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.quantization.mode != "none" and isinstance(self.adapter, FullSettings):
            raise ValueError(
                "adapter.kind: full trains every weight and cannot train quantized weights; "
                "set quantization.mode: none or use a lora/reft adapter"
            )
        # train.tensorboard (the older switch) and tracking.backends say one thing in the resolved recipe.
        listed = "tensorboard" in self.tracking.backends
        if "tensorboard" in self.train.model_fields_set and self.train.tensorboard and not listed and (
            "backends" in self.tracking.model_fields_set
        ):
            raise ValueError(
                "train.tensorboard: true, but tracking.backends leaves tensorboard out; "
                "add tensorboard to tracking.backends (and drop train.tensorboard)"
            )
        if not self.train.tensorboard and listed:
            self.tracking.backends = [b for b in self.tracking.backends if b != "tensorboard"]
        if self.train.tensorboard and not listed:
            self.train.tensorboard = False
        return self

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data (aliases as in YAML), e.g. to save beside a run."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.resolved(), sort_keys=False, allow_unicode=True)


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
