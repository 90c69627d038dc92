"""`orpo-tune export`: a run directory -> a merged model (LoRA, full fine-tuning) or a bundle (ReFT).

Mergeable adapters (`adapter.mergeable`): the base model is loaded again in full precision (fp32 on the
CPU, never 4-bit, even when the run trained on a 4-bit base), the adapter goes on and `adapter.merge`
folds it into the weights, which are cast to --dtype and saved as safetensors beside the tokenizer (with
its chat template), the generation config, a model card README.md and the resolved recipe
(orpo-tune-recipe.yaml). The result is a plain transformers model: `AutoModelForCausalLM.from_pretrained(DIR)`.

Adapters that cannot be merged (ReFT's interventions act on activations, not weights): a bundle that
`orpo-tune generate` loads (see tuned.py): orpo-bundle.json naming the base model (a copy in DIR/base for
builtin: models, whose cache is machine-local; a reference otherwise), DIR/adapter as the adapter's own
`save` writes it, the tokenizer and the resolved recipe.

Either way the export is checked before it is put in place: the saved directory is loaded back and its
logits on a few eval prompts are compared with those of base + adapter from the run; beyond the
tolerance the export fails and nothing is left. Everything is written in a temporary sibling directory
that is renamed into place at the end (atomic.atomic_dir): an interrupted export leaves no DIR behind.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orpo_cli import __version__
from orpo_cli.adapters import Adapter
from orpo_cli.adapters.full import FullAdapter
from orpo_cli.atomic import TMP_MARK, atomic_dir
from orpo_cli.errors import RunFailed, UserError
from orpo_cli.progress import Reporter
from orpo_cli.recipe import Recipe
from orpo_cli.rundir import RunDir
from orpo_cli.tuned import (
    BUNDLE_FORMAT,
    BUNDLE_MANIFEST,
    EXPORT_RECIPE,
    check_trained,
    inference_device,
    load_base,
    load_bundle,
    load_run,
    load_saved_tokenizer,
    read_recipe,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Verification tolerance on logits, relative to max(1, max |logit|) of the reference: the exported weights
# are loaded back in fp32, so this bounds the merge's own error plus the rounding of the weights to --dtype.
RTOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}
PAUSE_ENV = "ORPO_TUNE_EXPORT_PAUSE"  # tests only: seconds to wait, files half-written, before the rename
_PROBES = 4
_PROBE_TOKENS = 128


@dataclass
class ExportResult:
    out: Path
    merged: bool  # False: a bundle for `orpo-tune generate`
    dtype: str | None  # the merged weights' dtype; None for a bundle
    max_abs_diff: float
    tolerance: float
    probe_tokens: int
    notes: list[str] = field(default_factory=list)


def parse_dtype(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.lower().replace("float", "fp").replace("bfloat", "bf")
    if key not in DTYPES:
        raise UserError(f"--dtype: {value!r} is not one of {', '.join(DTYPES)}")
    return key


def check_out(run: RunDir, out: Path, force: bool) -> None:
    """Refuse an existing --out without --force, and any --out whose replacement would delete the run."""
    out_abs, run_abs = Path(out).resolve(), run.root.resolve()
    if out_abs == run_abs or run_abs.is_relative_to(out_abs):
        raise UserError(f"--out {out}: would replace the run directory {run.root} itself; choose another --out")
    if Path(out).exists() and not force:
        raise UserError(f"--out {out} exists; choose another directory or pass --force to replace it")


def export_run(
    run: RunDir, out: Path, *, dtype: str | None = None, force: bool = False, reporter: Reporter | None = None
) -> ExportResult:
    """Export `run` to `out` (see the module docstring); `dtype` is bf16, fp16, fp32 or None for the base's own."""
    from orpo_cli.adapters import build_adapter

    reporter = reporter or Reporter()
    recipe = read_recipe(run.recipe)
    check_trained(run)
    dtype = parse_dtype(dtype)
    check_out(run, out, force)
    adapter = build_adapter(recipe.adapter)
    _remove_dead_temporaries(Path(out))
    if adapter.mergeable:
        return _export_merged(run, recipe, adapter, Path(out), dtype, force, reporter)
    if dtype is not None:
        reporter.note(f"--dtype {dtype} is ignored for a bundle: its base loads as the recipe says")
    return _export_bundle(run, recipe, Path(out), force, reporter)


