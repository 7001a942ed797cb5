"""What the training commands share: the --output checks (never overwrite without asking),
--force / --yes, resolving the base model to a folder, and the closing summary.

Imports neither torch nor the training code, so `--help` and the checks stay fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import EXIT_RUNTIME
from .output import is_tty, write_json, write_table

ForceOpt = Annotated[
    bool,
    typer.Option("--force", help="Write into an --output folder that holds other files (not "
                 "a model); the model files are added among them."),
]
YesOpt = Annotated[
    bool,
    typer.Option("--yes", "-y", help="Replace a model already in --output without asking."),
]


def confirm(question: str) -> bool:
    """Ask on the terminal (or read y/n from piped stdin); end of input means no."""
    try:
        return typer.confirm(question, default=False, err=True)
    except (typer.Abort, EOFError):
        return False


def holds_model(folder: Path) -> bool:
    """A gptneo / Hugging Face model folder (config.json), or an interrupted run's output."""
    if (folder / "checkpoint" / "trainer_state.json").is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict)


def check_output(output: Path, *, force: bool, yes: bool, resume: Path | None = None) -> None:
    """Refuse or confirm writing a model into `output` before any work starts.

    A new or empty folder is fine. A folder that holds a model is replaced only after a
    "yes" on the terminal, or with --yes (or when --resume continues the run saved there).
    A folder holding anything else needs --force, so a typo such as `--output ./docs` never
    drops model files among unrelated ones.
    """
    if not output.exists():
        return
    if not output.is_dir():
        raise ValueError(f"--output {output} is a file; give a folder")
    if not any(output.iterdir()):
        return
    if holds_model(output):
        if yes or _inside(resume, output):
            return
        if not is_tty(sys.stdin):
            raise ValueError(f"--output {output} already holds a model; add --yes to replace "
                             "it, or choose another folder")
        if not confirm(f"{output} already holds a model. Replace it?"):
            sys.stderr.write("Nothing written.\n")
            raise typer.Exit(EXIT_RUNTIME)
        return
    if not force:
        raise ValueError(f"--output {output} is not empty and holds no model; choose a new or "
                         "empty folder, or add --force to add the model files to it")


def _inside(path: Path | None, folder: Path) -> bool:
    if path is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def resolve_base(model: str, revision: str | None) -> Path:
    """The folder of the base model (a folder, Hub id or alias; downloaded if needed)."""
    from ..hub import resolve_model_dir

    return resolve_model_dir(model, revision=revision)


def write_summary(title: str, summary: dict[str, Any], fmt: str) -> None:
    """The run's summary on stdout: JSON, or a two-column table."""
    if fmt != "text":
        write_json(summary, lines=fmt == "jsonl")
        return
    write_table(title, [(key, _show(value)) for key, value in summary.items()])


def _show(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)
