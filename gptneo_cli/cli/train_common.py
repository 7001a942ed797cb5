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
from .options import complete_model
from .output import is_tty, write_json, write_table

ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Write into an --output folder that holds other files (not "
        "a model); the model files are added among them.",
    ),
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
    except (OSError, ValueError, RecursionError):
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
            raise ValueError(
                f"--output {output} already holds a model; add --yes to replace "
                "it, or choose another folder"
            )
        if not confirm(f"{output} already holds a model. Replace it?"):
            sys.stderr.write("Nothing written.\n")
            raise typer.Exit(EXIT_RUNTIME)
        return
    if not force:
        raise ValueError(
            f"--output {output} is not empty and holds no model; choose a new or "
            "empty folder, or add --force to add the model files to it"
        )


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
    from ..loader import resolve

    return resolve(model, revision)


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


# --------------------------------------------------------------------------- head trainers
# The options train-classifier, train-tagger and train-qa share (gptneo_cli.training.heads);
# finetune uses the ones it has too (DATA_PANEL, OPT_PANEL, OutputOpt, EpochsOpt, MaxStepsOpt).

DATA_PANEL = "Data"
OPT_PANEL = "Optimization"

BaseModelArg = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="Base model: folder, Hub id or alias (tiny, 125m, ...).",
        show_default=False,
        autocompletion=complete_model,
    ),
]
OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output", "-o", help="Folder for the trained model (Hub format).", show_default=False
    ),
]
ValDataOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--val-data",
        help="Held-out examples (repeatable); default: --val-fraction of the data.",
        rich_help_panel=DATA_PANEL,
        show_default=False,
    ),
]
ValFractionOpt = Annotated[
    float,
    typer.Option("--val-fraction", help="Share of examples held out.", rich_help_panel=DATA_PANEL),
]
MaxLengthOpt = Annotated[
    int,
    typer.Option(
        "--max-length", help="Tokens kept per example (the start).", rich_help_panel=DATA_PANEL
    ),
]
TrainOpt = Annotated[
    str,
    typer.Option(
        "--train",
        help="head: train only the new layer on frozen features (fast); all: the whole model.",
        rich_help_panel=OPT_PANEL,
    ),
]
EpochsOpt = Annotated[
    int, typer.Option("--epochs", help="Passes over the data.", rich_help_panel=OPT_PANEL)
]
MaxStepsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-steps",
        help="Optimizer steps; overrides --epochs.",
        rich_help_panel=OPT_PANEL,
        show_default=False,
    ),
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", help="Examples per step.", rich_help_panel=OPT_PANEL)
]
HeadLrOpt = Annotated[
    float | None,
    typer.Option(
        "--lr",
        help="Peak learning rate. (default 1e-3 for --train head, 2e-5 for --train all)",
        rich_help_panel=OPT_PANEL,
        show_default=False,
    ),
]
WeightDecayOpt = Annotated[
    float, typer.Option("--weight-decay", help="AdamW weight decay.", rich_help_panel=OPT_PANEL)
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision", help="auto, float32, bfloat16 or float16.", rich_help_panel=OPT_PANEL
    ),
]
HeadSeedOpt = Annotated[
    int, typer.Option("--seed", help="Seed for the split, data order and head init.")
]
SummaryFormatOpt = Annotated[str, typer.Option("--format", help="Summary as text or json.")]


def head_config(**options: Any) -> Any:
    """A validated HeadConfig from the command's options (imports torch: call it late)."""
    from ..training.heads import HeadConfig

    options["train"] = options["train"].strip().lower()
    options["precision"] = options["precision"].strip().lower()
    config = HeadConfig(**options)
    config.validate()
    return config


def head_summary(title: str, result: Any, fmt: str) -> None:
    """The closing summary of a head run (what train-classifier has always printed)."""
    summary = {"output": str(result.output)}
    if result.labels:
        summary["labels"] = result.labels
    write_summary(
        title,
        {
            **summary,
            "steps": result.steps,
            "val_accuracy": result.val_accuracy,
            "val_loss": result.val_loss,
            "train_examples": result.train_examples,
            "val_examples": result.val_examples,
        },
        fmt,
    )
