"""ORPO training steps, TRL's ORPOTrainer against orpo-tune's engine, side by side, each in a fresh process.

    make bench                                   # the reference configuration, both objectives
    .venv/bin/python bench/orpo_bench.py --steps 6 --nll-on-prompt true
    .venv/bin/python bench/orpo_bench.py --model builtin:smollm2-135m-instruct --steps 3 --batch 2
    .venv/bin/python bench/orpo_bench.py --shape smollm2-135m --steps 3 --batch 2   # the same shape, no model

The model is random-initialised (seed 42); what is real is its shape. By default it is a small Llama
(hidden 256, 4 layers, 8 heads, 4 KV heads, MLP 688, Phi-3's tokenizer and vocabulary). ``--model NAME_OR_PATH``
takes the architecture (model type, hidden, layers, heads, KV heads, MLP, vocabulary, tied embeddings)
and the tokenizer from a model's config: ``builtin:NAME`` or a local Hugging Face directory (config.json,
and a tokenizer unless ``--tokenizer`` names one; no weights are read). ``--shape NAME`` is a named real
shape for a Llama with the default tokenizer (``SHAPES``: smollm2-135m, llama3-8b). Explicit ``--hidden``,
``--layers``, ``--heads``, ``--kv-heads``, ``--intermediate``, ``--vocab`` and ``--tie`` override either.

Both implementations get the same random Llama-shaped model (saved once, loaded by each child), the same
tokenizer, the same token ids, the same pairs in the same order, the same batch, LoRA settings and
number of steps. The parent prints one JSON line per implementation, then one line of ratios (ours / TRL)
per objective:

* ``tokens_per_s``: non-padding tokens of the chosen and rejected sequences (prompt counted in both, as
  `orpo_cli.training.batching.count_tokens` does) over the wall time of the timed steps;
* ``s_per_step``: mean wall time of a timed step (the first ``--warmup`` steps are not timed);
* ``peak_mem_mb``: peak resident memory of the child (``ru_maxrss``) on a CPU, peak CUDA memory allocated
  on a GPU;
* ``first_loss``: the loss of the first step, at full precision.

TRL has one objective (NLL over prompt and response, which is orpo-tune's ``nll_on_prompt: true``), so its
first loss equals ours only there; with ``--nll-on-prompt false`` ours runs the paper's objective (NLL on
the response only) against the same TRL run.

How each side is driven:

* TRL: ``trl.experimental.orpo.ORPOTrainer`` with a ``peft.LoraConfig``, untouched but for three
  overrides that change nothing in its step: ``tokenize_row`` returns the token ids orpo-tune's data
  preparation made (so both see identical tokens), the sampler is sequential over a dataset already
  in orpo-tune's order, and ``compute_loss`` records the loss. Steps are timed by a callback at
  ``on_step_end``.
* orpo-tune: ``orpo_cli.recipe_loading.validate_recipe`` + ``orpo_cli.training.setup.start_run``, the same path as
  ``orpo-tune train``, with ``log_every: 1`` (TRL logs every step too); steps are timed where the engine
  calls ``Reporter.advance``, right after each optimizer step, and the first loss is read from
  ``metrics.jsonl``.

Also printed: ``rss_at_start_mb``, the resident memory when training starts (libraries, model and data
loaded), the floor both peaks stand on; ``threads``; ``tokens_per_step``.

The data, unless ``--data`` names a file, is generated deterministically: UltraFeedback-style rows
(``prompt``, ``chosen`` and ``rejected`` as user/assistant message lists, rendered with the tokenizer's
chat template), of exactly ``(warmup + steps) * batch`` pairs, so one epoch covers the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "phi3"
RESULT_TAG = "BENCH_RESULT "
SEED = 42
LAMBDA = 0.1

# Named real shapes (--shape): the architecture numbers of released models' config.json files.
SHAPES: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): LlamaForCausalLM, tied embeddings
    "smollm2-135m": {"hidden": 576, "layers": 30, "heads": 9, "kv_heads": 3, "intermediate": 1536,
                     "vocab": 49152, "tie": True},
    # meta-llama/Meta-Llama-3-8B(-Instruct)
    "llama3-8b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336,
                  "vocab": 128256, "tie": False},
}
_DEFAULT_SHAPE = {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4, "intermediate": 688, "vocab": None,
                  "tie": False}
# shape key -> the config attribute it sets
_CONFIG_FIELDS = {"hidden": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads",
                  "kv_heads": "num_key_value_heads", "intermediate": "intermediate_size", "vocab": "vocab_size",
                  "tie": "tie_word_embeddings"}


# ----------------------------------------------------------------------------------------------- options
def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                        help="take the architecture and tokenizer from this model's config: builtin:NAME or a local "
                        "Hugging Face directory (random weights)")
    source.add_argument("--shape", default=None, choices=sorted(SHAPES),
                        help="a named real shape for a random Llama: " + "; ".join(
                            f"{name}: " + ", ".join(f"{k} {v}" for k, v in shape.items()) for name, shape in SHAPES.items()))
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 256, or the model's / shape's)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default 8)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default 4)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 688)")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary rows (default: the model's / shape's, else the tokenizer's rounded up to 64)")
    p.add_argument("--tie", default=None, action=argparse.BooleanOptionalAction,
                   help="tie the output head to the input embedding (default: the model's / shape's, else no)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory (default: the model's with --model, else the Phi-3 one)")
    p.add_argument("--data", default=None, help="a jsonl of UltraFeedback-style rows; default: generated")
    p.add_argument("--rows", type=int, default=None,
                   help="rows to generate (default: as many pairs as the steps take); the steps take the first "
                   "pairs of their seeded shuffle")
    p.add_argument("--batch", type=int, default=4, help="pairs per step (default 4)")
    p.add_argument("--max-length", type=int, default=512, help="max prompt + response tokens (default 512)")
    p.add_argument("--steps", type=int, default=6, help="timed steps (default 6)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument(
        "--nll-on-prompt", default="both", choices=["true", "false", "both"],
        help="orpo-tune's objective: true = TRL's (NLL on prompt too), false = the paper's, both (default)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="weights and compute dtype of both (default: fp32 on a CPU, bf16 on a GPU)")
    p.add_argument("--quantize", default="none", choices=["none", "4bit"],
                   help="4bit: the frozen base in bitsandbytes NF4 with double quantization, in both (QLoRA)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="the GPU's dense bf16 peak, for model FLOPs utilisation (default: 989 for H100/H200)")
    p.add_argument("--impl", default="trl,ours", help="comma-separated: trl, ours (default both)")
    p.add_argument("--layout", default=None, choices=["packed", "prefix", "padded"],
                   help="orpo-tune's batch layout (default: the engine's choice for LoRA, packed)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank, alpha = 2r, on all linear layers (default 16)")
    p.add_argument(
        "--threads", type=int, default=0,
        help="CPU threads for both children (OMP/MKL and torch); 0 = torch's default, one per core",
    )
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="activation checkpointing in both implementations"
    )
    p.add_argument(
        "--malloc-mmap-threshold", type=int, default=0,
        help="glibc MALLOC_MMAP_THRESHOLD_ (bytes) for both children: freed blocks above it go back to the OS "
        "(0 = glibc's default, a dynamic threshold)",
    )
    p.add_argument("--repeat", type=int, default=1, help="run everything N times, interleaved; print medians")
    p.add_argument("--workdir", default=None, help="keep the model, data and runs here (default: a temp dir)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-nll-on-prompt", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------------------- data
_WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an not which have has but "
    "they one you all their there can more if will about would so what when use other into than these some "
    "time only could them may then first also new any like such how well two should used each because most "
    "example model data value function result system process number different between through where both "
    "method however while important within given approach without problem information question answer "
    "consider following point case large small simple general specific possible likely often usually "
    "first second third step list write explain describe compare analysis error code python table summary "
    "research study evidence support argument history science energy water climate health market policy "
    "language learning training network layer output input memory speed cost benefit risk quality user"
).split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 20))]
    text = " ".join(words)
    if rng.random() < 0.15:
        text += f" {rng.randint(2, 2024)}"
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!", ":"])


def _text(rng: random.Random, words: int) -> str:
    parts, count = [], 0
    while count < words:
        sentence = _sentence(rng)
        count += sentence.count(" ") + 1
        parts.append(sentence)
        if rng.random() < 0.2:
            parts.append("\n\n")
    return " ".join(parts).replace(" \n\n ", "\n\n").strip()


def _lognormal_words(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(0.0, sigma) * median)))


def generate_rows(count: int, seed: int = SEED) -> list[dict[str, Any]]:
    """UltraFeedback-binarized-style rows: a prompt string, chosen and rejected user/assistant message lists.

    Lengths are drawn like UltraFeedback's: prompts from a few words to a couple of hundred (median ~90),
    responses of some hundreds of words (median ~230 chosen, ~200 rejected), so most responses reach
    max_length 512 and are cut there.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        prompt = _text(rng, _lognormal_words(rng, 90, 0.8, 8, 190))
        chosen = _text(rng, _lognormal_words(rng, 230, 0.5, 40, 420))
        rejected = _text(rng, _lognormal_words(rng, 200, 0.6, 20, 420))
        user = {"role": "user", "content": prompt}
        rows.append({
            "prompt": prompt,
            "chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}],
            "score_chosen": 8.0,
            "score_rejected": 4.0,
        })
    return rows


