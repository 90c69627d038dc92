"""Docs that are generated must be current."""

from pathlib import Path

from orpo_cli.reference import recipe_reference

ROOT = Path(__file__).parents[1]


def test_recipe_reference_is_current():
    on_disk = (ROOT / "docs" / "recipe-reference.md").read_text(encoding="utf-8")
    assert on_disk == recipe_reference(), (
        "docs/recipe-reference.md is stale: regenerate it with `orpo-tune schema --markdown > docs/recipe-reference.md`"
    )


def test_recipe_reference_lists_every_key_once():
    text = recipe_reference()
    for key in (
        "model.name_or_path",
        "orpo.lambda",
        "orpo.max_length",
        "orpo.max_prompt_length",
        "train.lr",
        "train.micro_batch_size",
        "train.max_steps",
        "output_dir",
        "data.train.path",
        "adapter.rank",
    ):
        assert f"`{key}`" in text, key


def test_qlora_memory_tables_are_the_planners():
    from orpo_cli.plan.docs import DOC, render

    on_disk = DOC.read_text(encoding="utf-8")
    assert on_disk == render(on_disk), (
        "docs/qlora-memory.md's tables are stale: regenerate them with `python -m orpo_cli.plan.docs`"
    )


def test_qlora_memory_staleness_check_can_fail():
    from orpo_cli.plan.docs import DOC, render

    on_disk = DOC.read_text(encoding="utf-8")
    stale = on_disk.replace("| Mistral-7B | 7.24B |", "| Mistral-7B | 7.99B |")
    assert stale != on_disk and render(stale) != stale
