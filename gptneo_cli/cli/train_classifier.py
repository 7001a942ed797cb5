"""`gptneo train-classifier`: train a sequence-classification head (or the whole model) on
labelled jsonl/CSV; the output folder works with `gptneo classify --model FOLDER`.

Thin: check the options, call classifier_training.fit_classifier, progress on stderr and a
summary on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..settings import load_settings
from .help import examples
from .options import DebugOpt, DeviceOpt, RevisionOpt
from .output import check_format
from .progress import make_reporter
from .train_common import ForceOpt, YesOpt, check_output, resolve_base, write_summary

DATA_PANEL = "Data"
OPT_PANEL = "Optimization"


def register(app: typer.Typer) -> None:
    app.command(
        "train-classifier",
        epilog=examples(
            (
                'Train a classifier head on labeled lines',
                'gptneo train-classifier tiny lines.jsonl -o ./code-or-comment --epochs 5',
            ),
            (
                'Then use it',
                'echo "the cache is cleared" | gptneo classify -m ./code-or-comment',
            ),
        ),
    )(train_classifier)


def train_classifier(
    model_arg: Annotated[
        str,
        typer.Argument(metavar="MODEL", help="Base model: folder, Hub id or alias.",
                       show_default=False),
    ],
    data: Annotated[
        list[Path],
        typer.Argument(metavar="DATA", show_default=False,
                       help='Labelled examples: .jsonl with {"text": ..., "label": ...} per '
                       "line, or .csv/.tsv with a header."),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="Folder for the classifier (Hub format).",
                     show_default=False),
    ],
    revision: RevisionOpt = None,
    device: DeviceOpt = None,
    val_data: Annotated[
        list[Path] | None,
        typer.Option("--val-data", help="Held-out examples (repeatable); default: a stratified "
                     "--val-fraction of the data.", rich_help_panel=DATA_PANEL,
                     show_default=False),
    ] = None,
    val_fraction: Annotated[
        float, typer.Option("--val-fraction", help="Share of examples held out.",
                            rich_help_panel=DATA_PANEL)
    ] = 0.1,
    text_column: Annotated[
        str, typer.Option("--text-column", help="Field holding the text.",
                          rich_help_panel=DATA_PANEL)
    ] = "text",
    label_column: Annotated[
        str, typer.Option("--label-column", help="Field holding the label.",
                          rich_help_panel=DATA_PANEL)
    ] = "label",
    max_length: Annotated[
        int, typer.Option("--max-length", help="Tokens kept per text (the start).",
                          rich_help_panel=DATA_PANEL)
    ] = 256,
    train: Annotated[
        str, typer.Option("--train", help="head: train only the new score layer on frozen "
                          "features (fast); all: the whole model.", rich_help_panel=OPT_PANEL)
    ] = "head",
    epochs: Annotated[int, typer.Option("--epochs", rich_help_panel=OPT_PANEL,
                                        help="Passes over the data.")] = 3,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Optimizer steps; overrides --epochs.",
                                 rich_help_panel=OPT_PANEL, show_default=False)
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", rich_help_panel=OPT_PANEL,
                                            help="Examples per step.")] = 16,
    lr: Annotated[
        float | None, typer.Option("--lr", help="Peak learning rate. (default 1e-3 for "
                                   "--train head, 2e-5 for --train all)",
                                   rich_help_panel=OPT_PANEL, show_default=False)
    ] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay",
                                                rich_help_panel=OPT_PANEL)] = 0.01,
    precision: Annotated[
        str, typer.Option("--precision", help="auto, float32, bfloat16 or float16.",
                          rich_help_panel=OPT_PANEL)
    ] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the split, data order and "
                                      "head init.")] = 0,
    force: ForceOpt = False,
    yes: YesOpt = False,
    fmt: Annotated[str, typer.Option("--format", help="Summary as text or json.")] = "text",
    debug: DebugOpt = False,
) -> None:
    """Train a text classifier on labelled data; reports validation accuracy.

    Labels and id2label come from the data. The best epoch (by validation accuracy) is
    written to OUTPUT; use it with `gptneo classify --model OUTPUT FILE` (or - for stdin).
    """
    fmt = check_format(fmt)
    settings = load_settings()
    check_output(output, force=force, yes=yes)
    from ..training.classifier import ClassifierConfig, fit_classifier

    config = ClassifierConfig(
        train=train.strip().lower(),  # type: ignore[arg-type]
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, max_length=max_length, val_fraction=val_fraction,
        precision=precision.strip().lower(), seed=seed,
    )
    config.validate()
    folder = resolve_base(model_arg, settings.get("revision", revision))
    result = fit_classifier(
        folder, data, output, config, val_data=val_data or None, text_column=text_column,
        label_column=label_column, device=settings.get("device", device),
        reporter=make_reporter(), base_name=model_arg,
    )
    write_summary("Classifier trained", {
        "output": str(result.output),
        "labels": result.labels,
        "steps": result.steps,
        "val_accuracy": result.val_accuracy,
        "val_loss": result.val_loss,
        "train_examples": result.train_examples,
        "val_examples": result.val_examples,
    }, fmt)
