"""The recipe schema: defaults, aliases, overrides and the one-line errors users see."""

from pathlib import Path

import pytest

from orpo_cli.errors import UserError
from orpo_cli.recipe import Recipe
from orpo_cli.recipe_loading import apply_overrides, load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(_write(tmp_path, text), overrides)
    return str(info.value)


MINIMAL = "model: {name_or_path: builtin:tiny-llama}\ndata: {train: builtin:demo}\n"


def test_defaults_follow_the_paper(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL))
    assert recipe.orpo.lam == 0.1
    assert recipe.orpo.nll_on_prompt is False
    assert recipe.train.scheduler == "cosine" and recipe.train.warmup_ratio > 0
    assert recipe.model.trust_remote_code is False
    assert recipe.name == "r"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_starts_with_its_command(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    comments = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any(f"orpo-tune train recipes/{path.name}" in line for line in comments)


def test_beta_is_an_alias_of_lambda(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL + "orpo: {beta: 0.25}"))
    assert recipe.orpo.lam == 0.25
    assert recipe.resolved()["orpo"]["lambda"] == 0.25


def test_lambda_and_beta_together_is_an_error(tmp_path):
    assert "not both" in _error(tmp_path, "orpo: {lambda: 0.1, beta: 0.2}")


def test_unknown_top_level_key_suggests_the_nearest(tmp_path):
    msg = _error(tmp_path, "trian: {lr: 1.0e-5}")
    assert "trian" in msg and "did you mean `train`" in msg


def test_unknown_nested_key_names_its_path(tmp_path):
    msg = _error(tmp_path, "train: {lrr: 1.0e-5}")
    assert "train.lrr" in msg and "`train.lr`" in msg


def test_unknown_adapter_key_uses_the_adapter_kind(tmp_path):
    msg = _error(tmp_path, "adapter: {kind: reft, rnk: 4}")
    assert "adapter.rnk" in msg and "`adapter.rank`" in msg


def test_wrong_type_names_the_field_and_value(tmp_path):
    msg = _error(tmp_path, MINIMAL + "train: {lr: fast}")
    assert msg.count("\n") == 0
    assert "train.lr" in msg and "'fast'" in msg


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("train: {lr: -1.0}", "train.lr"),
        ("orpo: {lambda: -0.5}", "orpo.lambda"),
        ("adapter: {kind: lora, r: 0}", "adapter.r"),
        ("adapter: {kind: reft, rank: 0}", "adapter.rank"),
        ("train: {micro_batch_size: 0}", "train.micro_batch_size"),
        ("orpo: {max_length: 64, max_prompt_length: 64}", "max_prompt_length"),
        ("adapter: {kind: reft, positions: x2}", "adapter.positions"),
        ("adapter: {kind: dora}", "adapter"),
        ("train: {warmup_ratio: 1.0}", "train.warmup_ratio"),
        ("model: {name_or_path: x, dtype: float8}", "model.dtype"),
    ],
)
def test_out_of_range_values(tmp_path, text, where):
    base = MINIMAL.split("\n", 1)[1] if text.startswith("model") else MINIMAL
    assert where in _error(tmp_path, base + text)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    msg = _error(tmp_path, "train:\n  lr: 1\n bad: [\n")
    assert "r.yaml:" in msg and "invalid YAML" in msg
    line = msg.split("r.yaml:")[1].split(":")[0]
    assert line.isdigit() and int(line) >= 2


def test_a_list_is_not_a_recipe(tmp_path):
    assert "mapping" in _error(tmp_path, "- a\n- b\n")


def test_overrides_parse_yaml_scalars_and_validate(tmp_path):
    path = _write(tmp_path, MINIMAL + "train: {lr: 1.0e-5}")
    recipe = load_recipe(
        path, ["train.lr=3e-4", "train.gradient_checkpointing=true", "adapter.target_modules=[q_proj]"]
    )
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.train.gradient_checkpointing is True
    assert recipe.adapter.target_modules == ["q_proj"]
    assert "lr: 0.0003" in recipe.to_yaml()
    assert "train.lrr" in _error(tmp_path, MINIMAL, ["train.lrr=1"])


def test_override_syntax_errors():
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(UserError, match="is a value"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_full_finetuning_refuses_quantized_weights(tmp_path):
    assert "quantization.mode" in _error(tmp_path, MINIMAL + "adapter: {kind: full}\nquantization: {mode: 4bit}")


def test_every_field_has_a_description():
    def walk(model, path=""):
        for name, info in model.model_fields.items():
            assert info.description, f"{path}{name} has no description"
            sub = info.annotation
            for arg in (sub, *getattr(sub, "__args__", ())):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    walk(arg, f"{path}{name}.")

    walk(Recipe)
    from orpo_cli.recipe import FullSettings, LoraSettings, ReftSettings

    for adapter in (LoraSettings, ReftSettings, FullSettings):
        walk(adapter, "adapter.")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["the recipe is empty", "model.name_or_path", "data.train"]),
        ("# only a comment\n", ["the recipe is empty"]),
        ("data: {train: builtin:demo}\n", ["model.name_or_path: required and missing"]),
        ("model: {name_or_path: builtin:tiny-llama}\n", ["data.train: required and missing"]),
        ("model: {dtype: fp32}\ndata: {train: builtin:demo}\n", ["model.name_or_path: required and missing"]),
        ("model: {name_or_path: builtin:tiny-llama}\ndata: {format: pairs}\n", ["data.train: required and missing"]),
    ],
    ids=["empty", "comments", "no-model", "no-data", "no-name", "no-train"],
)
def test_model_and_data_are_never_defaulted(tmp_path, text, expected):
    msg = _error(tmp_path, text)
    assert msg.count("\n") == 0, msg
    for words in expected:
        assert words in msg, msg


