"""The root Typer app. Each command lives in its own small module exposing `register(app)`.

Importing this module must not import torch: `gptneo --help` and shell completion run it.
"""

from __future__ import annotations

import sys

import typer

from .. import __version__
from . import (
    answer,
    batch,
    bench,
    chat,
    classify,
    finetune,
    generate,
    info,
    models,
    serve,
    tag,
    train_heads,
)
from .errors import guard_app, run_app, state
from .help import use_cli_help
from .streams import (
    exit_cleanly_on_sigterm,
    library_warnings_inert,
    stand_in_for_closed_streams,
)

app = typer.Typer(
    name="gptneo",
    help="Run EleutherAI's GPT-Neo language models locally.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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
    debug: bool = typer.Option(
        False, "--debug", help="Show full tracebacks on errors. (env GPTNEO_DEBUG)"
    ),
) -> None:
    """Run EleutherAI's GPT-Neo language models locally."""
    if debug:
        state.debug = True


for _module in (
    generate,
    chat,
    classify,
    tag,
    answer,
    models,
    info,
    finetune,
    train_heads,
    bench,
    serve,
    batch,
):
    _module.register(app)

use_cli_help(app)
guard_app(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit codes 0 ok, 1 runtime error, 2 usage, 130 interrupted."""
    stand_in_for_closed_streams()
    exit_cleanly_on_sigterm()
    library_warnings_inert()
    from .. import tokenizer

    tokenizer.HIDE_NATIVE_PANIC_OUTPUT = True  # a Rust panic is reported in our one line
    sys.exit(run_app(app, argv))


if __name__ == "__main__":
    main()
