"""A transformers causal LM (its weights, config and tokenizer) -> one GGUF file, and a PEFT LoRA -> a GGUF LoRA.

Written with the `gguf` package (llama.cpp's own Python library, gguf-py): its `GGUFWriter`, its architecture
tables (`MODEL_ARCH`, `get_tensor_name_map`: Hugging Face tensor names -> GGUF names), its quantizers
(`gguf.quants`) and its key names. What llama.cpp's convert_hf_to_gguf.py adds on top, and this module
does too, for the architectures it supports (see docs/dependencies.md for why not that script itself):

- Llama and Mistral: the rows of q_proj and k_proj permuted from Hugging Face's rotate-half RoPE layout to
  llama.cpp's interleaved one (`_permute`, the script's `LlamaModel.permute`); Qwen2 is NEOX RoPE in llama.cpp
  and keeps Hugging Face's layout;
- 1-D tensors (norms, biases) stay F32; a 2-D tensor whose rows do not split into the quant type's blocks
  falls back to F16, as the script does;
- the tokenizer as llama.cpp's "gpt2" (byte-level BPE) vocabulary: every id of the embedding (padding ids
  included), the added tokens as CONTROL (special) or USER_DEFINED, the merges and the special token ids
  through `gguf.SpecialVocab`, and the chat template given (the one the run trained with).

`quantize_like_gguf` gives the numbers a tensor holds once written and read back (quantized and dequantized
by the same library), so an export can be checked against the model it came from with those exact weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orpo_cli.errors import UserError

# --quant -> the GGUF tensor type of the 2-D weights; all of them are what gguf-py quantizes itself.
QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# transformers model_type -> (GGUF architecture, whether q/k rows are permuted to llama.cpp's RoPE layout).
_ARCHITECTURES = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}


def quant_type(name: str) -> Any:
    import gguf

    key = name.lower()
    if key not in QUANT_TYPES:
        raise UserError(f"--quant: {name!r} is not one of {', '.join(QUANT_TYPES)}")
    return gguf.GGMLQuantizationType[key.upper()]


def _file_type(name: str) -> Any:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        name, getattr(gguf.LlamaFileType, f"MOSTLY_{name.upper()}", None))


@dataclass(frozen=True)
class Architecture:
    model_type: str
    arch: Any  # gguf.MODEL_ARCH
    arch_name: str  # as the file names it ("llama", "qwen2")
    permute_qk: bool


def architecture_of(config: Any) -> Architecture:
    """The GGUF architecture of a transformers config, or one line saying why it cannot be written."""
    import gguf

    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise UserError(
            f"--format gguf: model type {model_type!r} is not supported by orpo-tune's GGUF writer (supported: "
            f"{', '.join(_ARCHITECTURES)}); export --format hf and convert that with llama.cpp's convert_hf_to_gguf.py"
        )
    rope_scaling = getattr(config, "rope_scaling", None) or {}
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default")) if isinstance(rope_scaling, dict) else None
    if kind not in (None, "default"):
        raise UserError(
            f"--format gguf: the model's RoPE scaling ({kind}) is not supported by orpo-tune's GGUF writer; export "
            "--format hf and convert that with llama.cpp's convert_hf_to_gguf.py"
        )
    arch_key, permute = _ARCHITECTURES[model_type]
    arch = getattr(gguf.MODEL_ARCH, arch_key)
    return Architecture(model_type, arch, gguf.MODEL_ARCH_NAMES[arch], permute)


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved pairs (convert_hf_to_gguf.py's permute)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _heads(config: Any) -> tuple[int, int]:
    heads = config.num_attention_heads
    return heads, getattr(config, "num_key_value_heads", None) or heads


def _tensor_type(qtype: Any, shape: tuple[int, ...]) -> Any:
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def gguf_tensor_names(model: torch.nn.Module, arch: Architecture) -> dict[str, str]:
    """Hugging Face parameter name -> GGUF tensor name, through gguf-py's tables; a name it lacks is an error."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = {}
    for hf_name in model.state_dict():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output when there is no output.weight
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"--format gguf: the {arch.arch_name} tables of the gguf package have no name for "
                            f"tensor {hf_name}; export --format hf instead")
        out[hf_name] = gguf_name
    return out


def _gguf_array(hf_name: str, tensor: torch.Tensor, config: Any, arch: Architecture) -> np.ndarray:
    data = tensor.detach().float().cpu().numpy()
    if arch.permute_qk:
        heads, kv_heads = _heads(config)
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
    return data


