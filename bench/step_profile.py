"""Where one ORPO training step spends its memory and time, per part of the model (orpo-tune's engine).

Builds the benchmark's model and pairs (``bench/orpo_bench.py --workdir DIR`` leaves them in DIR: a model
directory, ``data.jsonl``), runs one micro-batch forward and backward the way the training loop does
(`start_run`'s model, adapter and layout) and prints, as JSON lines:

* ``saved``: the bytes autograd keeps for the backward, per token of the batch, by part
  (``attn_norm``, ``q/k/v`` LoRA, attention, ``o_proj``, ``mlp_norm``, ``gate/up``, ``act`` (SiLU, where the
  MLP is not fused), ``mlp_product`` (the gate/up product: with kernels/gated_mlp.py, gate and up), ``down_proj``,
  ``head``, ``other``). Each tensor is counted once, by its storage (q, k and v's LoRA read the same input
  tensor: it is kept once), parameters and their views are left out (frozen weights cost nothing per
  token), a dropout mask is counted at its real size (one byte per element);
* ``time``: the step's CPU time by operator (`torch.profiler`, self time, top entries), and by part.

Usage: ``python bench/step_profile.py --workdir /tmp/orpo-bench --batch 2`` after a bench run with the same
``--workdir`` (``--model builtin:smollm2-135m-instruct`` for the real shape). ``--dropout`` sets the LoRA
dropout (the benchmark's is 0), ``--plain`` leaves out what training/setup.py applies to the model (the in-place
LoRA update, the recomputation), to measure what they save.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

# Module names (the last dotted part of a decoder layer's submodule) and the part they are counted under.
_PARTS = {
    "input_layernorm": "attn_norm", "q_proj": "qkv_lora", "k_proj": "qkv_lora", "v_proj": "qkv_lora",
    "o_proj": "o_proj", "self_attn": "attention", "post_attention_layernorm": "mlp_norm",
    "gate_proj": "gate_up", "up_proj": "gate_up", "act_fn": "act", "mlp": "mlp_product", "down_proj": "down_proj",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a bench --workdir (model/, data.jsonl)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--plain", action="store_true",
                   help="without the in-place LoRA update and the recomputation that training applies")
    p.add_argument("--layout", default=None, help="packed, prefix or padded (default: the engine's)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="whole-layer activation checkpointing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=15)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    import torch

    torch.set_num_threads(args.threads)
    import orpo_bench

    from orpo_cli.adapters import build_adapter
    from orpo_cli.data.prepare import prepare_data
    from orpo_cli.models.loading import load_model, load_tokenizer
    from orpo_cli.recipe_loading import validate_recipe
    from orpo_cli.training.batching import collate_pairs, count_tokens, longest_sequence, micro_batches
    from orpo_cli.training.forward import batch_layout, orpo_forward

    work = Path(args.workdir)
    bench_args = orpo_bench._parse(["--batch", str(args.batch), "--max-length", str(args.max_length)]
                                   + (["--gradient-checkpointing"] if args.gradient_checkpointing else []))
    raw = orpo_bench._recipe_dict(bench_args, work, True, work / "profile-run")
    raw["adapter"]["dropout"] = args.dropout
    recipe = validate_recipe(raw)
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    pairs = prepare_data(recipe.data, recipe.orpo, tokenizer).train
    chunk = next(micro_batches(pairs, args.batch, orpo_bench.SEED, 0))
    model = load_model(recipe.model, recipe.quantization, torch.device("cpu"), torch.float32)
    adapter = build_adapter(recipe.adapter)
    model = adapter.attach(model, quantized=False, gradient_checkpointing=recipe.train.gradient_checkpointing)
    paths = _as_training_does(model, adapter, recipe) if not args.plain else None
    model.train()
    layout = args.layout or batch_layout(adapter, model, longest_sequence(pairs))
    batch = collate_pairs(chunk, tokenizer.pad_token_id, layout=layout)
    tokens = int(batch["attention_mask"].sum())
    print(json.dumps({"layout": layout, "pairs": len(chunk), "tokens_in_batch": tokens,
                      "tokens_counted_as_trl": count_tokens(chunk), "columns": list(batch["input_ids"].shape)}))

    def step() -> Any:
        terms = orpo_forward(model, adapter, batch, lam=recipe.orpo.lam, nll_on_prompt=True, layout=layout)
        return terms.loss

    step().backward()  # warm-up: first-call allocations and caches
    model.zero_grad(set_to_none=True)
    print(json.dumps(_rss_timeline(model, step)))
    model.zero_grad(set_to_none=True)
    by_part = _saved_bytes(model, step)
    print(json.dumps({"saved_bytes_per_token": {k: round(v / tokens) for k, v in by_part.items()},
                      "total_per_token": round(sum(by_part.values()) / tokens),
                      "total_mb": round(sum(by_part.values()) / 2**20, 1)}))
    model.zero_grad(set_to_none=True)
    _time(model, step, args.top)
    if paths is not None:
        paths.undo()


def _as_training_does(model: Any, adapter: Any, recipe: Any) -> Any:
    """The speed paths training/setup.py installs on a CPU run; the caller undoes them (.undo())."""
    import torch

    from orpo_cli.kernels import apply_speed_paths

    paths = apply_speed_paths(model, device="cpu", dtype=torch.float32, adapter=adapter,
                              setting=recipe.train.speed_paths,
                              gradient_checkpointing=recipe.train.gradient_checkpointing)
    print(json.dumps(paths.record()))
    return paths


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _rss_timeline(model: Any, step: Any) -> dict[str, float]:
    """RSS (MB) before the step, after its forward, and its peak through the backward (Linux: VmHWM reset)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what the warm-up step freed, so the figures start clean
    before = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    loss = step()
    after_forward, peak_forward = _rss_mb("VmRSS"), _rss_mb("VmHWM")
    loss.backward()
    del loss
    return {"rss_before_mb": round(before), "forward_mb": round(after_forward - before),
            "forward_peak_mb": round(peak_forward - before), "step_peak_mb": round(_rss_mb("VmHWM") - before),
            "after_mb": round(_rss_mb("VmRSS") - before)}


def _saved_bytes(model: Any, step: Any) -> dict[str, int]:
    """Bytes saved for backward during one forward, by part: one count per storage, parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    stack: list[str] = ["other"]
    seen: dict[int, tuple[str, int]] = {}

    def pre(name: str):
        def hook(_m: Any, _i: Any) -> None:
            stack.append(name)
        return hook

    def post(_m: Any, _i: Any, _o: Any) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        part = _PARTS.get(last)
        if part is None and name.endswith(("lm_head", "embed_tokens")):
            part = "embed_or_head"
        if part is None and last == "norm" and "layers" not in name:
            part = "final_norm"
        if part:
            handles.append(module.register_forward_pre_hook(pre(part)))
            handles.append(module.register_forward_hook(post))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (stack[-1], storage.nbytes())
        return t

    from orpo_cli.kernels.recompute import observing_kept

    # The recomputation's hooks are the innermost: what it keeps is seen through observing_kept.
    with observing_kept(model, pack), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    for h in handles:
        h.remove()
    # The head: saved inside the chunked loss (its own autograd function) is counted under "other".
    loss.backward()
    out: dict[str, int] = collections.defaultdict(int)
    for part, nbytes in seen.values():
        out[part] += nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _time(model: Any, step: Any, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step().backward()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    print(json.dumps({"step_cpu_s": round(total / 1e6, 3)}))
    for e in rows:
        print(json.dumps({"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 3), "calls": e.count,
                          "share": round(e.self_cpu_time_total / total, 3)}))


if __name__ == "__main__":
    main()
