"""`orpo-tune export`: a run directory -> a merged model (LoRA, full fine-tuning) or a bundle (ReFT).

Mergeable adapters (`adapter.mergeable`): the base model is loaded again in full precision (fp32 on the
CPU, never 4-bit, even when the run trained on a 4-bit base), the adapter goes on and `adapter.merge`
folds it into the weights, which are cast to --dtype and saved as safetensors beside the tokenizer (with
its chat template), the generation config, a model card README.md and the resolved recipe
(orpo-tune-recipe.yaml). The result is a plain transformers model: `AutoModelForCausalLM.from_pretrained(DIR)`.

Adapters that cannot be merged (ReFT's interventions act on activations, not weights): a bundle that
`orpo-tune generate` loads (see models/tuned.py): orpo-bundle.json naming the base model (a copy in DIR/base for
builtin: models, whose cache is machine-local; a reference otherwise), DIR/adapter as the adapter's own
`save` writes it, the tokenizer and the resolved recipe.

Either way the export is checked before it is put in place, on the logits of a few eval prompts; beyond
a tolerance the export fails and nothing is left. A merged export is checked in two steps that keep the
merge's error apart from the rounding to --dtype (see `_export_merged`, export_checks.py and
docs/export-and-serving.md):

1. the merge, in fp32: merged model vs base + adapter, within `MERGE_TOLERANCE_FACTOR` times this model's
   fp32 noise floor (what one fp32 rounding of every weight does to its logits, measured on the probes);
2. the files: the saved --dtype weights loaded back (plain transformers, upcast to fp32) vs the merged
   model rounded to --dtype in memory, within the same tolerance (they are the same numbers).

What rounding to --dtype costs (vs base + adapter, and beside the adapter's own effect) is measured and
reported, not tolerated: it is a property of the dtype, which a bf16 merge of a small LoRA shows plainly.
A bundle is compared with the run's model directly (`BUNDLE_RTOL`). Everything is written in a temporary sibling directory
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
from orpo_cli.adapters import Adapter, NoAdapter
from orpo_cli.atomic import TMP_MARK, atomic_dir
from orpo_cli.errors import RunFailed, UserError
from orpo_cli.export_checks import (
    BUNDLE_RTOL,
    MERGE_TOLERANCE_FACTOR,
    diff_stats,
    max_abs_diff,
    noise_floor,
    probe_logits,
    probe_prompts,
)
from orpo_cli.models.tuned import (
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
from orpo_cli.progress import Reporter
from orpo_cli.recipe import Recipe
from orpo_cli.rundir import RunDir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Rounding to --dtype that takes away more than this share of the adapter's effect (RMS over the probe
# logits) gets a note suggesting --dtype fp32.
_ROUNDING_NOTE_SHARE = 0.5
PAUSE_ENV = "ORPO_TUNE_EXPORT_PAUSE"  # tests only: seconds to wait, files half-written, before the rename


@dataclass
class ExportResult:
    out: Path
    merged: bool  # False: a bundle for `orpo-tune generate`
    dtype: str | None  # the merged weights' dtype; None for a bundle
    max_abs_diff: float  # merged: the fp32 merge vs base + adapter; bundle: bundle vs the run's model
    tolerance: float
    probe_tokens: int
    notes: list[str] = field(default_factory=list)
    noise_floor: float | None = None  # merged: max |Δlogit| of one fp32 rounding of every weight
    reload_diff: float | None = None  # merged: the saved files loaded back vs merged and rounded in memory
    rounding: tuple[float, float] | None = None  # merged: (max, RMS) |Δlogit| of --dtype vs base + adapter
    adapter_effect: tuple[float, float] | None = None  # (max, RMS) |Δlogit| of base + adapter vs base


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
    refuse_out_in_a_run(out, force)
    if Path(out).exists() and not force:
        raise UserError(f"--out {out} exists; choose another directory or pass --force to replace it")


def refuse_out_in_a_run(out: Path, force: bool) -> None:
    """No export is written inside a run directory (its adapter, checkpoints, tokenizer: hours of training) or,
    with --force, over a directory holding one."""
    from orpo_cli.rundir import run_below, run_holding

    inside = run_holding(Path(out))
    if inside is not None:
        raise UserError(
            f"--out {out}: inside the run directory {inside}, whose files only train writes; export outside it"
        )
    if force and Path(out).is_dir():
        below = run_below(Path(out))
        if below is not None:
            what = f"holds the run directory {below}" if below != Path(out) else "holds too many directories to check"
            raise UserError(f"--out {out}: {what}, which an export would replace; choose a new or empty directory")


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
    return _export_bundle(run, recipe, adapter, Path(out), force, reporter)


# ------------------------------------------------------------------------------------------ merged
def _export_merged(
    run: RunDir, recipe: Recipe, adapter: Adapter, out: Path, dtype: str | None, force: bool, reporter: Reporter
) -> ExportResult:
    from transformers import AutoModelForCausalLM

    cpu = torch.device("cpu")
    dtype = dtype or _stored_dtype(recipe)
    merge = merge_verified(run, recipe, adapter, out, reporter)
    tokenizer, probes, merged, reference, base = merge.tokenizer, merge.probes, merge.merged, merge.reference, merge.base
    notes, floor, tolerance, diff, tokens = merge.notes, merge.noise_floor, merge.tolerance, merge.diff, merge.tokens
    del merge  # `merged` below is the only reference, so `del merged` frees it

    # 2. Round the weights to --dtype in memory (what the files must hold: parameters only, since buffers
    # such as RoPE's inv_freq are not saved and a loaded model recomputes them in fp32), then save and load
    # back as a user will.
    for param in merged.parameters():
        param.data = param.data.to(DTYPES[dtype]).float()  # fp32 holds every bf16/fp16 value exactly
    rounded = probe_logits(merged, NoAdapter(), probes, cpu)
    merged = merged.to(DTYPES[dtype])
    _prepare_for_save(merged, tokenizer)
    with atomic_dir(out, replace=force) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        del merged
        tokenizer.save_pretrained(str(tmp))
        (tmp / EXPORT_RECIPE).write_text(run.recipe.read_text(encoding="utf-8"), encoding="utf-8")
        if not all(bool(torch.isfinite(r).all()) for r in rounded):
            raise RunFailed(f"export verification failed: rounded to {dtype}, the model's logits are not finite "
                            f"(weights out of {dtype}'s range); use --dtype bf16 or fp32; nothing was written to {out}")
        _pause_for_tests()
        reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        reload_diff = max_abs_diff(rounded, probe_logits(reloaded, NoAdapter(), probes, cpu))
        del reloaded
        if not reload_diff <= tolerance:
            raise RunFailed(
                f"export verification failed: the saved {dtype} model, loaded back, differs from the merged model "
                f"rounded to {dtype} by max |Δlogit| = {reload_diff:.3g} > tolerance {tolerance:.3g}; "
                f"nothing was written to {out}"
            )
        rounding = diff_stats(rounded, reference)
        effect = diff_stats(reference, base) if base is not None else None
        if dtype != "fp32" and effect is not None and rounding[1] > _ROUNDING_NOTE_SHARE * effect[1]:
            notes.append(
                f"rounding to {dtype} moves the logits by RMS {rounding[1]:.3g}, more than "
                f"{_ROUNDING_NOTE_SHARE:.0%} of the adapter's own effect (RMS {effect[1]:.3g}): much of the "
                "adapter's change is smaller than the dtype's step; --dtype fp32 keeps all of it"
            )
        result = ExportResult(out, True, dtype, diff, tolerance, tokens, notes, floor, reload_diff, rounding, effect)
        (tmp / "README.md").write_text(_model_card(run, recipe, adapter, result), encoding="utf-8")
    return result



@dataclass
class VerifiedMerge:
    """The merged fp32 model and what it was checked with (the first step of every merged export, HF or GGUF)."""

    tokenizer: Any
    probes: list[tuple[list[int], int]]
    merged: nn.Module
    reference: list[torch.Tensor]  # base + adapter on the probes
    base: list[torch.Tensor] | None  # the base alone (None where the adapter cannot be switched off)
    noise_floor: float
    tolerance: float
    diff: float  # merged vs base + adapter
    notes: list[str]

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.probes)


def merge_verified(
    run: RunDir, recipe: Recipe, adapter: Adapter, out: Path, reporter: Reporter, before_merge: Any = None
) -> VerifiedMerge:
    """Load base + adapter in fp32 on the CPU, merge, and check the merge (step 1 of the module docstring).

    `before_merge(model)` sees base + adapter before the merge (the GGUF export reads the LoRA factors there).
    """
    cpu = torch.device("cpu")
    tokenizer = load_saved_tokenizer(run.tokenizer)
    probes = probe_prompts(recipe, tokenizer)
    if adapter.trains_base:
        reporter.note(f"export: loading the fully fine-tuned weights of {run.root}")
    else:
        reporter.note(f"export: loading {recipe.model.name_or_path} in full precision (fp32) to merge the "
                      f"{adapter.name} adapter into it")
    model = adapter.load(load_base(recipe, cpu, full_precision=True), run.adapter)
    model.eval()
    reference = probe_logits(model, adapter, probes, cpu)
    notes = [_quantization_gap(run, recipe, probes, reference)] if recipe.quantization.mode != "none" else []
    off = adapter.disabled(model)
    base = None
    if off is not None:
        with off:
            base = probe_logits(model, adapter, probes, cpu)
    if before_merge is not None:
        before_merge(model)
    merged = adapter.merge(model)
    del model

    # The merge, in fp32, before anything is written: a wrong merge fails here in seconds.
    merged_logits = probe_logits(merged, NoAdapter(), probes, cpu)
    floor = noise_floor(merged, probes, merged_logits)
    tolerance = MERGE_TOLERANCE_FACTOR * floor
    diff = max_abs_diff(reference, merged_logits)
    if not diff <= tolerance:  # also catches NaN
        raise RunFailed(
            f"export verification failed: the merged model's logits differ from base + adapter by {diff:.3g} > "
            f"tolerance {tolerance:.3g} ({MERGE_TOLERANCE_FACTOR:g} x this model's fp32 noise floor {floor:.3g}): "
            f"the merge is wrong; nothing was written to {out}"
        )
    return VerifiedMerge(tokenizer, probes, merged, reference, base, floor, tolerance, diff, notes)


def _quantization_gap(
    run: RunDir, recipe: Recipe, probes: list[tuple[list[int], int]], reference: list[torch.Tensor]
) -> str:
    """How far the merged full-precision model is from the quantized model + adapter the run trained."""
    q = recipe.quantization
    try:
        trained = load_run(run)
    except UserError as err:  # e.g. an 8-bit run exported on a machine without a GPU
        return f"the run trained on a {q.mode} base; could not load it to compare ({err})"
    gap = max_abs_diff(probe_logits(trained.model, trained.adapter, probes, trained.device), reference)
    kind = f"{q.mode} {q.quant_type}" if q.mode == "4bit" else q.mode
    return (
        f"the run trained on a {kind} base; the merged full-precision model differs from that quantized model "
        f"+ adapter by max |Δlogit| = {gap:.3g} (the base's quantization error, expected)"
    )


def _stored_dtype(recipe: Recipe) -> str:
    """The base model's own dtype (its config.json), so the export is as large as the base; else fp32."""
    from transformers import AutoConfig

    from orpo_cli.models.builtin import resolve_model_path

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
def _export_bundle(
    run: RunDir, recipe: Recipe, adapter: Adapter, out: Path, force: bool, reporter: Reporter
) -> ExportResult:
    from orpo_cli.models.builtin import is_builtin, resolve_model_path

    kind = adapter.name
    device = inference_device(recipe)
    tuned = load_run(run, device=device)
    probes = probe_prompts(recipe, tuned.tokenizer)
    reference = probe_logits(tuned.model, tuned.adapter, probes, device)
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
        diff = max_abs_diff(reference, probe_logits(reloaded.model, reloaded.adapter, probes, device))
        del reloaded
        tolerance = BUNDLE_RTOL * max(1.0, max(float(r.abs().max()) for r in reference))
        _check(diff, tolerance, out)
        notes = [
            f"a {kind} adapter cannot be merged into the weights, so {out} is a bundle (base "
            f"{'copy' if copied else 'reference ' + base}, adapter, tokenizer, recipe) for `orpo-tune generate`; "
            "AutoModelForCausalLM.from_pretrained alone cannot load it"
        ]
        result = ExportResult(out, False, None, diff, tolerance, sum(len(ids) for ids, _ in probes), notes)
        (tmp / "README.md").write_text(_bundle_card(run, recipe, kind, result, base, copied), encoding="utf-8")
    return result