def quantize_like_gguf(tensor: torch.Tensor, quant: str) -> torch.Tensor:
    """`tensor` as a GGUF file of quant type `quant` holds it: quantized and dequantized by gguf-py (exact)."""
    import gguf

    qtype = _tensor_type(quant_type(quant), tuple(tensor.shape))
    data = tensor.detach().float().cpu().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return torch.from_numpy(data.copy())
    if qtype == gguf.GGMLQuantizationType.F16:
        return torch.from_numpy(data.astype(np.float16).astype(np.float32))
    back = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32).reshape(data.shape))


@dataclass
class WrittenGguf:
    path: Path
    tensors: int
    fallback_f16: list[str]  # 2-D tensors kept in F16 because their rows do not split into the type's blocks


def write_model_gguf(
    path: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    tokenizer_dir: Path,
    *,
    quant: str,
    name: str,
    chat_template: str | None,
    tensor_hook: Any = None,
) -> WrittenGguf:
    """Write `model` (fp32 weights in memory) with `tokenizer` to `path` as GGUF of type `quant`.

    `tensor_hook(gguf_name, array) -> array`, tests only: changes a tensor on its way to the file (the
    deliberately wrong conversions the export's checks must catch).
    """
    import gguf

    config = model.config
    arch = architecture_of(config)
    qtype = quant_type(quant)
    names = gguf_tensor_names(model, arch)
    writer = gguf.GGUFWriter(str(path), arch.arch_name)
    heads, kv_heads = _heads(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or _rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, tokenizer_dir, config.vocab_size, chat_template)

    state = model.state_dict()
    fallback = []
    for hf_name, gguf_name in names.items():
        data = _gguf_array(hf_name, state[hf_name], config, arch)
        if tensor_hook is not None:
            data = tensor_hook(gguf_name, data)
        ttype = _tensor_type(qtype, data.shape)
        if ttype != qtype and data.ndim >= 2:
            fallback.append(gguf_name)
        if ttype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif ttype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, ttype), raw_dtype=ttype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return WrittenGguf(Path(path), len(names), fallback)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def _add_tokenizer(writer: Any, tokenizer: Any, tokenizer_dir: Path, n_vocab: int, chat_template: str | None) -> None:
    """llama.cpp's "gpt2" vocabulary from a byte-level BPE tokenizer (convert_hf_to_gguf.py's get_vocab_base)."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = backend.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise UserError("--format gguf: the tokenizer is not a byte-level BPE (GPT-2 style), the one vocabulary "
                        "orpo-tune's GGUF writer handles; export --format hf and convert that with llama.cpp's "
                        "convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # Merges, special token ids and the add-BOS/EOS flags as gguf-py reads them from the saved tokenizer.
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
    # llama.cpp adds BOS itself only where the tokenizer does (orpo-tune's `bos_for`): where the chat
    # template writes it, an added one would double it.
    ids = tokenizer("a")["input_ids"]
    special.add_special_token = {"bos": bool(ids) and ids[0] == tokenizer.bos_token_id, "eos": False}
    special.chat_template = chat_template  # the run's, not whatever the tokenizer directory holds
    special.add_to_gguf(writer, quiet=True)


def _pre_tokenizer(backend: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: "gpt-2" for the GPT-2 regex of a plain ByteLevel.

    Others are named by llama.cpp's convert script from a hash of sample tokenizations; orpo-tune writes
    "default" for them, and the export's runtime check compares llama.cpp's tokenization of the probe prompts
    with the run's tokenizer, so a mismatch fails the export rather than going unnoticed.
    """
    pre = backend.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"


# ------------------------------------------------------------------------------------------- LoRA
def write_lora_gguf(
    path: Path,
    model: torch.nn.Module,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    alpha: float,
    name: str,
) -> int:
    """Write a LoRA as llama.cpp's GGUF adapter (convert_lora_to_gguf.py's layout): for each adapted weight
    `NAME.weight.lora_a` (r x in) and `NAME.weight.lora_b` (out x r) in F32, `adapter.lora.alpha` = `alpha`
    (llama.cpp scales the product by alpha / r). `lora`: Hugging Face weight name -> (A, B). Returns the
    number of adapted weights."""
    import gguf

    config = model.config
    arch = architecture_of(config)
    names = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    for hf_name, (a, b) in lora.items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"--adapter-only: the gguf package's {arch.arch_name} tables have no name for {hf_name}")
        b_data = _gguf_array(hf_name, b, config, arch)  # q/k: B's rows are the weight's rows, permuted alike
        writer.add_tensor(f"{gguf_name}.lora_a", a.detach().float().cpu().numpy())
        writer.add_tensor(f"{gguf_name}.lora_b", b_data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(lora)