# ------------------------------------------------------------------------------------------ merged
def _export_merged(
    run: RunDir, recipe: Recipe, adapter: Adapter, out: Path, dtype: str | None, force: bool, reporter: Reporter
) -> ExportResult:
    from transformers import AutoModelForCausalLM

    cpu = torch.device("cpu")
    dtype = dtype or _stored_dtype(recipe)
    tokenizer = load_saved_tokenizer(run.tokenizer)
    probes = _probes(recipe, tokenizer)
    if recipe.adapter.kind == "none":
        reporter.note(f"export: loading the fully fine-tuned weights of {run.root}")
    else:
        reporter.note(f"export: loading {recipe.model.name_or_path} in full precision (fp32) to merge the "
                      f"{recipe.adapter.kind} adapter into it")
    model = adapter.load(load_base(recipe, cpu, full_precision=True), run.adapter)
    model.eval()
    reference = _logits(model, adapter, probes, cpu)
    notes = [_quantization_gap(run, recipe, probes, reference)] if recipe.quantization.mode != "none" else []
    merged = adapter.merge(model)
    del model
    merged = merged.to(DTYPES[dtype])
    _prepare_for_save(merged, tokenizer)

    with atomic_dir(out, replace=force) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        del merged
        tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_RECIPE).write_text(run.recipe.read_text(encoding="utf-8"), encoding="utf-8")
        _pause_for_tests()
        # Load the saved files back as a user will (plain transformers), upcast to fp32, and compare.
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        diff = _max_abs_diff(reference, _logits(reloaded, FullAdapter(), probes, cpu))
        del reloaded
        tolerance = RTOL[dtype] * max(1.0, max(float(r.abs().max()) for r in reference))
        tokens = sum(len(ids) for ids, _ in probes)
        _check(diff, tolerance, out)
        result = ExportResult(out, True, dtype, diff, tolerance, tokens, notes)
        (tmp / "README.md").write_text(_model_card(run, recipe, result), encoding="utf-8")
    return result


def _quantization_gap(
    run: RunDir, recipe: Recipe, probes: list[tuple[list[int], int]], reference: list[torch.Tensor]
) -> str:
    """How far the merged full-precision model is from the quantized model + adapter the run trained."""
    q = recipe.quantization
    try:
        trained = load_run(run)
    except UserError as err:  # e.g. an 8-bit run exported on a machine without a GPU
        return f"the run trained on a {q.mode} base; could not load it to compare ({err})"
    gap = _max_abs_diff(_logits(trained.model, trained.adapter, probes, trained.device), reference)
    kind = f"{q.mode} {q.quant_type}" if q.mode == "4bit" else q.mode
    return (
        f"the run trained on a {kind} base; the merged full-precision model differs from that quantized model "
        f"+ adapter by max |Δlogit| = {gap:.3g} (the base's quantization error, expected)"
    )