# ------------------------------------------------------------------------------ bundle check, temporaries
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
def _model_card(run: RunDir, recipe: Recipe, adapter: Adapter, result: ExportResult) -> str:
    name = recipe.name or run.root.name
    base = recipe.model.name_or_path
    front = hub_header(recipe, library="transformers")
    how = "(full fine-tuning: every weight trained)" if adapter.trains_base else "merged into the weights"
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
        *_verified_lines(result),
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


def hub_header(recipe: Recipe, *, library: str) -> str:
    """The model card's metadata block, as the Hugging Face hub reads it: base_model, library_name, tags,
    license (the base's, where known) and datasets (a hub dataset the run trained on)."""
    from orpo_cli.data.sources import _looks_like_file
    from orpo_cli.models.builtin import hub_identity
    from orpo_cli.recipe import BUILTIN_PREFIX

    base, license_ = hub_identity(recipe.model.name_or_path)
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines.append(f"library_name: {library}")
    lines.append("tags: [orpo, orpo-tune" + (", gguf" if library == "gguf" else "") + "]")
    if license_:
        lines.append(f"license: {license_}")
    data = recipe.data.train.path
    if not data.startswith(BUILTIN_PREFIX) and not Path(data).expanduser().exists() and not _looks_like_file(data):
        lines.append(f"datasets: [{data}]")
    return "\n".join(lines) + "\n---\n\n"


