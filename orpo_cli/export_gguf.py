"""`orpo-tune export RUN --format gguf`: the merged model (or, with --adapter-only, the base and the LoRA) as GGUF
for llama.cpp, Ollama and LM Studio, checked in two readers before anything appears at --out.

1. The merge, as for the Hugging Face export (export.merge_verified: fp32 merge vs base + adapter).
2. The file written by orpo_cli/gguf_conversion.py into a temporary sibling of --out.
3. Read back by an independent reader, transformers' GGUF loader: its logits on the probe prompts vs the merged
   model with every weight quantized to --quant in memory (gguf-py's quantizer, the numbers the file holds),
   within the merge's tolerance (10 x the model's fp32 noise floor); a wrong tensor, name, RoPE layout or
   hyper-parameter moves them by far more. What the quant type itself costs (the quantized model vs base +
   adapter) is measured and reported, as the HF export reports its rounding.
4. Run in llama.cpp (llama-cpp-python): its tokenization of the probe prompts must be the run's tokenizer's;
   along the merged model's own greedy answers (teacher-forced), llama.cpp's argmax must be the same token or
   within `runtime_tolerance` of it, and its logits within that tolerance of the quantized model's (a share of
   the largest |logit| set per quant type); its greedy answers must equal the quantized model's for f32, f16 and
   bf16, and are compared with the fp32 merge's (reported) for every type.
5. --adapter-only: the base GGUF + the GGUF LoRA, applied by llama.cpp at load, vs the merged GGUF in llama.cpp.

A ReFT run is refused (an intervention edits activations, not weights). Beside the GGUF: an Ollama Modelfile, a
model card README.md, the resolved recipe and the tokenizer (`generate` renders prompts with it).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orpo_cli import __version__
from orpo_cli.adapters import Adapter, NoAdapter
from orpo_cli.atomic import atomic_dir
from orpo_cli.errors import RunFailed, UserError
from orpo_cli.export_checks import MERGE_TOLERANCE_FACTOR, diff_stats, max_abs_diff, probe_logits
from orpo_cli.gguf_conversion import architecture_of, quant_type, quantize_like_gguf
from orpo_cli.models.tuned import EXPORT_RECIPE, GGUF_MANIFEST, check_trained, read_recipe
from orpo_cli.progress import Reporter
from orpo_cli.recipe import Recipe
from orpo_cli.rundir import RunDir

GGUF_FORMAT = "orpo-tune-gguf"
DEFAULT_QUANT = "f16"
_GREEDY_TOKENS = 24
# llama.cpp computes with other numerics than torch: an F16 KV cache, and with bf16 or quantized weights the
# activations rounded to bf16 or quantized to 8 bits inside the dot products. Its logits on the probes may differ
# from those of the model the file holds (the same weights, run by torch in fp32) by at most this share of that
# model's largest |logit|; where its top token along the model's greedy answer differs, the two tokens' logits
# may differ by no more than that either. Set from the real SmolLM2-135M (docs/export-and-serving.md) with room:
# a wrong file (a swapped tensor, a wrong RoPE base) moves the logits by about their whole size.
_RUNTIME_RTOL = {"f32": 0.02, "f16": 0.02, "bf16": 0.05, "q8_0": 0.15, "q5_1": 0.25, "q5_0": 0.25, "q4_1": 0.3,
                 "q4_0": 0.3}
_STRICT_GREEDY = ("f32", "f16", "bf16")  # free-running greedy answers must agree token for token
_REFT_REFUSAL = ("--format gguf: a {kind} adapter edits activations, not weights, so no GGUF (merged or LoRA) "
                 "can hold it; export without --format gguf for the bundle `orpo-tune generate` runs")


def runtime_tolerance(quant: str, logits: list[torch.Tensor]) -> float:
    """How far llama.cpp's logits may be from the file's model's (see _RUNTIME_RTOL)."""
    return _RUNTIME_RTOL[quant] * max(1.0, max(float(x.abs().max()) for x in logits))


