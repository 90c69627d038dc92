"""Loading the base model and tokenizer: device, dtype, bitsandbytes quantization, hub or local or builtin."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from orpo_cli.errors import UserError, stage
from orpo_cli.models.builtin import check_builtin, is_builtin, resolve_model_path
from orpo_cli.recipe import ModelSettings, QuantizationSettings

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(setting: str) -> torch.device:
    """The training device for `model.device`; asking for CUDA where there is none is a user error."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError(
                "model.device: cuda requested but no CUDA GPU is visible; set model.device: cpu (or auto)"
            )
        index = int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if setting != "auto":
        return _DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@stage("checking model.name_or_path")
def check_model_source(settings: ModelSettings) -> None:
    """Cheap check before anything heavy: a local-looking path must exist."""
    name = settings.name_or_path
    if is_builtin(name):
        check_builtin(name)  # a known name, its package installed; the (slow) first build waits for the load
        return
    if _looks_local(name) and not Path(name).expanduser().is_dir():
        raise UserError(f"model.name_or_path: no such model directory: {name}")


def check_quantization(quant: QuantizationSettings, device: torch.device) -> None:
    """bitsandbytes must be importable and support the device before a model is loaded."""
    if quant.mode == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # an import failure of a native library can be any exception
        raise UserError(
            f"quantization.mode: {quant.mode} needs bitsandbytes, which failed to load ({err.__class__.__name__}: "
            f"{err}); install it with `pip install bitsandbytes` or set quantization.mode: none"
        ) from None
    if quant.mode == "8bit" and device.type == "cpu":
        raise UserError(
            "quantization.mode: 8bit needs a CUDA GPU (bitsandbytes' int8 matmul has no CPU training path); "
            "use 4bit, or quantization.mode: none on a CPU"
        )


def quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, deprecation notices) out of what the user reads."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for module in ("transformers", "peft", "accelerate", "torch.utils.checkpoint"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


@stage("loading the tokenizer", blame="model.name_or_path")
def load_tokenizer(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The tokenizer, with a pad token guaranteed (the EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    quiet_libraries()
    path = resolve_model_path(name_or_path)
    tokenizer = _from_pretrained(
        AutoTokenizer.from_pretrained,
        name_or_path,
        path,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@stage("loading the model", blame="model")
def load_model(
    settings: ModelSettings,
    quant: QuantizationSettings,
    device: torch.device,
    dtype: torch.dtype,
    quant_storage: torch.dtype | None = None,
) -> torch.nn.Module:
    """The base causal LM on `device`, quantized with bitsandbytes when asked.

    `quant_storage` stores packed 4-bit weights in that dtype (FSDP flattens a unit's weights into one
    tensor, so they must share the dtype of the rest of the model); None keeps bitsandbytes' uint8.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_libraries()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": settings.attn_implementation,
        "revision": settings.revision,
        "trust_remote_code": settings.trust_remote_code,
    }
    if quant.mode != "none":
        compute = dtype if quant.compute_dtype == "auto" else _DTYPES[quant.compute_dtype]
        if quant.mode == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant.quant_type,
                bnb_4bit_use_double_quant=quant.double_quant,
                bnb_4bit_compute_dtype=compute,
                **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    path = resolve_model_path(settings.name_or_path)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, settings.name_or_path, path, **kwargs)
    if quant.mode == "none":
        model.to(device)
    if quant.mode == "4bit":
        keep_4bit_weights_unpacked(model)
    model.config.use_cache = False
    return model


def keep_4bit_weights_unpacked(model: torch.nn.Module) -> int:
    """Keep every 4-bit layer in the one weight format that both training and eval read correctly.

    On a CPU with AVX512-BF16, bitsandbytes (0.49 and later) rewrites a `Linear4bit` weight in place into a
    packed inference layout the first time the layer runs in eval mode without grad, and converts it back
    only when the state dict is saved. Two things break: the conversion asserts that the layer's output
    width is a multiple of 32 (SmolLM2's 1536 is, the built-ins' 344 and llama2.c's 172 are not), and once a
    layer is packed, the backward of every later training step reads the packed bytes as NF4 and gradients
    stop flowing through that matmul (measured: layer 0's LoRA gradient 1000x too small after one eval).
    orpo-tune evaluates between training steps, so the packed path is never safe for us: the layers keep
    the standard layout, on which bitsandbytes' dequantize-then-matmul is exact in forward and backward.
    Returns how many layers were set (0 without bitsandbytes or 4-bit layers).
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:  # no bitsandbytes: nothing can be packed
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the flag Linear4bit.forward checks before packing
            n += 1
    return n


def model_name(model: torch.nn.Module) -> str:
    """The name a user knows the model by: builtin:NAME for a built-in, else its hub id or path."""
    from orpo_cli.models.builtin import list_builtins
    from orpo_cli.recipe import BUILTIN_PREFIX

    path = str(getattr(getattr(model, "config", None), "name_or_path", "") or "the model")
    folder = Path(path)
    if folder.parent.name == "builtin":
        known = [name for name in list_builtins() if folder.name.startswith(f"{name}-")]
        if known:
            return BUILTIN_PREFIX + max(known, key=len)
    return path


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _from_pretrained(loader: Any, name: str, path: str, **kwargs: Any) -> Any:
    """Call a from_pretrained, turning 'cannot reach or find it' into one line that says what to do, and weights
    whose shapes differ from the config into one line naming the tensor and both shapes."""
    try:
        return loader(path, **kwargs)
    except RuntimeError as err:
        mismatch = shape_mismatch(Path(path), kwargs.get("trust_remote_code", False)) if _mismatched(err) else None
        if mismatch is None:
            raise
        raise UserError(f"model.name_or_path: {name}: {mismatch}") from None
    except (OSError, ValueError) as err:
        if Path(path).expanduser().is_dir():
            first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
            raise UserError(f"model.name_or_path: could not load {name}: {first}") from None
        raise UserError(
            f"model.name_or_path: could not load '{name}' from the Hugging Face hub (offline, or no such model); "
            "download it (e.g. `hf download NAME --local-dir DIR`) and set model.name_or_path: DIR"
        ) from None


def _mismatched(err: BaseException) -> bool:
    """transformers' refusal of weights whose shapes differ from the model its config builds (the details go to a
    log report that names no tensor in the exception itself)."""
    text = str(err)
    return "ignore_mismatched_sizes" in text or "size mismatch" in text


def shape_mismatch(path: Path, trust_remote_code: bool = False) -> str | None:
    """'TENSOR is [a, b] in FILE but [c, d] by config.json (and N more)' for a model directory whose safetensors
    weights do not fit the model its config.json builds; None when none is found (other key names, no files).
    Reads only the safetensors headers and builds the model on the meta device: no weights are loaded."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    try:
        from accelerate import init_empty_weights
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        expected = {key: list(value.shape) for key, value in model.state_dict().items()}
        found = []
        for file in files:
            with safe_open(str(file), "pt") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                    want = next((expected[k] for k in (key, f"model.{key}", key.removeprefix("model."))
                                 if k in expected), None)
                    have = list(weights.get_slice(key).get_shape())
                    if want is not None and want != have:
                        found.append((key, have, want, file.name))
    except Exception:  # this only words an error already raised: never a second one
        return None
    if not found:
        return None
    key, have, want, file = found[0]
    more = f" (and {len(found) - 1} more tensors)" if len(found) > 1 else ""
    return (
        f"the weights do not fit its config.json: {key} is {have} in {file} but {want} by config.json{more}; the "
        "weights and config.json must come from the same model (was config.json edited or replaced?)"
    )