def _stored_dtype(recipe: Recipe) -> str:
    """The base model's own dtype (its config.json), so the export is as large as the base; else fp32."""
    from transformers import AutoConfig

    from orpo_cli.builtin import resolve_model_path

    try:
        config = AutoConfig.from_pretrained(
            resolve_model_path(recipe.model.name_or_path),
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except (OSError, ValueError):
        return "fp32"
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return names.get(stored, "fp32")


def _prepare_for_save(model: nn.Module, tokenizer: Any) -> None:
    model.config.use_cache = True  # training turned the KV cache off; users of the export want it
    gen = model.generation_config
    if gen.eos_token_id is None:
        gen.eos_token_id = tokenizer.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if gen.bos_token_id is None:
        gen.bos_token_id = tokenizer.bos_token_id


# ------------------------------------------------------------------------------------------ bundle
def _export_bundle(run: RunDir, recipe: Recipe, out: Path, force: bool, reporter: Reporter) -> ExportResult:
    from orpo_cli.builtin import is_builtin, resolve_model_path

    kind = recipe.adapter.kind
    device = inference_device(recipe)
    tuned = load_run(run, device=device)
    probes = _probes(recipe, tuned.tokenizer)
    reference = _logits(tuned.model, tuned.adapter, probes, device)
    name = recipe.model.name_or_path
    copied = is_builtin(name)
    with atomic_dir(out, replace=force) as tmp:
        if copied:  # the builtin cache is machine-local: the bundle carries its own copy
            shutil.copytree(resolve_model_path(name), tmp / "base", ignore=shutil.ignore_patterns(".*"))
            base = "base"
        else:
            local = Path(name).expanduser()
            base = str(local.resolve()) if local.is_dir() else name
        (tmp / "adapter").mkdir()
        tuned.adapter.save(tuned.model, tmp / "adapter")
        tuned.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        del tuned
        (tmp / EXPORT_RECIPE).write_text(run.recipe.read_text(encoding="utf-8"), encoding="utf-8")
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": 1,
            "adapter": kind,
            "base_model": base,
            "base_revision": recipe.model.revision,
            "base_copied": copied,
            "quantization": recipe.quantization.mode,
            "source_run": str(run.root.resolve()),
            "exported_by": f"orpo-tune {__version__}",
        }
        (tmp / BUNDLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _pause_for_tests()
        reloaded = load_bundle(tmp, device=device)
        diff = _max_abs_diff(reference, _logits(reloaded.model, reloaded.adapter, probes, device))
        del reloaded
        tolerance = RTOL["fp32"] * max(1.0, max(float(r.abs().max()) for r in reference))
        _check(diff, tolerance, out)
        notes = [
            f"a {kind} adapter cannot be merged into the weights, so {out} is a bundle (base "
            f"{'copy' if copied else 'reference ' + base}, adapter, tokenizer, recipe) for `orpo-tune generate`; "
            "AutoModelForCausalLM.from_pretrained alone cannot load it"
        ]
        result = ExportResult(out, False, None, diff, tolerance, sum(len(ids) for ids, _ in probes), notes)
        (tmp / "README.md").write_text(_bundle_card(run, recipe, result, base, copied), encoding="utf-8")
    return result


# ------------------------------------------------------------------------------------------ checking
def _probes(recipe: Recipe, tokenizer: Any) -> list[tuple[list[int], int]]:
    """(ids, prompt length) of a few eval prompts with their chosen answers; fixed prompts if the data is gone."""
    from orpo_cli.data import prepare_data

    try:
        data = prepare_data(recipe.data, recipe.orpo, tokenizer)
        pairs = (data.eval or data.train)[:_PROBES]
    except UserError:  # the training data may not be on this machine any more
        pairs = []
    if pairs:
        return [((p.prompt_ids + p.chosen_ids)[:_PROBE_TOKENS], len(p.prompt_ids)) for p in pairs]
    from orpo_cli.generation import chat_template_in_use, conversation, render_prompt

    template = chat_template_in_use(tokenizer, recipe)
    texts = ["What colour is the sky?", "Name an animal that says moo.", "Say something kind.", "Count to three."]
    probes = []
    for text in texts[:_PROBES]:
        ids = render_prompt(tokenizer, conversation(text, recipe.data.system_prompt), template)[:_PROBE_TOKENS]
        probes.append((ids, len(ids)))
    return probes


@torch.no_grad()
def _logits(
    model: nn.Module, adapter: Adapter, probes: list[tuple[list[int], int]], device: torch.device
) -> list[torch.Tensor]:
    out = []
    for ids, prompt_length in probes:
        x = torch.tensor([ids], dtype=torch.long, device=device)
        mask = torch.ones_like(x)
        batch = {"input_ids": x, "attention_mask": mask, "prompt_lengths": torch.tensor([prompt_length], device=device)}
        with adapter.forward_context(model, batch):
            out.append(model(input_ids=x, attention_mask=mask, use_cache=False).logits[0].float().cpu())
    return out


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _check(diff: float, tolerance: float, out: Path) -> None:
    if not diff <= tolerance:  # also catches NaN
        raise RunFailed(
            f"export verification failed: the exported model's logits differ from base + adapter by "
            f"{diff:.3g} > tolerance {tolerance:.3g}; nothing was written to {out}"
        )


def _pause_for_tests() -> None:
    seconds = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def _remove_dead_temporaries(out: Path) -> None:
    """Temporaries of earlier exports to `out` whose process is gone (killed mid-write)."""
    if not out.parent.is_dir():
        return
    for tmp in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------ model cards
def _model_card(run: RunDir, recipe: Recipe, result: ExportResult) -> str:
    name = recipe.name or run.root.name
    base = recipe.model.name_or_path
    front = f"---\nbase_model: {base}\nlibrary_name: transformers\ntags: [orpo, orpo-tune]\n---\n\n"
    if base.startswith("builtin:"):
        front = "---\nlibrary_name: transformers\ntags: [orpo, orpo-tune]\n---\n\n"
    how = "merged into the weights" if recipe.adapter.kind != "none" else "(full fine-tuning: every weight trained)"
    lines = [
        f"# {name}",
        "",
        f"A causal language model aligned with ORPO (Hong et al. 2024) by `orpo-tune`, exported from run `{run.root}`.",
        "",
        f"- Base model: `{base}`" + (f" (revision `{recipe.model.revision}`)" if recipe.model.revision else ""),
        f"- Adapter: {_adapter_line(recipe)} {how}"
        + (f"; trained on a {recipe.quantization.mode} base, merged into the full-precision base"
           if recipe.quantization.mode != "none" else ""),
        f"- ORPO: λ = {recipe.orpo.lam:g}, max_length {recipe.orpo.max_length}, "
        f"max_prompt_length {recipe.orpo.max_prompt_length}",
        f"- Data: `{recipe.data.train.path}` ({recipe.data.format})",
        f"- Weights: {result.dtype}, safetensors",
        f"- Verified: logits of this directory (loaded back in fp32) vs base + adapter on {result.probe_tokens} "
        f"tokens: max |Δ| = {result.max_abs_diff:.3g} ≤ tolerance {result.tolerance:.3g}",
        *_eval_section(run),
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")  # with its chat template',
        "```",
        "",
        'or `orpo-tune generate PATH --prompt "..."`.',
        *_recipe_section(run),
    ]
    return front + "\n".join(lines)


def _bundle_card(run: RunDir, recipe: Recipe, result: ExportResult, base: str, copied: bool) -> str:
    lines = [
        f"# {recipe.name or run.root.name} ({recipe.adapter.kind} bundle)",
        "",
        f"An orpo-tune export of run `{run.root}`. The {recipe.adapter.kind} adapter edits activations, so it "
        "cannot be merged into the weights: this directory holds the base model "
        + ("(a copy, in `base/`)" if copied else f"(a reference: `{base}`)")
        + f", the adapter (`adapter/`), the tokenizer (`tokenizer/`) and the resolved recipe (`{EXPORT_RECIPE}`).",
        "",
        f"- Adapter: {_adapter_line(recipe)}",
        f"- Base quantization when loaded: {recipe.quantization.mode}",
        f"- Verified: bundle loaded back vs the run's model on {result.probe_tokens} tokens: "
        f"max |Δlogit| = {result.max_abs_diff:.3g} ≤ tolerance {result.tolerance:.3g}",
        *_eval_section(run),
        "",
        "## Use",
        "",
        '    orpo-tune generate PATH --prompt "..."',
        *_recipe_section(run),
    ]
    return "\n".join(lines)


def _recipe_section(run: RunDir) -> list[str]:
    """The card's closing section: the run's resolved recipe, verbatim."""
    return ["", "## Recipe", "", "```yaml", run.recipe.read_text(encoding="utf-8").rstrip(), "```", ""]


def _adapter_line(recipe: Recipe) -> str:
    settings = recipe.adapter.model_dump(mode="json", by_alias=True)
    kind = settings.pop("kind")
    return f"{kind} (" + ", ".join(f"{k}: {v}" for k, v in settings.items()) + ")" if settings else kind


def _eval_section(run: RunDir) -> list[str]:
    from orpo_cli.evaluate import EVAL_FILE, EVAL_METRICS

    path = run.root / EVAL_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    base = result.get("base") if isinstance(result.get("base"), dict) else None
    head = "| metric | tuned |" + (" base |" if base else "")
    rows = [
        f"| {label} | {_cell(result[key])} |" + (f" {_cell(base.get(key))} |" if base else "")
        for key, label in EVAL_METRICS.items()
        if key in result
    ]
    return ["", f"## Evaluation (`orpo-tune eval`, on {result.get('data', 'the eval split')})", "",
            head, "|---|---|" + ("---|" if base else ""), *rows]


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