@dataclass
class RuntimeCheck:
    tokens_agree: int  # llama.cpp's greedy tokens equal to the file's model's (torch), before the first difference
    tokens_total: int
    answers_equal: int  # probes whose whole greedy answer is the file's model's
    probes: int
    forced_mismatches: int  # teacher-forced positions whose argmax differs (each within the margin)
    forced_positions: int
    worst_gap: float  # the largest logit gap at such a position
    max_logit_diff: float  # llama.cpp's logits vs the in-memory quantized model
    fp32_agree: int  # llama.cpp's greedy tokens equal to the fp32 merge's, before the first difference
    fp32_total: int
    fp32_equal: int  # probes whose whole greedy answer is the fp32 merge's


@dataclass
class GgufExportResult:
    out: Path
    quant: str
    model_file: str
    adapter_file: str | None
    merge_diff: float
    tolerance: float
    noise_floor: float
    readback_diff: float
    quant_cost: tuple[float, float]  # (max, RMS) |Δlogit| of the quantized model vs base + adapter
    adapter_effect: tuple[float, float] | None
    runtime: RuntimeCheck
    lora_runtime: RuntimeCheck | None
    probe_tokens: int
    fallback_f16: list[str]
    notes: list[str] = field(default_factory=list)


def check_gguf_request(adapter: Adapter, quant: str, adapter_only: bool) -> None:
    """The one-line refusals that need no model: the adapter kind, --quant, the runtime installed."""
    from orpo_cli.models.gguf_runtime import check_runtime

    if not adapter.mergeable:
        raise UserError(_REFT_REFUSAL.format(kind=adapter.name))
    if adapter_only and adapter.trains_base:
        raise UserError("--adapter-only: a full fine-tuning run has no adapter: every weight trained; export the "
                        "whole model with --format gguf")
    quant_type(quant)
    check_runtime()