def _recipe_dict(args: argparse.Namespace, work: Path, nll_on_prompt: bool, out: Path) -> dict[str, Any]:
    """The orpo-tune recipe both children prepare their data from (and orpo-tune trains with)."""
    return {
        "name": "bench",
        "seed": SEED,
        "output_dir": str(out),
        "model": {"name_or_path": str(work / "model"), "dtype": _dtype_name(args), "device": args.device,
                  "attn_implementation": "sdpa"},
        "quantization": {"mode": args.quantize},
        "adapter": {"kind": "lora", "r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "target_modules": "all-linear"},
        "orpo": {"lambda": LAMBDA, "max_length": args.max_length, "max_prompt_length": args.max_length // 2,
                 "nll_on_prompt": nll_on_prompt},
        "data": {"train": {"path": str(work / "data.jsonl")}, "format": "conversational", "eval_ratio": 0.0},
        "train": {
            "max_steps": args.warmup + args.steps, "micro_batch_size": args.batch, "gradient_accumulation": 1,
            "lr": 1e-6, "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0,
            "gradient_checkpointing": args.gradient_checkpointing, "mixed_precision": "no", "log_every": 1, "eval_every": None,
            "save_every": None, "tensorboard": False,
        },
    }


def _ordered_pairs(args: argparse.Namespace, work: Path) -> tuple[list[Any], int]:
    """orpo-tune's pairs for this data, in the order its engine visits them, and the tokenizer's pad id."""
    from orpo_cli.data.prepare import prepare_data
    from orpo_cli.models.loading import load_tokenizer
    from orpo_cli.recipe_loading import validate_recipe
    from orpo_cli.training.batching import micro_batches

    recipe = validate_recipe(_recipe_dict(args, work, True, work / "unused"))
    tokenizer = load_tokenizer(recipe.model.name_or_path)
    pairs = prepare_data(recipe.data, recipe.orpo, tokenizer).train
    stream = micro_batches(pairs, args.batch, SEED, 0)
    ordered = [pair for _ in range(args.warmup + args.steps) for pair in next(stream)]
    return ordered, tokenizer.pad_token_id


def token_floor(args: argparse.Namespace, ordered: list[Any]) -> dict[str, Any]:
    """The tokens each implementation's model runs over the timed steps, and their ratio: the speed floor.

    TRL runs 2B rows (chosen, then rejected) padded to the batch's longest prompt + response, the prompt in
    both; orpo-tune runs each pair's prompt once and its two responses, packed (``input_ids`` of its packed
    batch: the padding at the row's end included). The ratio TRL / orpo-tune is the speed-up that the token
    count alone allows; its inverse the activation memory ratio it allows.
    """
    from orpo_cli.training.batching import collate_pairs

    trl = ours = 0
    for i in range(args.warmup, args.warmup + args.steps):
        chunk = ordered[i * args.batch : (i + 1) * args.batch]
        longest = max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in chunk)
        trl += 2 * len(chunk) * longest
        ours += collate_pairs(chunk, 0, layout=args.layout or "packed")["input_ids"].numel()
    return {"trl_tokens_run": trl, "ours_tokens_run": ours, "token_floor": round(trl / ours, 2)}


