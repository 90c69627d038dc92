"""The command layer: the only place that reads a recipe file. Each verb is recipe/run dir -> setup -> work."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from orpo_cli import __version__
from orpo_cli.errors import Interrupted, RunFailed, UserError

app = typer.Typer(
    name="orpo-tune",
    help="Align causal language models with ORPO from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key, e.g. --set train.lr=1e-5 (repeatable).", show_default=False),
]


def _user_errors(fn: F) -> F:
    """Turn a UserError into one line on stderr and exit code 2; never a traceback for a user's mistake."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            for line in str(err).splitlines() or ["error"]:
                typer.echo(f"error: {line}", err=True)
            raise typer.Exit(2) from None
        except RunFailed as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except Interrupted as err:
            typer.echo(str(err), err=True)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"orpo-tune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Align causal language models with ORPO from one YAML recipe."""


@app.command()
@_user_errors
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe and print it fully resolved (every default filled in) as YAML."""
    from orpo_cli.recipe import load_recipe

    typer.echo(load_recipe(recipe, set_ or []).to_yaml(), nl=False)


@app.command()
def schema(
    markdown: Annotated[bool, typer.Option(help="Print the recipe reference (docs/recipe-reference.md) instead.")] = False,
) -> None:
    """Print the recipe's JSON Schema (or, with --markdown, the recipe reference)."""
    if markdown:
        from orpo_cli.reference import recipe_reference

        typer.echo(recipe_reference(), nl=False)
        return
    from orpo_cli.recipe import Recipe

    typer.echo(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))


@app.command()
@_user_errors
def init(
    template: Annotated[str, typer.Option(help="Starter: lora, qlora, reft or full.")] = "lora",
    out: Annotated[Path, typer.Option(help="Where to write the recipe.")] = Path("recipe.yaml"),
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter recipe."""
    from orpo_cli.starter import TEMPLATES, starter_recipe

    if template not in TEMPLATES:
        raise UserError(f"--template: unknown template {template!r}; use one of {', '.join(TEMPLATES)}")
    if out.exists() and not force:
        raise UserError(f"{out} exists; choose another --out or pass --force")
    text = starter_recipe(template, out.stem)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    typer.echo(f"wrote {out}; check it with: orpo-tune validate {out}")


@app.command()
@_user_errors
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output_dir: Annotated[Path | None, typer.Option(help="Run directory (overrides output_dir).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest complete checkpoint.")] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    max_steps: Annotated[int | None, typer.Option(help="Override train.max_steps.")] = None,
) -> None:
    """Train with ORPO: checkpoints, metrics and the adapter land in the run directory."""
    from orpo_cli.recipe import load_recipe
    from orpo_cli.run import start_run

    overrides = list(set_ or [])
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if output_dir is not None:
        overrides.append(f"output_dir={output_dir}")
    loaded = load_recipe(recipe, overrides)
    start_run(loaded, resume=resume, force=force)


def _not_yet(verb: str) -> None:
    typer.echo(f"orpo-tune {verb}: not implemented yet in this version (see the open issues).", err=True)
    raise typer.Exit(3)


@app.command(name="eval")
def eval_(run_dir: Annotated[Path, typer.Argument(help="A run directory written by train.")]) -> None:
    """Held-out preference metrics of a run, base vs tuned."""
    _not_yet("eval")


@app.command()
def export(run_dir: Annotated[Path, typer.Argument(help="A run directory written by train.")]) -> None:
    """Export a merged model (LoRA), the full model, or a ReFT bundle."""
    _not_yet("export")


@app.command()
def generate(path: Annotated[Path, typer.Argument(help="A run directory or an export.")]) -> None:
    """Generate an answer with a tuned model."""
    _not_yet("generate")


@app.command()
@_user_errors
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by train.")],
    out: Annotated[Path | None, typer.Option(help="PNG to write (default RUN_DIR/training-curves.png).")] = None,
) -> None:
    """Draw a run's training curves (loss, NLL, log odds ratio, log-probs, accuracy) to a PNG."""
    from orpo_cli.plots import plot_run
    from orpo_cli.rundir import open_run

    typer.echo(f"wrote {plot_run(open_run(run_dir), out)}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
