"""`gptneo bench`: run benchmarks/bench.py (gptneo against transformers, side by side).

The benchmark compares with transformers, which gptneo_cli itself never imports, so the
command runs the script from the source checkout in a child Python process. Options not
listed here are passed through to it (`gptneo bench -- --help` shows them all).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import GPTNeoError
from .help import examples

PANEL = "Benchmark"


def script_path() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


def register(app: typer.Typer) -> None:
    app.command(
        "bench",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        epilog=examples(
            ("A short smoke run on the CPU", "gptneo bench --quick"),
            ("1.3B and 2.7B in half precision on a GPU", "gptneo bench --device cuda"),
        ),
    )(bench)


def bench(
    ctx: typer.Context,
    device: Annotated[
        str, typer.Option("--device", help="cpu or cuda[:N].", rich_help_panel=PANEL)
    ] = "cpu",
    shapes: Annotated[
        str | None,
        typer.Option(
            "--shapes",
            help="Comma list of 125m, 1.3b, 2.7b. (default: 125m on CPU; 1.3b,2.7b on CUDA)",
            rich_help_panel=PANEL,
            show_default=False,
        ),
    ] = None,
    dtypes: Annotated[
        str | None,
        typer.Option(
            "--dtypes",
            help="Comma list. (default: float32,bfloat16 on CPU; float16,bfloat16 on CUDA)",
            rich_help_panel=PANEL,
            show_default=False,
        ),
    ] = None,
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="A short smoke run (1 repeat, few tokens).", rich_help_panel=PANEL
        ),
    ] = False,
    json_path: Annotated[
        Path,
        typer.Option("--json", help="Where to write the results (JSON).", rich_help_panel=PANEL),
    ] = Path("bench-results.json"),
    markdown_path: Annotated[
        Path,
        typer.Option(
            "--markdown", help="Where to write the markdown table.", rich_help_panel=PANEL
        ),
    ] = Path("bench-results.md"),
) -> None:
    """Measure speed and memory against transformers on random-weight checkpoints of the
    real shapes (nothing is downloaded). Writes a JSON file and a markdown table.

    Other options of benchmarks/bench.py pass through: --variants, --threads, --repeats,
    --new-tokens, --agreement-model, --cache-dir, ...
    """
    script = script_path()
    if not script.is_file():
        raise GPTNeoError(
            "gptneo bench runs benchmarks/bench.py from a source checkout; clone the "
            "repository and install it with pip install -e '.[test]'"
        )
    if importlib.util.find_spec("transformers") is None:
        raise GPTNeoError("the benchmark compares with transformers: pip install transformers")
    argv = [
        sys.executable,
        str(script),
        "--device",
        device,
        "--json",
        str(json_path),
        "--markdown",
        str(markdown_path),
    ]
    if shapes:
        argv += ["--shapes", shapes]
    if dtypes:
        argv += ["--dtypes", dtypes]
    if quick:
        argv.append("--quick")
    argv += list(ctx.args)
    code = subprocess.call(argv)
    if code:
        raise typer.Exit(code)