def _step_tokens(args: argparse.Namespace, ordered: list[Any]) -> list[int]:
    from orpo_cli.training.batching import count_tokens

    return [count_tokens(ordered[i * args.batch : (i + 1) * args.batch]) for i in range(args.warmup + args.steps)]


def _device(args: argparse.Namespace) -> str:
    import torch

    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def _dtype_name(args: argparse.Namespace) -> str:
    if args.dtype != "auto":
        return args.dtype
    return "bf16" if _device(args) == "cuda" else "fp32"


def _torch_dtype(args: argparse.Namespace) -> Any:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[_dtype_name(args)]


def _mfu(args: argparse.Namespace, device: str, tokens_per_s: float, params: int) -> float | None:
    """Model FLOPs utilisation: 4 N tokens/s over the GPU's dense bf16 peak (frozen base: forward 2N, backward
    2N for the activations' gradients, none for the frozen weights'); None on a CPU."""
    if device != "cuda":
        return None
    import torch

    peak = args.peak_tflops
    if not peak:
        name = torch.cuda.get_device_name()
        peak = 989.0 if ("H100" in name or "H200" in name) else 0.0
    return round(4 * params * tokens_per_s / (peak * 1e12), 4) if peak else None


def _matmul_params(work: Path) -> int:
    """N for the FLOPs count: the parameters of the saved model that multiply activations (not the input
    embedding, a lookup), counted from its config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(work / "model"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total - (embedding.numel() if embedding is not head else 0)


def _peak_mem_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Clock:
    """Wall and process-CPU time at the start of training and at the end of every optimizer step.

    The CPU time (user + system, all threads) is what the step cost this process; on a shared machine it
    moves much less than the wall time, which includes waiting for a core.
    """

    def __init__(self, device: str):
        self.device = device
        self.marks: list[tuple[float, float]] = []
        self.rss_at_start_mb: float | None = None

    def start(self) -> None:
        with open("/proc/self/status", encoding="ascii") as fh:  # libraries, model and data are loaded
            kib = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        self.rss_at_start_mb = kib / 1024
        self.tick()

    def tick(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), time.process_time()))

    def timed(self, warmup: int) -> tuple[list[float], list[float]]:
        """(wall, cpu) seconds of each step after the first `warmup` ones."""
        marks = self.marks[warmup:]
        return (
            [b[0] - a[0] for a, b in zip(marks, marks[1:], strict=False)],
            [b[1] - a[1] for a, b in zip(marks, marks[1:], strict=False)],
        )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _result(impl: str, args: argparse.Namespace, nll_on_prompt: bool | None, tokens: list[int],
            clock: _Clock, first_loss: float) -> dict[str, Any]:
    seconds, cpu = clock.timed(args.warmup)
    if len(seconds) != args.steps:
        raise RuntimeError(f"{impl}: timed {len(seconds)} steps, expected {args.steps}")
    timed_tokens = sum(tokens[args.warmup :])
    params = _matmul_params(Path(args.workdir))
    return {
        "impl": impl,
        "nll_on_prompt": nll_on_prompt,
        "tokens_per_s": round(timed_tokens / sum(seconds), 1),
        "s_per_step": round(statistics.fmean(seconds), 3),
        "peak_mem_mb": round(_peak_mem_mb(clock.device), 1),
        "first_loss": first_loss,
        "cpu_s_per_step": round(statistics.fmean(cpu), 3),
        "tokens_per_cpu_s": round(timed_tokens / sum(cpu), 1),
        "rss_at_start_mb": round(clock.rss_at_start_mb, 1) if clock.rss_at_start_mb is not None else None,
        "threads": _threads(),
        "steps": len(seconds),
        "tokens_per_step": round(timed_tokens / len(seconds), 1),
        "device": clock.device,
        "dtype": _dtype_name(args),
        "quantize": args.quantize,
        "model_params": params,
        "peak_above_start_mb": round(_peak_mem_mb(clock.device) - clock.rss_at_start_mb, 1)
        if clock.device == "cpu" and clock.rss_at_start_mb is not None else None,
        "mfu": _mfu(args, clock.device, timed_tokens / sum(seconds), params),
        **token_floor(args, _ordered_pairs(args, Path(args.workdir))[0]),
    }


# -------------------------------------------------------------------------------------------------- TRL
def _run_trl(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    device = _device(args)
    ordered, _pad = _ordered_pairs(args, work)
    tokens = _step_tokens(args, ordered)

    class Trainer(ORPOTrainer):
        losses: list[float] = []

        def tokenize_row(self, feature, model=None):  # orpo-tune's token ids, in TRL's row format
            pair = ordered[feature["index"]]
            out = {"prompt_input_ids": pair.prompt_ids, "prompt_attention_mask": [1] * len(pair.prompt_ids)}
            for side, ids in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
                full = pair.prompt_ids + ids
                out[f"{side}_input_ids"] = full
                out[f"{side}_attention_mask"] = [1] * len(full)
                out[f"{side}_labels"] = [-100] * len(pair.prompt_ids) + ids
            return out

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            Trainer.losses.append(float((loss[0] if return_outputs else loss).detach().float()))
            return loss

    clock = _Clock(device)

    class Clock(TrainerCallback):
        def on_train_begin(self, _args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, _args, state, control, **kwargs):
            clock.tick()

    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))  # the tokenizer orpo-tune loads too
    quantization = None
    if args.quantize == "4bit":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=_torch_dtype(args),
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(work / "model"), dtype=_torch_dtype(args), attn_implementation="sdpa", quantization_config=quantization,
        device_map={"": device} if quantization is not None else None,
    )
    dataset = Dataset.from_list(
        [{"index": i, "prompt": "p", "chosen": "c", "rejected": "r"} for i in range(len(ordered))]
    )
    config = ORPOConfig(
        output_dir=str(work / "trl-out"),
        per_device_train_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=LAMBDA,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=_dtype_name(args) == "bf16",
        fp16=False,
        seed=SEED,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = Trainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        callbacks=[Clock()],
    )
    trainer.train()
    return _result("trl", args, True, tokens, clock, Trainer.losses[0])


# ------------------------------------------------------------------------------------------- orpo-tune
def _run_ours(args: argparse.Namespace, work: Path, nll_on_prompt: bool) -> dict[str, Any]:
    import orpo_cli.progress
    from orpo_cli.recipe_loading import validate_recipe
    from orpo_cli.rundir import RunDir
    from orpo_cli.training.setup import start_run

    device = _device(args)
    ordered, _pad = _ordered_pairs(args, work)
    tokens = _step_tokens(args, ordered)
    out = work / f"ours-{'prompt' if nll_on_prompt else 'paper'}"
    recipe = validate_recipe(_recipe_dict(args, work, nll_on_prompt, out))

    # The engine calls reporter.advance(step) right after each optimizer step: TRL's on_step_end.
    clock = _Clock(device)
    start, advance = orpo_cli.progress.Reporter.start, orpo_cli.progress.Reporter.advance

    def timed_start(self, total_steps: int, done: int) -> None:
        clock.start()
        start(self, total_steps, done)

    def timed_advance(self, step: int) -> None:
        clock.tick()
        advance(self, step)

    orpo_cli.progress.Reporter.start = timed_start
    orpo_cli.progress.Reporter.advance = timed_advance
    start_run(recipe, resume=False, force=True, layout=args.layout)  # None: the engine's own choice
    first_loss = next(r["loss"] for r in RunDir(out).read_metrics() if r.get("step") == 1 and "loss" in r)
    impl = "orpo-tune" + (f" ({args.layout})" if args.layout else "")
    return _result(impl, args, nll_on_prompt, tokens, clock, first_loss)


# ----------------------------------------------------------------------------------------------- parent
def _model_config(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(config of the random model, its tokenizer, the shape as recorded in the results).

    The shape comes from `--model`'s config, a named `--shape` or the defaults; explicit flags override it.
    """
    from transformers import AutoConfig, LlamaConfig

    from orpo_cli.errors import UserError
    from orpo_cli.models.loading import load_tokenizer

    base = None
    if args.model:
        path = _model_dir(args.model)
        try:
            base = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise SystemExit(f"bench: --model {args.model}: cannot read its config.json: {_first_line(err)}") from None
        missing = [attr for attr in _CONFIG_FIELDS.values() if getattr(base, attr, None) is None]
        if missing:
            raise SystemExit(f"bench: --model {args.model}: its config has no {', '.join(missing)} "
                             "(a decoder-only causal LM config is needed)")
        shape = {key: getattr(base, attr) for key, attr in _CONFIG_FIELDS.items()}
        tokenizer_dir = args.tokenizer or path
        source = args.model
    else:
        shape = dict(SHAPES[args.shape] if args.shape else _DEFAULT_SHAPE)
        tokenizer_dir = args.tokenizer or str(DEFAULT_TOKENIZER)
        source = f"shape {args.shape}" if args.shape else "default shape"
    for key in _CONFIG_FIELDS:
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except UserError as err:
        hint = " (pass --tokenizer DIR)" if args.model and not args.tokenizer else ""
        raise SystemExit(f"bench: cannot load the tokenizer {tokenizer_dir}: {err}{hint}") from None
    if shape["vocab"] is None:
        shape["vocab"] = -(-len(tokenizer) // 64) * 64  # padded to a multiple of 64, as Phi-3's 32,064
    if shape["vocab"] < len(tokenizer):
        raise SystemExit(f"bench: vocabulary {shape['vocab']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    if shape["hidden"] % shape["heads"] or shape["heads"] % shape["kv_heads"]:
        raise SystemExit(f"bench: hidden {shape['hidden']}, heads {shape['heads']}, kv heads {shape['kv_heads']}: "
                         "hidden must divide by heads, and heads by kv heads")
    if base is None:
        config = LlamaConfig(max_position_embeddings=max(4096, 2 * args.max_length))
    else:
        config = base
        config.max_position_embeddings = max(config.max_position_embeddings or 0, 2 * args.max_length)
    heads_changed = base is None or (shape["hidden"], shape["heads"]) != (base.hidden_size, base.num_attention_heads)
    for key, attr in _CONFIG_FIELDS.items():
        setattr(config, attr, shape[key])
    if heads_changed and hasattr(config, "head_dim"):
        config.head_dim = shape["hidden"] // shape["heads"]
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.dtype = _torch_dtype(args)  # the weights are initialised and saved in the benchmark's dtype
    recorded = {"source": source, "model_type": config.model_type, **shape,
                "head_dim": getattr(config, "head_dim", None) or shape["hidden"] // shape["heads"],
                "tokenizer": str(tokenizer_dir), "tokenizer_tokens": len(tokenizer)}
    return config, tokenizer, recorded


def _model_dir(name: str) -> str:
    """A builtin's directory (built on first use) or a local directory with a config.json."""
    from orpo_cli.errors import UserError
    from orpo_cli.models.builtin import is_builtin, resolve_model_path

    if is_builtin(name):
        try:
            return resolve_model_path(name)
        except UserError as err:
            raise SystemExit(f"bench: --model {name}: {err}") from None
    local = Path(name).expanduser()
    if not (local / "config.json").is_file():
        raise SystemExit(f"bench: --model {name}: not a builtin:NAME nor a local directory with a config.json "
                         "(the benchmark reads no hub ids: download the model's config.json and tokenizer first)")
    return str(local)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _prepare(args: argparse.Namespace, work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config, tokenizer, shape = _model_config(args)
    if args.data:
        shutil.copyfile(args.data, work / "data.jsonl")
    else:
        rows = generate_rows(args.rows or (args.warmup + args.steps) * args.batch)
        (work / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    torch.manual_seed(SEED)
    default = torch.get_default_dtype()
    torch.set_default_dtype(_torch_dtype(args))  # initialised in the benchmark's dtype: an 8B fp32 copy is 32 GB
    try:
        # On a GPU the random initialisation runs there: 8B parameters drawn on a CPU take minutes.
        with torch.device(_device(args)):
            model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(str(work / "model"))
        del model
    finally:
        torch.set_default_dtype(default)
    tokenizer.save_pretrained(str(work / "model"))  # the model directory is a complete local model
    (work / "shape.json").write_text(json.dumps(shape), encoding="utf-8")
    print(json.dumps({"model": shape}), flush=True)


def _child(args: argparse.Namespace, impl: str, work: Path, nll: bool | None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--child", impl, "--workdir", str(work)]
    if nll is not None:
        cmd += ["--child-nll-on-prompt", str(nll).lower()]
    env = {**os.environ, "ORPO_TUNE_CACHE": str(work / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
    raise SystemExit(f"bench: the {impl} child failed (exit {proc.returncode})")


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.child:
        work = Path(args.workdir)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.child == "trl":
            result = _run_trl(args, work)
        else:
            result = _run_ours(args, work, args.child_nll_on_prompt == "true")
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    objectives = {"true": [True], "false": [False], "both": [True, False]}[args.nll_on_prompt]
    temp = None if args.workdir else tempfile.TemporaryDirectory(prefix="orpo-bench-")
    work = Path(args.workdir or temp.name)
    work.mkdir(parents=True, exist_ok=True)
    ratios: dict[bool, list[dict[str, Any]]] = {nll: [] for nll in objectives}
    try:
        _prepare(args, work)
        for _ in range(args.repeat):  # interleaved, so that a change in the machine's load hits both sides
            trl = _child(args, "trl", work, None) if "trl" in impls else None
            if trl:
                print(json.dumps(trl), flush=True)
            for nll in objectives if "ours" in impls else []:
                ours = _child(args, "ours", work, nll)
                print(json.dumps(ours), flush=True)
                if trl:
                    ratio = _ratios(ours, trl, nll)
                    ratios[nll].append(ratio)
                    print(json.dumps(ratio), flush=True)
        if args.repeat > 1:
            for nll, runs in ratios.items():
                if runs:
                    summary = {k: _median([r[k] for r in runs]) for k in _RATIO_KEYS}
                    print(json.dumps({"ratios": runs[0]["ratios"], "nll_on_prompt": nll, "median_of": len(runs),
                                      **summary, "same_objective": nll}), flush=True)
    finally:
        if temp is not None:
            temp.cleanup()


_RATIO_KEYS = ("tokens_per_s", "tokens_per_cpu_s", "peak_mem_mb", "peak_mem_above_start", "first_loss_diff", "token_floor")


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ratios(ours: dict[str, Any], trl: dict[str, Any], nll: bool) -> dict[str, Any]:
    """ours / TRL for each figure (first_loss_diff: |ours - TRL|, comparable only when same_objective)."""

    def above(r: dict[str, Any]) -> float:
        return r["peak_mem_mb"] - (r["rss_at_start_mb"] or 0.0)

    return {
        "ratios": f"{ours['impl']} / trl",
        "nll_on_prompt": nll,
        "tokens_per_s": round(ours["tokens_per_s"] / trl["tokens_per_s"], 2),
        "tokens_per_cpu_s": round(ours["tokens_per_cpu_s"] / trl["tokens_per_cpu_s"], 2),
        "peak_mem_mb": round(ours["peak_mem_mb"] / trl["peak_mem_mb"], 3),
        "peak_mem_above_start": round(above(ours) / above(trl), 3) if trl["device"] == "cpu" else None,
        "first_loss_diff": abs(ours["first_loss"] - trl["first_loss"]),
        "token_floor": ours["token_floor"],
        "same_objective": nll,
    }


if __name__ == "__main__":
    main()
