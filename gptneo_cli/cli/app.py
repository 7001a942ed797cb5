"""The root Typer app. Each command lives in its own small module."""

from __future__ import annotations

import typer

from .. import __version__

app = typer.Typer(
    name="gptneo",
    help="Run EleutherAI's GPT-Neo language models locally.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gptneo {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """Run EleutherAI's GPT-Neo language models locally."""


def main() -> None:
    app()
