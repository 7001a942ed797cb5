"""`gptneo train-classifier`: train a sequence-classification head (or the whole model) on
labelled jsonl/CSV; the output folder works with `gptneo classify --model FOLDER`.

Thin: check the options, call training.classifier.fit_classifier, progress on stderr and a
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
from .train_common import (
    DATA_PANEL,
    BaseModelArg,
    BatchSizeOpt,
    EpochsOpt,
    ForceOpt,
    HeadLrOpt,
    HeadOutputOpt,
    HeadSeedOpt,
    MaxLengthOpt,
    MaxStepsOpt,
    PrecisionOpt,
    SummaryFormatOpt,
    TrainOpt,
    ValDataOpt,
    ValFractionOpt,
    WeightDecayOpt,
    YesOpt,
    check_output,
    head_config,
    head_summary,
    resolve_base,
)


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
    model_arg: BaseModelArg,
    data: Annotated[
        list[Path],
        typer.Argument(metavar="DATA", show_default=False,
                       help='Labelled examples: .jsonl with {"text": ..., "label": ...} per '
                       "line, or .csv/.tsv with a header."),
    ],
    output: HeadOutputOpt,
    revision: RevisionOpt = None,
    device: DeviceOpt = None,
    val_data: ValDataOpt = None,
    val_fraction: ValFractionOpt = 0.1,
    text_column: Annotated[
        str, typer.Option("--text-column", help="Field holding the text.",
                          rich_help_panel=DATA_PANEL)
    ] = "text",
    label_column: Annotated[
        str, typer.Option("--label-column", help="Field holding the label.",
                          rich_help_panel=DATA_PANEL)
    ] = "label",
    max_length: MaxLengthOpt = 256,
    train: TrainOpt = "head",
    epochs: EpochsOpt = 3,
    max_steps: MaxStepsOpt = None,
    batch_size: BatchSizeOpt = 16,
    lr: HeadLrOpt = None,
    weight_decay: WeightDecayOpt = 0.01,
    precision: PrecisionOpt = "auto",
    seed: HeadSeedOpt = 0,
    force: ForceOpt = False,
    yes: YesOpt = False,
    fmt: SummaryFormatOpt = "text",
    debug: DebugOpt = False,
) -> None:
    """Train a text classifier on labelled data; reports validation accuracy.

    Labels and id2label come from the data. The best epoch (by validation accuracy) is
    written to OUTPUT; use it with `gptneo classify --model OUTPUT FILE` (or - for stdin).
    """
    fmt = check_format(fmt)
    settings = load_settings()
    check_output(output, force=force, yes=yes)
    from ..training.classifier import fit_classifier

    config = head_config(train=train, epochs=epochs, max_steps=max_steps,
                         batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         max_length=max_length, val_fraction=val_fraction,
                         precision=precision, seed=seed)
    folder = resolve_base(model_arg, settings.get("revision", revision))
    result = fit_classifier(
        folder, data, output, config, val_data=val_data or None, text_column=text_column,
        label_column=label_column, device=settings.get("device", device),
        reporter=make_reporter(), base_name=model_arg,
    )
    head_summary("Classifier trained", result, fmt)