def export_gguf_run(
    run: RunDir,
    out: Path,
    *,
    quant: str = DEFAULT_QUANT,
    adapter_only: bool = False,
    force: bool = False,
    reporter: Reporter | None = None,
    tensor_hook: Any = None,
) -> GgufExportResult:
    """Export `run` to `out` as GGUF (see the module docstring). `tensor_hook`: tests only (a wrong conversion)."""
    from transformers import AutoConfig

    from orpo_cli.adapters import build_adapter
    from orpo_cli.export import _remove_dead_temporaries, check_out, merge_verified
    from orpo_cli.models.builtin import resolve_model_path

    reporter = reporter or Reporter()
    recipe = read_recipe(run.recipe)
    check_trained(run)
    quant = quant.lower()
    check_out(run, out, force)
    adapter = build_adapter(recipe.adapter)
    check_gguf_request(adapter, quant, adapter_only)
    config = AutoConfig.from_pretrained(resolve_model_path(recipe.model.name_or_path), revision=recipe.model.revision,
                                        trust_remote_code=recipe.model.trust_remote_code)
    architecture_of(config)  # an unsupported architecture fails before any weight loads
    _remove_dead_temporaries(Path(out))

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scale: list[float] = []

    def read_lora(model: torch.nn.Module) -> None:
        if adapter_only:
            lora.update(_lora_factors(model, scale))

    merge = merge_verified(run, recipe, adapter, Path(out), reporter, before_merge=read_lora)
    merged, probes, tokenizer = merge.merged, merge.probes, merge.tokenizer
    name = recipe.name or run.root.name
    with atomic_dir(Path(out), replace=force) as tmp:
        result = _write_and_check(run, recipe, adapter, merge, tmp, Path(out), quant, name, lora, scale,
                                  tensor_hook, reporter)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / EXPORT_RECIPE).write_text(run.recipe.read_text(encoding="utf-8"), encoding="utf-8")
        (tmp / "Modelfile").write_text(ollama_modelfile(result, tokenizer, recipe), encoding="utf-8")
        (tmp / "README.md").write_text(_gguf_card(run, recipe, adapter, result), encoding="utf-8")
        manifest = {"format": GGUF_FORMAT, "format_version": 1, "model": result.model_file,
                    "adapter": result.adapter_file, "quant": quant, "exported_by": f"orpo-tune {__version__}"}
        (tmp / GGUF_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        del merged, probes
    return result


def _write_and_check(
    run: RunDir, recipe: Recipe, adapter: Adapter, merge: Any, tmp: Path, out: Path, quant: str, name: str,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: list[float], tensor_hook: Any, reporter: Reporter,
) -> GgufExportResult:
    from orpo_cli.generation import chat_template_in_use
    from orpo_cli.gguf_conversion import write_lora_gguf, write_model_gguf

    merged, probes, tokenizer = merge.merged, merge.probes, merge.tokenizer
    template = chat_template_in_use(tokenizer, recipe)
    stem = _safe_stem(name)
    model_file = f"{stem}-{quant}.gguf"
    fp32_greedy = _hf_greedy(merged, tokenizer, probes)

    reporter.note(f"export: writing {model_file} ({quant})")
    written = write_model_gguf(tmp / model_file, merged, tokenizer, run.tokenizer, quant=quant, name=name,
                               chat_template=template, tensor_hook=tensor_hook)
    # The weights as the file holds them, in memory: what both readers must reproduce.
    for param in merged.parameters():
        param.data = quantize_like_gguf(param.data, quant)
    quantized = probe_logits(merged, NoAdapter(), probes, torch.device("cpu"))
    file_greedy = _hf_greedy(merged, tokenizer, probes)  # the answers of the model the file holds
    reporter.note("export: reading the GGUF back with transformers' GGUF loader")
    readback = _transformers_readback(tmp / model_file, probes)
    readback_diff = max_abs_diff(quantized, readback)
    del readback
    if not readback_diff <= merge.tolerance:
        raise RunFailed(
            f"export verification failed: {model_file} read back by transformers differs from the merged model "
            f"quantized to {quant} by max |Δlogit| = {readback_diff:.3g} > tolerance {merge.tolerance:.3g} "
            f"({MERGE_TOLERANCE_FACTOR:g} x the fp32 noise floor): the conversion is wrong; nothing was written to {out}"
        )
    reporter.note("export: running the GGUF in llama.cpp")
    runtime = _runtime_check(tmp / model_file, None, tokenizer, template, recipe, probes, quantized,
                             (file_greedy, fp32_greedy), quant, out, model_file)
    adapter_file = None
    lora_runtime = None
    if lora:
        adapter_file = f"{stem}-lora-f32.gguf"
        base_file = f"{stem}-base-{quant}.gguf"
        _write_base(run, recipe, tmp / base_file, tokenizer, quant, name, template)
        write_lora_gguf(tmp / adapter_file, merged, lora, alpha=scale[0] * _rank(lora), name=f"{name} (LoRA)")
        lora_runtime = _runtime_check(tmp / base_file, tmp / adapter_file, tokenizer, template, recipe, probes,
                                      quantized, (file_greedy, fp32_greedy), quant, out,
                                      f"{base_file} + {adapter_file}")
        (tmp / model_file).unlink()  # the merged file was the reference; the export is base + adapter
        model_file = base_file
    quant_cost = diff_stats(quantized, merge.reference)
    effect = diff_stats(merge.reference, merge.base) if merge.base is not None else None
    notes = list(merge.notes)
    if written.fallback_f16:
        notes.append(f"{len(written.fallback_f16)} of {written.tensors} tensors are F16, not {quant}: their rows "
                     f"do not split into {quant}'s blocks (as llama.cpp's converter does)")
    return GgufExportResult(out, quant, model_file, adapter_file, merge.diff, merge.tolerance, merge.noise_floor,
                            readback_diff, quant_cost, effect, runtime, lora_runtime, merge.tokens,
                            written.fallback_f16, notes)


def _safe_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"
    return stem


def _rank(lora: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    ranks = {a.shape[0] for a, _ in lora.values()}
    if len(ranks) != 1:
        raise UserError("--adapter-only: the LoRA's layers have different ranks; llama.cpp's LoRA takes one alpha "
                        "per file; export the merged model with --format gguf")
    return ranks.pop()


def _lora_factors(model: torch.nn.Module, scale: list[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every LoRA layer by the adapted weight's transformers name; `scale` gets PEFT's alpha/r."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    scales = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get("default", False):
            raise UserError("--adapter-only: a DoRA adapter has a magnitude vector llama.cpp's LoRA cannot apply; "
                            "export the merged model with --format gguf")
        if not isinstance(module.lora_A["default"], torch.nn.Linear):
            raise UserError(f"--adapter-only: LoRA on {module_name} (not a linear layer) cannot go into llama.cpp's "
                            "LoRA format; export the merged model with --format gguf")
        hf_name = module_name.removeprefix("base_model.model.") + ".weight"
        factors[hf_name] = (module.lora_A["default"].weight.detach().float().clone(),
                            module.lora_B["default"].weight.detach().float().clone())
        scales.add(float(module.scaling["default"]))
    if not factors:
        raise UserError("--adapter-only: the run's adapter has no LoRA layers to write")
    if len(scales) != 1:
        raise UserError("--adapter-only: the LoRA's layers scale differently; export the merged model instead")
    scale.append(scales.pop())
    return factors


def _write_base(run: RunDir, recipe: Recipe, path: Path, tokenizer: Any, quant: str, name: str,
                template: str | None) -> None:
    from orpo_cli.gguf_conversion import write_model_gguf
    from orpo_cli.models.tuned import load_base

    base = load_base(recipe, torch.device("cpu"), full_precision=True).eval()
    write_model_gguf(path, base, tokenizer, run.tokenizer, quant=quant, name=f"{name} (base)",
                     chat_template=template)


@torch.no_grad()
def _hf_greedy(model: torch.nn.Module, tokenizer: Any, probes: list[tuple[list[int], int]]) -> list[list[int]]:
    from orpo_cli.generation import generation_config

    config = generation_config(model, tokenizer, max_new_tokens=_GREEDY_TOKENS, temperature=0.0)
    answers = []
    for ids, prompt_length in probes:
        x = torch.tensor([ids[:prompt_length]])
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
        answers.append([int(t) for t in out[0, prompt_length:]])
    return answers


def _transformers_readback(path: Path, probes: list[tuple[list[int], int]]) -> list[torch.Tensor]:
    """The file loaded by transformers' GGUF loader (fp32), and its logits on the probes."""
    from transformers import AutoModelForCausalLM

    from orpo_cli.models.builtin import _progress_bars_disabled

    with _progress_bars_disabled(), _tensor_name_maps_cached():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    return probe_logits(model, NoAdapter(), probes, torch.device("cpu"))


@contextlib.contextmanager
def _tensor_name_maps_cached() -> Iterator[None]:
    """transformers builds gguf-py's tensor name table once per module of the model (397 times for SmolLM2's 30
    layers, a minute on a busy 2-core machine); the table depends only on (architecture, layers): built once."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def _runtime_check(
    model_path: Path, lora_path: Path | None, tokenizer: Any, template: str | None, recipe: Recipe,
    probes: list[tuple[list[int], int]], quantized: list[torch.Tensor],
    greedy: tuple[list[list[int]], list[list[int]]], quant: str, out: Path, what: str,
) -> RuntimeCheck:
    """llama.cpp on the file (see the module docstring, step 4); `greedy`: the greedy answers of the model the
    file holds (the merge quantized in memory, run by torch) and of the fp32 merge."""
    from orpo_cli.models.gguf_runtime import GgufRuntime

    def fail(detail: str) -> RunFailed:
        return RunFailed(f"export verification failed in llama.cpp: {what}: {detail}; nothing was written to {out}")

    stops = {t for t in (tokenizer.eos_token_id,) if t is not None}
    tolerance = runtime_tolerance(quant, quantized)
    agree = total = equal = mismatches = positions = fp32_agree = fp32_total = fp32_equal = 0
    file_greedy, fp32_greedy = greedy
    worst = 0.0
    logit_diff = 0.0
    context = max(len(ids) + _GREEDY_TOKENS for ids, _ in probes) + 8
    with GgufRuntime(model_path, lora=lora_path, n_ctx=max(64, context)) as runtime:
        for i, ((ids, prompt_length), answer) in enumerate(zip(probes, file_greedy, strict=True)):
            prompt = ids[:prompt_length]
            text = tokenizer.decode(prompt)  # special tokens included, as a chat prompt's text has them
            if (tokenizer(text, add_special_tokens=False)["input_ids"] == prompt
                    and runtime.tokenize(text, add_bos=False) != prompt):
                raise fail("its tokenization of a probe prompt differs from the run's tokenizer's")
            logit_diff = max(logit_diff, float(np.abs(runtime.logits(ids) - quantized[i].numpy()).max()))
            forced = runtime.logits(prompt + answer)
            for offset, token in enumerate(answer):
                row = forced[len(prompt) - 1 + offset]
                positions += 1
                top = int(np.argmax(row))
                if top != token:
                    mismatches += 1
                    worst = max(worst, float(row[top] - row[token]))
            got = runtime.greedy(prompt, max(len(answer), len(fp32_greedy[i])), stops)
            agree += _common_prefix(got[:len(answer)], answer)
            total += len(answer)
            equal += got[:len(answer)] == answer
            fp32_agree += _common_prefix(got[:len(fp32_greedy[i])], fp32_greedy[i])
            fp32_total += len(fp32_greedy[i])
            fp32_equal += got[:len(fp32_greedy[i])] == fp32_greedy[i]
    check = RuntimeCheck(agree, total, equal, len(probes), mismatches, positions, worst, logit_diff, fp32_agree,
                         fp32_total, fp32_equal)
    if not logit_diff <= tolerance:
        raise fail(f"its logits differ from those of the model the file holds (run by torch) by max |Δlogit| = "
                   f"{logit_diff:.3g} > {tolerance:.3g} ({_RUNTIME_RTOL[quant]:g} x the largest |logit|, for {quant})")
    if not worst <= tolerance:
        raise fail(f"along the greedy answers of the model the file holds its top token differs by a logit gap of "
                   f"{worst:.3g} > {tolerance:.3g} (for {quant})")
    if quant in _STRICT_GREEDY and equal != len(probes):
        raise fail(f"its greedy answers agree with those of the model the file holds (run by torch) on "
                   f"{agree}/{total} tokens ({equal}/{len(probes)} answers whole); at {quant} they must agree")
    return check


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# ------------------------------------------------------------------------------------------ Ollama
def ollama_modelfile(result: GgufExportResult, tokenizer: Any, recipe: Recipe) -> str:
    """FROM the file (ADAPTER the LoRA), the stop tokens and the chat template as Ollama's Go template."""
    from orpo_cli.generation import chat_template_in_use

    template = chat_template_in_use(tokenizer, recipe)
    lines = ["# Ollama: ollama create NAME -f Modelfile (in this directory), then ollama run NAME",
             f"FROM ./{result.model_file}"]
    if result.adapter_file:
        lines.append(f"ADAPTER ./{result.adapter_file}")
    lines += ["", f'TEMPLATE """{go_template(tokenizer, template)}"""', ""]
    for stop in _stop_strings(tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    if recipe.data.system_prompt:
        lines.append(f'SYSTEM """{recipe.data.system_prompt}"""')
    return "\n".join(lines) + "\n"


def _stop_strings(tokenizer: Any) -> list[str]:
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    return [s for s in dict.fromkeys(stops) if s]


def go_template(tokenizer: Any, template: str | None) -> str:
    """The chat template as an Ollama (Go) template, from renderings of the run's own template.

    The Jinja template is rendered for a sentinel system message, user message and reply; the text around
    them becomes the Go template's fixed parts, so Ollama sends exactly the prompt the run trained with for a
    single turn with or without a system message.
    """
    from orpo_cli.data import prompts

    sys_, user, reply = "\x00SYSTEM\x00", "\x00PROMPT\x00", "\x00RESPONSE\x00"
    if template is None:
        return "{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
    with_reply = prompts.render(tokenizer, [{"role": "user", "content": user}, {"role": "assistant", "content": reply}],
                                template, generation_prompt=False)
    prompt_only = prompts.render(tokenizer, [{"role": "user", "content": user}], template, generation_prompt=True)
    head, rest = prompt_only.split(user)
    tail = with_reply.split(reply, 1)[1] if reply in with_reply else ""
    go = f"{head}{{{{ .Prompt }}}}{rest}{{{{ .Response }}}}{tail}"
    try:
        with_system = prompts.render(tokenizer, [{"role": "system", "content": sys_}, {"role": "user", "content": user}],
                                     template, generation_prompt=True)
    except prompts.TemplateRefused:
        return go
    sys_head, sys_rest = with_system.split(sys_)
    between = sys_rest.split(user)[0]
    if sys_rest.split(user)[1] != rest:
        return go
    return (f"{{{{ if .System }}}}{sys_head}{{{{ .System }}}}{between}{{{{ else }}}}{head}{{{{ end }}}}"
            f"{{{{ .Prompt }}}}{rest}{{{{ .Response }}}}{tail}")


# ------------------------------------------------------------------------------------------ model card
def _gguf_card(run: RunDir, recipe: Recipe, adapter: Adapter, result: GgufExportResult) -> str:
    from orpo_cli.export import _adapter_line, _eval_section, _recipe_section, hub_header

    name = recipe.name or run.root.name
    rt = result.runtime
    files = f"`{result.model_file}`" + (f" + LoRA `{result.adapter_file}`" if result.adapter_file else "")
    lines = [
        f"# {name} (GGUF, {result.quant})",
        "",
        f"A causal language model aligned with ORPO (Hong et al. 2024) by `orpo-tune`, exported from run "
        f"`{run.root}` as GGUF for llama.cpp, Ollama and LM Studio: {files}.",
        "",
        f"- Base model: `{recipe.model.name_or_path}`",
        f"- Adapter: {_adapter_line(recipe)} "
        + ("applied by llama.cpp at load (`--lora`)" if result.adapter_file else "merged into the weights"),
        f"- Verified on {result.probe_tokens} tokens: the merge (fp32) vs base + adapter: max |Δlogit| = "
        f"{result.merge_diff:.3g} ≤ {result.tolerance:.3g}; the file read back by transformers vs the merge quantized "
        f"to {result.quant} in memory: max |Δlogit| = {result.readback_diff:.3g} ≤ {result.tolerance:.3g}",
        f"- In llama.cpp: greedy answers agree with those of the model the file holds (run by torch) on "
        f"{rt.tokens_agree}/{rt.tokens_total} tokens ({rt.answers_equal}/{rt.probes} answers whole), with the fp32 "
        f"merge's on {rt.fp32_agree}/{rt.fp32_total} ({rt.fp32_equal}/{rt.probes} whole); max |Δlogit| vs the "
        f"quantized model {rt.max_logit_diff:.3g}",
        f"- What {result.quant} costs: max |Δlogit| {result.quant_cost[0]:.3g}, RMS {result.quant_cost[1]:.3g} vs "
        "base + adapter" + (f" (the adapter itself moves the base's logits by RMS {result.adapter_effect[1]:.3g})"
                            if result.adapter_effect else ""),
        *_eval_section(run),
        "",
        "## Use",
        "",
        f"    llama-cli -m {result.model_file}" + (f" --lora {result.adapter_file}" if result.adapter_file else "")
        + " -cnv",
        "    ollama create NAME -f Modelfile && ollama run NAME",
        '    orpo-tune generate PATH --prompt "..."',
        "",
        "LM Studio: put this directory under its models folder (`lms import` the .gguf).",
        *_recipe_section(run),
    ]
    return hub_header(recipe, library="gguf") + "\n".join(lines)