def test_the_model_and_data_can_come_from_overrides(tmp_path):
    recipe = load_recipe(_write(tmp_path, ""), ["model.name_or_path=builtin:micro-llama", "data.train=builtin:demo"])
    assert recipe.model.name_or_path == "builtin:micro-llama" and recipe.data.train.path == "builtin:demo"


@pytest.mark.parametrize(
    ("text", "key", "lines"),
    [
        (MINIMAL + "train: {lr: 1.0e-5}\ntrain: {max_steps: 3}\n", "`train`", (3, 4)),
        (MINIMAL + "train:\n  lr: 1.0e-5\n  max_steps: 3\n  lr: 2.0e-5\n", "`train.lr`", (4, 6)),
        (MINIMAL + "orpo: {lambda: 0.1, max_length: 64, lambda: 0.2}\n", "`orpo.lambda`", (3, 3)),
        (MINIMAL.replace("{train: builtin:demo}", "{train: {path: a.jsonl, path: b.jsonl}}"), "`data.train.path`", (2, 2)),
    ],
    ids=["two-sections", "lr-twice", "flow-mapping", "nested"],
)
def test_a_key_given_twice_is_an_error_with_both_lines(tmp_path, text, key, lines):
    msg = _error(tmp_path, text)
    assert f"r.yaml:{lines[1]}: duplicate key {key} (also on line {lines[0]})" in msg, msg


def test_merge_keys_may_still_be_overridden(tmp_path):
    text = MINIMAL + "x-base: &base {lr: 1.0e-5, max_steps: 3}\n"
    recipe_text = text.replace("x-base: &base", "train: &base") + "orpo: {<<: {max_length: 64}, max_length: 96, max_prompt_length: 32}\n"
    recipe = load_recipe(_write(tmp_path, recipe_text))
    assert recipe.orpo.max_length == 96 and recipe.train.max_steps == 3


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("train: {lr: .inf}", "train.lr"),
        ("train: {lr: .nan}", "train.lr"),
        ("train: {weight_decay: .inf}", "train.weight_decay"),
        ("train: {max_grad_norm: -.inf}", "train.max_grad_norm"),
        ("train: {adam_betas: [.nan, 0.999]}", "train.adam_betas[0]"),
        ("train: {epochs: .inf}", "train.epochs"),
        ("orpo: {lambda: .nan}", "orpo.lambda"),
        ("adapter: {kind: lora, alpha: .inf}", "adapter.alpha"),
        ("data: {train: builtin:demo, eval_ratio: .nan}", "data.eval_ratio"),
    ],
)
def test_non_finite_numbers_are_refused_in_every_field(tmp_path, text, where):
    msg = _error(tmp_path, MINIMAL.replace("data: {train: builtin:demo}\n", "") + text
                 + ("" if text.startswith("data") else "\ndata: {train: builtin:demo}"))
    assert msg.count("\n") == 0, msg
    assert f"{where}: must be a finite number" in msg, msg


def test_a_finite_value_next_to_it_is_fine(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL + "train: {lr: 1.0e+3, weight_decay: 0.0}"))
    assert recipe.train.lr == 1000.0


def test_non_finite_override_is_refused(tmp_path):
    assert "train.max_grad_norm: must be a finite number" in _error(tmp_path, MINIMAL, ["train.max_grad_norm=.inf"])


def test_recipe_that_is_not_utf8_or_a_directory(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(MINIMAL.encode() + b"name: caf\xe9\n")
    with pytest.raises(UserError, match="not UTF-8"):
        load_recipe(path)
    with pytest.raises(UserError, match="is a directory"):
        load_recipe(tmp_path)


def test_every_adapter_kind_has_one_implementation_and_one_error_text():
    import orpo_cli.adapters as adapters
    from orpo_cli.recipe import ADAPTER_KINDS, ADAPTER_MODELS
    from orpo_cli.recipe_loading import validate_recipe

    assert list(adapters._ADAPTERS) == list(ADAPTER_KINDS) == list(ADAPTER_MODELS)
    for kind, model in ADAPTER_MODELS.items():
        assert model.model_fields["kind"].default == kind
        assert adapters.build_adapter(model()).name == kind  # what messages and a bundle's manifest call it
        assert adapters.build_adapter(model()).packs_pairs is model.packs_pairs  # the planner reads the settings'
    assert Recipe.model_fields["adapter"].description == "What trains: lora, reft or full."
    with pytest.raises(UserError, match=r"adapter: unknown kind 'dora'; use one of lora, reft, full"):
        validate_recipe({"model": {"name_or_path": "m"}, "data": {"train": "d.jsonl"}, "adapter": {"kind": "dora"}})


def test_adapter_kind_none_is_read_as_full_and_says_so(tmp_path, capsys):
    """`full` names full fine-tuning; `none`, its old name, still loads (an old recipe, a run's recipe.yaml), as full."""
    from orpo_cli.adapters import build_adapter
    from orpo_cli.recipe import FullSettings
    from orpo_cli.recipe_loading import load_recipe

    old = tmp_path / "old.yaml"
    old.write_text(MINIMAL + "adapter: {kind: none}\n", encoding="utf-8")
    recipe = load_recipe(old)
    assert isinstance(recipe.adapter, FullSettings) and recipe.adapter.kind == "full"
    assert "adapter.kind: none is the old name of adapter.kind: full" in capsys.readouterr().err
    assert build_adapter(recipe.adapter).name == "full" and build_adapter(recipe.adapter).trains_base
    new = tmp_path / "new.yaml"
    new.write_text(MINIMAL + "adapter: {kind: full}\n", encoding="utf-8")
    assert load_recipe(new).adapter == recipe.adapter
    assert "old name" not in capsys.readouterr().err