def _verified_lines(result: ExportResult) -> list[str]:
    lines = [
        f"- Verified on {result.probe_tokens} tokens: the merge (fp32) vs base + adapter: max |Δlogit| = "
        f"{result.max_abs_diff:.3g} ≤ tolerance {result.tolerance:.3g} ({MERGE_TOLERANCE_FACTOR:g} × the model's fp32 "
        f"noise floor {result.noise_floor:.3g}); this directory loaded back vs the merge rounded to {result.dtype}: "
        f"max |Δlogit| = {result.reload_diff:.3g}",
    ]
    if result.rounding is not None:
        lines.append(f"- Rounding to {result.dtype}: {rounding_line(result)}")
    return lines


def rounding_line(result: ExportResult) -> str:
    """What rounding to the export's dtype does to the logits, beside what the adapter does."""
    assert result.rounding is not None
    line = f"max |Δlogit| {result.rounding[0]:.3g}, RMS {result.rounding[1]:.3g} vs base + adapter"
    if result.adapter_effect is not None:
        line += (f" (the adapter itself moves the base's logits by max {result.adapter_effect[0]:.3g}, "
                 f"RMS {result.adapter_effect[1]:.3g})")
    return line


def _bundle_card(run: RunDir, recipe: Recipe, kind: str, result: ExportResult, base: str, copied: bool) -> str:
    lines = [
        f"# {recipe.name or run.root.name} ({kind} bundle)",
        "",
        f"An orpo-tune export of run `{run.root}`. The {kind} adapter edits activations, so it "
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
    return hub_header(recipe, library="orpo-tune") + "\n".join(lines)


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
