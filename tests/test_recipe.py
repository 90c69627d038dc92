"""The recipe schema: defaults, aliases, overrides and the one-line errors users see."""

from pathlib import Path

import pytest

from orpo_cli.errors import UserError
from orpo_cli.recipe import Recipe, apply_overrides, load_recipe

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(UserError) as info:
        load_recipe(_write(tmp_path, text), overrides)
    return str(info.value)


def test_defaults_follow_the_paper(tmp_path):
    recipe = load_recipe(_write(tmp_path, "{}"))
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
    recipe = load_recipe(_write(tmp_path, "orpo: {beta: 0.25}"))
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
    msg = _error(tmp_path, "train: {lr: fast}")
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
        ("model: {dtype: float8}", "model.dtype"),
    ],
)
def test_out_of_range_values(tmp_path, text, where):
    assert where in _error(tmp_path, text)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    msg = _error(tmp_path, "train:\n  lr: 1\n bad: [\n")
    assert "r.yaml:" in msg and "invalid YAML" in msg
    line = msg.split("r.yaml:")[1].split(":")[0]
    assert line.isdigit() and int(line) >= 2


def test_a_list_is_not_a_recipe(tmp_path):
    assert "mapping" in _error(tmp_path, "- a\n- b\n")


def test_overrides_parse_yaml_scalars_and_validate(tmp_path):
    path = _write(tmp_path, "train: {lr: 1.0e-5}")
    recipe = load_recipe(
        path, ["train.lr=3e-4", "train.gradient_checkpointing=true", "adapter.target_modules=[q_proj]"]
    )
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.train.gradient_checkpointing is True
    assert recipe.adapter.target_modules == ["q_proj"]
    assert "lr: 0.0003" in recipe.to_yaml()
    assert "train.lrr" in _error(tmp_path, "{}", ["train.lrr=1"])


def test_override_syntax_errors():
    with pytest.raises(UserError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(UserError, match="is a value"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_full_finetuning_refuses_quantized_weights(tmp_path):
    assert "quantization.mode" in _error(tmp_path, "adapter: {kind: none}\nquantization: {mode: 4bit}")


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
