"""Several processes: `--nproc 2` on the CPU (gloo) runs the same code path as N GPUs and must agree with
one process seeing the same global batches; stops are agreed on; resume needs the same world size.

GPU-only paths (NCCL DDP, FSDP, DeepSpeed) are at the end, marked `gpu`; they skip without CUDA.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from orpo_cli.cli import app
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.training.batching import micro_batches

ROOT = Path(__file__).parents[1]
RECIPE = ROOT / "recipes" / "tiny-lora.yaml"
runner = CliRunner()

# A micro model on a slice of the demo set; lr high enough that 4 steps move the weights well clear of
# float noise. Global batch: 2 pairs x 2 micro-batches x 2 processes = 8 pairs per optimizer step.
MICRO = [
    "model.name_or_path=builtin:micro-llama",
    "data.train.max_rows=96",
    "orpo.max_length=64",
    "orpo.max_prompt_length=32",
    "train.gradient_accumulation=2",
    "train.log_every=1",
    "train.eval_every=2",
    "train.save_every=2",
    "train.tensorboard=false",
]
# What "agree" means for 2 processes vs 1 (the sums run in a different order, nothing else differs):
LOSS_TOL = 1e-4  # absolute, on every logged metric (losses ~7.7; one step changes them by ~1e-2)
WEIGHT_TOL = 1e-5  # absolute, on every adapter weight (4 steps move LoRA B from 0 to ~1e-2)


def _args(out: Path, micro_batch: int, *extra: str, sets: list[str] = MICRO) -> list[str]:
    args = ["train", str(RECIPE), "--output-dir", str(out), "--set", f"train.micro_batch_size={micro_batch}"]
    for item in sets:
        args += ["--set", item]
    return args + list(extra)


def _launch(args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    """`python -m orpo_cli ARGS` in a fresh process (the launcher must not run inside pytest's)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "orpo_cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _pairs(n: int) -> list[TokenizedPair]:
    return [TokenizedPair([i], [i + 1], [i + 2]) for i in range(n)]


# ------------------------------------------------------------------------------------------- data order
def test_ranks_split_each_global_micro_batch_of_one_process():
    """Rank r of w takes every w-th pair of the global micro-batch that one process would take whole."""
    pairs = _pairs(23)
    one = micro_batches(pairs, 6, seed=3, start=0)
    ranks = [micro_batches(pairs, 2, seed=3, start=0, rank=r, world_size=3) for r in range(3)]
    for _ in range(10):  # past the end of an epoch
        whole = [p.prompt_ids[0] for p in next(one)]
        shards = [[p.prompt_ids[0] for p in next(it)] for it in ranks]
        assert sorted(sum(shards, [])) == sorted(whole)
        assert shards[1] == whole[1::3]


def test_no_rank_is_left_without_a_pair_at_an_epochs_end():
    pairs = _pairs(13)  # 4 global micro-batches of 4 per epoch: the last holds 1 pair for 4 ranks
    ranks = [micro_batches(pairs, 1, seed=0, start=0, rank=r, world_size=4) for r in range(4)]
    for _ in range(12):
        assert all(len(next(it)) == 1 for it in ranks)


# --------------------------------------------------------------------------- 2 processes == 1 process
def test_two_processes_agree_with_one_process_on_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launched = _launch(_args(two, 2, "--nproc", "2", "--max-steps", "4"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "2 processes × micro batch 2 × accumulation 2 = global batch of 8 pairs" in launched.stderr
    single = runner.invoke(app, _args(one, 4, "--max-steps", "4"))  # 4 pairs x 2 micro-batches x 1 process
    assert single.exit_code == 0, single.output

    # One run directory, written once: no second metrics file, no rank's leftovers.
    assert sorted(p.name for p in two.iterdir()) == [
        "adapter",
        "checkpoints",
        "metrics.jsonl",
        "recipe.yaml",
        "speed_paths.json",
        "tokenizer",
        "training-curves.png",
    ]
    a, b = _records(one), _records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 2, 3, 4, 4]  # eval at 0, 2, 4
    assert {r["global_batch"] for r in b if "loss" in r} == {8}
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        keys = [k for k, v in x.items() if isinstance(v, float) and k not in ("tokens_per_s", "lr", "epoch")]
        assert keys and set(keys) <= set(y)
        worst = max(worst, *(abs(x[k] - y[k]) for k in keys))
    print(f"\nloss curve, 1 process : {[round(r['loss'], 6) for r in a if 'loss' in r]}")
    print(f"loss curve, 2 processes: {[round(r['loss'], 6) for r in b if 'loss' in r]}")
    print(f"max |metric difference| over every logged metric: {worst:.3g}")
    assert worst <= LOSS_TOL

    wa, wb = _adapter(one), _adapter(two)
    assert wa.keys() == wb.keys() and wa
    moved = max(w.abs().max().item() for k, w in wa.items() if "lora_B" in k)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    print(f"max |adapter weight difference|: {diff:.3g} (largest LoRA B weight, 0 at start: {moved:.3g})")
    assert moved > 100 * WEIGHT_TOL  # the comparison is not between two untrained adapters
    assert diff <= WEIGHT_TOL


# ----------------------------------------------------------------------------- stop, resume, world size
def test_sigterm_stops_every_rank_at_one_step_and_resume_is_bitwise_equal(tmp_path):
    sets = MICRO + [
        "train.micro_batch_size=2",
        "train.scheduler=constant",
        "train.warmup_steps=0",
        "train.lr=1e-3",
        "train.eval_every=1000",
        "train.save_every=1000",
        "adapter.dropout=0.1",  # each rank draws its own dropout masks: their RNG states must come back
    ]
    out, straight = tmp_path / "stopped", tmp_path / "straight"

    def cli(run: Path, *extra: str) -> list[str]:
        return [
            "train",
            str(RECIPE),
            "--output-dir",
            str(run),
            *[a for s in sets for a in ("--set", s)],
            *extra,
        ]

    proc = subprocess.Popen(
        [sys.executable, "-m", "orpo_cli", *cli(out, "--nproc", "2", "--max-steps", "500")],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or len(_records(out)) < 3:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler would
    _, stderr = proc.communicate(timeout=120)  # a rank that stopped alone would hang the other here
    assert proc.returncode == 130, stderr[-3000:]
    stopped = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(stopped) == 1, stopped
    step = int(stopped[0].removeprefix("step-"))
    assert _records(out)[-1]["step"] == step
    assert stderr.count("interrupted at step") == 1  # said once, by rank 0

    # With another world size it is refused; with the same it continues exactly where it stopped.
    until = str(step + 2)
    refused = runner.invoke(app, cli(out, "--nproc", "1", "--max-steps", until, "--resume"))
    assert refused.exit_code == 2 and "trained by 2 processes" in refused.output, refused.output
    resumed = _launch(cli(out, "--nproc", "2", "--max-steps", until, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step-{step}" in resumed.stderr
    done = _launch(cli(straight, "--nproc", "2", "--max-steps", until))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _adapter(out), _adapter(straight)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    cut = [line.split('"tokens_per_s"')[0] for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [line.split('"tokens_per_s"')[0] for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert cut == ref


# -------------------------------------------------------------------------------- pre-flight errors
def _refused(tmp_path: Path, *extra: str):
    out = tmp_path / "never"
    result = runner.invoke(app, _args(out, 2, *extra))
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()  # refused before anything was written (or loaded)
    return result.output


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend this machine has `n` CUDA GPUs (only the pre-flight checks look)."""

    def make(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return make


def test_more_processes_than_gpus_is_refused(tmp_path, fake_gpus):
    fake_gpus(2)
    assert "8 processes on this machine need one CUDA GPU each, but only 2 are visible" in _refused(
        tmp_path, "--nproc", "8"
    )
    fake_gpus(0)
    assert "no CUDA GPU is visible" in _refused(tmp_path, "--nproc", "2", "--set", "model.device=cuda")


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_sharded_strategies_on_cpu_are_refused(tmp_path, fake_gpus, strategy):
    fake_gpus(0)
    assert f"distributed.strategy: {strategy} needs CUDA GPUs" in _refused(
        tmp_path, "--nproc", "2", "--set", f"distributed.strategy={strategy}"
    )


def test_deepspeed_missing_and_zero3_with_4bit_are_refused(tmp_path, fake_gpus, monkeypatch):
    import importlib.util

    fake_gpus(2)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a)
    )
    assert "pip install deepspeed" in _refused(
        tmp_path, "--nproc", "2", "--set", "distributed.strategy=deepspeed"
    )
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "deepspeed" else real(name, *a)
    )
    zero3 = ["--set", "distributed.strategy=deepspeed", "--set", "distributed.deepspeed.zero_stage=3"]
    assert "zero_stage: 3 does not combine with 4bit" in _refused(
        tmp_path, "--nproc", "2", *zero3, "--set", "quantization.mode=4bit"
    )



@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ("{kind: reft}", "adapter.kind: reft does not combine with fsdp: its interventions run from hooks, outside "
         "the modules fsdp gathers weights for; use strategy ddp (ReFT's trainable weights are tiny)"),
        ("{kind: full}", "adapter.kind: full (full fine-tuning) does not combine with fsdp here: the loss uses the "
         "output layer outside the model's forward, so fsdp keeps it whole and cannot train it; use strategy ddp "
         "or deepspeed"),
    ],
)
def test_adapters_that_cannot_be_sharded_are_refused_under_fsdp(tmp_path, fake_gpus, adapter, message):
    fake_gpus(2)
    output = _refused(tmp_path, "--nproc", "2", "--set", "distributed.strategy=fsdp", "--set", f"adapter={adapter}")
    assert message in " ".join(output.split())


def test_only_lora_combines_with_fsdp():
    from orpo_cli.adapters import build_adapter
    from orpo_cli.recipe import ADAPTER_MODELS

    refusals = {kind: build_adapter(model()).fsdp_refusal for kind, model in ADAPTER_MODELS.items()}
    assert refusals["lora"] is None
    assert all(text.startswith(f"adapter.kind: {kind} ") for kind, text in refusals.items() if text is not None)
    assert {kind for kind, text in refusals.items() if text is not None} == {"reft", "full"}


def test_recipe_and_launcher_must_agree(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert "the launcher started 2 processes" in _refused(tmp_path, "--set", "distributed.num_processes=4")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert "accelerate launch was configured for fsdp" in _refused(tmp_path)


def test_num_processes_is_validated():
    result = runner.invoke(app, ["validate", str(RECIPE), "--set", "distributed.num_processes=0"])
    assert result.exit_code == 2 and "distributed.num_processes: must be auto or" in result.output


# ------------------------------------------------------------------------ saving from sharded weights
def test_adapter_saved_from_a_weightless_replica_equals_the_direct_save(tmp_path):
    """What FSDP/ZeRO-3 runs do at the end (gather, then save from meta + gathered weights), checked on CPU."""
    from orpo_cli.adapters import build_adapter, trainable_state
    from orpo_cli.models.loading import load_model, resolve_dtype
    from orpo_cli.recipe_loading import load_recipe
    from orpo_cli.training.setup import weightless_replica

    recipe = load_recipe(RECIPE, MICRO)
    adapter = build_adapter(recipe.adapter)
    device = torch.device("cpu")
    model = load_model(recipe.model, recipe.quantization, device, resolve_dtype("auto", device))
    model = adapter.attach(model, quantized=False, gradient_checkpointing=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()  # trained-looking weights, not the zeros LoRA B starts from
    adapter.save(model, tmp_path / "direct")
    replica = weightless_replica(recipe, adapter, {k: v.clone() for k, v in trainable_state(model).items()})
    adapter.save(replica, tmp_path / "replica")
    a = load_file(str(tmp_path / "direct/adapter_model.safetensors"))
    b = load_file(str(tmp_path / "replica/adapter_model.safetensors"))
    assert a.keys() == b.keys() and a and all(a[k].equal(b[k]) for k in a)


# FSDP itself is GPU-only through accelerate, but torch's FSDP1 runs on CPU with gloo: enough to check the
# pieces this project adds around it, on a 2-rank FSDP model built as accelerate would build it.
_FSDP_CHECK = r"""
import sys, torch, torch.distributed as dist
from pathlib import Path
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from orpo_cli.adapters import build_adapter, trainable_state
from orpo_cli.training.batching import collate_pairs
from orpo_cli.training.checkpoint import read_checkpoint, write_checkpoint
from orpo_cli.data.pairs import TokenizedPair
from orpo_cli.training.strategy import _full_state, _load_full_state, gathered_trainable_weights
from orpo_cli.training.forward import orpo_forward
from orpo_cli.models.loading import load_model
from orpo_cli.recipe_loading import load_recipe
from orpo_cli.training.strategy import fsdp_units, return_decoder_output
from orpo_cli.rundir import RunDir

dist.init_process_group("gloo")
main = dist.get_rank() == 0
recipe = load_recipe(sys.argv[1], ["model.name_or_path=builtin:micro-llama"])
batch = collate_pairs([TokenizedPair([5, 6, 7], [8, 9], [10]), TokenizedPair([5, 6], [11, 12, 13], [14, 15])], 0)

def build(dtype, seed=0):
    torch.manual_seed(seed)
    adapter = build_adapter(recipe.adapter)
    model = load_model(recipe.model, recipe.quantization, torch.device("cpu"), dtype)
    return adapter, adapter.attach(model, quantized=False, gradient_checkpointing=False)

def shard(model):  # as training/setup.py shapes accelerate's FSDP1 plugin
    return_decoder_output(model)
    return FSDP(model, auto_wrap_policy=fsdp_units(model), use_orig_params=True, device_id=torch.device("cpu"),
                ignored_modules=[model.get_output_embeddings()])

def step(model, adapter, opt):
    orpo_forward(model, adapter, batch, lam=0.1, nll_on_prompt=False).loss.backward()
    opt.step()
    opt.zero_grad()

def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

# 1. The loss projects through lm_head after the forward: bf16 base, fp32 LoRA, one FSDP unit per dtype.
adapter, plain = build(torch.bfloat16)
with torch.no_grad():
    expected = orpo_forward(plain, adapter, batch, lam=0.1, nll_on_prompt=False).loss.item()
sharded = shard(plain)
loss = orpo_forward(sharded, adapter, batch, lam=0.1, nll_on_prompt=False).loss
loss.backward()
assert loss.item() == expected
assert all(p.grad is not None for p in sharded.parameters() if p.requires_grad and p.numel())

# 2. Whole state gathered off the shards == the state of the same training without FSDP.
adapter, ref = build(torch.float32)
names = [n for n, p in ref.named_parameters() if p.requires_grad]
ref_opt = adamw(ref)
_, model = build(torch.float32)
model = shard(model)
opt = adamw(model)
for _ in range(2):
    step(ref, adapter, ref_opt)
    step(model, adapter, opt)
weights, opt_state = _full_state(model, opt, names)
want, want_opt = trainable_state(ref), ref_opt.state_dict()
acc = type("Acc", (), {"device": torch.device("cpu"), "is_main_process": main, "distributed_type": None})()
gathered = gathered_trainable_weights(model, acc, names)
if main:
    assert sorted(weights) == sorted(want) == sorted(gathered)
    assert all(weights[k].equal(want[k]) and gathered[k].equal(want[k]) for k in want)
    assert opt_state["param_groups"][0]["params"] == want_opt["param_groups"][0]["params"]
    for i, slots in want_opt["state"].items():
        assert all(opt_state["state"][i][k].equal(v) for k, v in slots.items()), i

# 3. Through a checkpoint file into a fresh FSDP model: it continues exactly as the original does.
run = RunDir(Path(sys.argv[2]))
if main:
    write_checkpoint(run, 2, weights, opt_state, {}, keep=1)
dist.barrier()
_, saved, saved_opt, _ = read_checkpoint(run.checkpoint(2))
_, fresh = build(torch.float32, seed=7)
fresh = shard(fresh)
fresh_opt = adamw(fresh)
_load_full_state(fresh, fresh_opt, saved, saved_opt, names)
step(model, adapter, opt)
step(fresh, adapter, fresh_opt)
(a, a_opt), (b, b_opt) = _full_state(model, opt, names), _full_state(fresh, fresh_opt, names)
if main:
    assert all(a[k].equal(b[k]) for k in a)
    assert all(a_opt["state"][i][k].equal(v) for i, s in b_opt["state"].items() for k, v in s.items())
    print("FSDP CHECK OK")
dist.destroy_process_group()
"""


def test_fsdp_state_gathering_and_resume_on_cpu_fsdp1(tmp_path):
    from orpo_cli.models.builtin import resolve_model_path

    resolve_model_path("builtin:micro-llama")  # built once here, not raced by the two ranks
    script = tmp_path / "fsdp_check.py"
    script.write_text(_FSDP_CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    result = subprocess.run(
        [*cmd, str(RECIPE), str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0 and "FSDP CHECK OK" in result.stdout, result.stderr[-4000:]


# ---------------------------------------------------------------------------------------- GPU only
def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


GPU_SETS = [s for s in MICRO if not s.startswith("train.eval_every")] + [
    "train.eval_every=1000",
    "train.scheduler=constant",
    "train.warmup_steps=0",
]


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="NCCL DDP needs 2 CUDA GPUs")
def test_nccl_ddp_on_two_gpus_agrees_with_one_gpu(tmp_path):
    two = _launch(_args(tmp_path / "two", 2, "--nproc", "2", "--max-steps", "4", sets=GPU_SETS))
    assert two.returncode == 0, two.stderr[-3000:]
    one = _launch(_args(tmp_path / "one", 4, "--nproc", "1", "--max-steps", "4", sets=GPU_SETS))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-3  # bf16 autocast on GPU


def _torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """Through torchrun, as a user would: with one GPU this still runs the FSDP/DeepSpeed code path."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(
        [*cmd, "-m", "orpo_cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 1, reason="FSDP needs a CUDA GPU")
@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_fsdp_trains_checkpoints_resumes_and_saves_the_adapter(tmp_path, quantization):
    sets = GPU_SETS + [
        "distributed.strategy=fsdp",
        f"quantization.mode={quantization}",
        "train.micro_batch_size=2",
    ]
    nproc = min(_gpus(), 2)

    def args(out: Path, *extra: str) -> list[str]:
        return (
            ["train", str(RECIPE), "--output-dir", str(out)]
            + [a for s in sets for a in ("--set", s)]
            + list(extra)
        )

    straight = _torchrun(args(tmp_path / "straight", "--max-steps", "4"), nproc)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _torchrun(args(tmp_path / "split", "--max-steps", "2"), nproc)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun(args(tmp_path / "split", "--max-steps", "4", "--resume"), nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "split")
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 0  # trained, and saved whole


@pytest.mark.gpu
@pytest.mark.skipif(
    _gpus() < 1 or not _deepspeed(), reason="DeepSpeed needs a CUDA GPU and `pip install deepspeed`"
)
def test_deepspeed_zero2_trains_and_saves_the_adapter(tmp_path):
    sets = GPU_SETS + ["distributed.strategy=deepspeed", "train.micro_batch_size=2"]
    out = tmp_path / "ds"
    args = ["train", str(RECIPE), "--output-dir", str(out), "--max-steps", "4"] + [
        a for s in sets for a in ("--set", s)
    ]
    result = _torchrun(args, min(_gpus(), 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert max(v.abs().max().item() for k, v in _adapter(out).items() if "lora_B" in k) > 0
