"""Docs that are generated must be current."""

from pathlib import Path

from orpo_cli.reference import recipe_reference

ROOT = Path(__file__).parents[1]


def test_recipe_reference_is_current():
    on_disk = (ROOT / "docs" / "recipe-reference.md").read_text(encoding="utf-8")
    assert on_disk == recipe_reference(), (
        "docs/recipe-reference.md is stale: regenerate it with `orpo-tune schema --markdown > docs/recipe-reference.md`"
    )


def _schema_keys(schema: dict, node: dict, prefix: str = "") -> list[str]:
    """Every leaf key of the recipe's JSON schema, walked on its own (a section: a $ref, optional or not; the
    adapter: one section per kind), as dotted YAML paths; a key shared by several adapter kinds comes once each."""
    keys = []
    for name, prop in node["properties"].items():
        refs = [prop] if "$ref" in prop else [p for p in prop.get("anyOf", prop.get("oneOf", [])) if "$ref" in p]
        if not refs:
            keys.append(prefix + name)
        for ref in refs:
            keys += _schema_keys(schema, schema["$defs"][ref["$ref"].rsplit("/", 1)[-1]], f"{prefix}{name}.")
    return keys


def test_recipe_reference_lists_every_key_once():
    """Each key of the schema is one row of the reference (adapter keys: one row per kind that has them)."""
    import re
    from collections import Counter

    from orpo_cli.recipe import Recipe

    schema = Recipe.model_json_schema()
    expected = Counter(_schema_keys(schema, schema))
    assert {"model.name_or_path", "orpo.lambda", "data.train.path", "adapter.rank", "train.lr"} <= set(expected)
    rows = Counter(re.findall(r"^\| `([^`]+)` \|", recipe_reference(), flags=re.MULTILINE))
    assert rows == expected


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


def test_no_stage_reaches_up_lazy_imports_included():
    """architecture.md's layers, held for every import statement, those inside functions included: the stages below
    training (data, models, adapters, kernels, plan) and the shared modules never import training or a verb, and
    training imports no verb (cli.train draws the curves; errors.py holds QuietExit)."""
    import ast

    package = ROOT / "orpo_cli"
    verbs = ("orpo_cli.cli", "orpo_cli.plots", "orpo_cli.evaluate", "orpo_cli.export", "orpo_cli.generation")
    below = ("data", "models", "adapters", "kernels", "plan")
    shared = ("errors", "rundir", "atomic", "progress", "storage", "layouts", "recipe", "recipe_loading", "run_lock")
    found = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[0] in below or parts[0] in shared:
            banned = ("orpo_cli.training", *verbs)
        elif parts[0] == "training":
            banned = verbs
        else:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{'/'.join(parts)} imports {n}" for n in names if n.startswith(banned)]
    assert found == []


def adapter_kind_branches(package: Path) -> list[str]:
    """Every place in `package` outside adapters/ and recipe.py that branches on an adapter method: a comparison of
    something named adapter or kind with a method's name (lora, reft, full or its old name none), or an isinstance
    on a method's settings class."""
    import ast
    import re

    kinds = {"lora", "reft", "full", "none"}
    settings = {"LoraSettings", "ReftSettings", "FullSettings"}
    about_adapter = re.compile(r"\b(adapter|kind)\b|\.adapter\b|adapter\.|_kind\b")
    found = []
    for path in sorted(package.rglob("*.py")):
        where = path.relative_to(package)
        if where.parts[0] == "adapters" or where.as_posix() == "recipe.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                named = {c.value for s in sides for c in ast.walk(s) if isinstance(c, ast.Constant)}
                others = " ".join(ast.unparse(s) for s in sides if not isinstance(s, ast.Constant))
                if named & kinds and about_adapter.search(others):
                    found.append(f"{where.as_posix()}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
                if len(node.args) == 2 and {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & settings:
                    found.append(f"{where.as_posix()}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_adapter_kind_branch_outside_the_adapters_and_the_recipe_schema(tmp_path):
    """Issue 29: the adapter methods differ behind orpo_cli/adapters (torch) and plan/adapter_terms.py (the
    planner's terms), picked once by `adapter.kind` from a registry; nobody else asks which method runs."""
    assert adapter_kind_branches(ROOT / "orpo_cli") == []
    # the scan finds the branches it is for, and leaves comparisons on other settings alone
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "lora.py").write_text('ok = settings.kind == "lora"\n', encoding="utf-8")
    (tmp_path / "recipe.py").write_text('ok = isinstance(adapter, FullSettings)\n', encoding="utf-8")
    (tmp_path / "memory.py").write_text(
        'a = setup.adapter == "lora"\nb = "reft" != recipe.adapter.kind\nc = kind in ("full", "none")\n'
        'd = isinstance(adapter, (LoraSettings, ReftSettings))\ne = quant.mode == "none"\nf = setup.adapter.trains_base\n',
        encoding="utf-8",
    )
    assert [line.split(":")[1] for line in adapter_kind_branches(tmp_path)] == ["1", "2", "3", "4"]
