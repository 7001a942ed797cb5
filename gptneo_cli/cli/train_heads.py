"""`gptneo train-classifier`, `train-tagger` and `train-qa`: train the heads that
`gptneo classify`, `tag` and `answer` load (gptneo_cli.training.classifier / tagger / qa).

The three commands are one function built three times (`_command`): only the data format,
the library call and the wording differ, and train-classifier alone has --text-column and
--label-column. Thin: check the options, call the trainer, progress on stderr, a summary on
stdout. Training code (and torch) is imported inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from ..settings import load_settings
from .help import examples
from .loading import apply_threads, thread_setting
from .options import DebugOpt, DeviceOpt, RevisionOpt, ThreadsOpt
from .output import check_format
from .progress import make_reporter
from .train_common import (
    DATA_PANEL,
    BaseModelArg,
    BatchSizeOpt,
    EpochsOpt,
    ForceOpt,
    HeadLrOpt,
    HeadSeedOpt,
    MaxLengthOpt,
    MaxStepsOpt,
    OutputOpt,
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

DataArg = Annotated[
    list[Path],
    typer.Argument(metavar="DATA", show_default=False, help="Training files (formats above)."),
]

CLASSIFIER_DOC = """Train a text classifier on labelled data; reports validation accuracy.

DATA is .jsonl with {"text": ..., "label": ...} per line, or .csv/.tsv with a header
(--text-column and --label-column pick the fields).

Labels and id2label come from the data. The best epoch (by validation accuracy) is
written to OUTPUT; use it with `gptneo classify --model OUTPUT FILE` (or - for stdin).
"""

TAGGER_DOC = """Train a token tagger (e.g. named entities) for `gptneo tag`.

DATA is CoNLL-style text (one `word ... label` line per word: the first and last columns;
a blank line between sentences) or .jsonl with {"tokens": [...], "labels": [...]} per line
("tags" or "ner_tags" work too). Labels may be IOB (B-PER, I-PER, O) or plain.

The best epoch (by held-out token accuracy) is written to OUTPUT with a `classifier` layer,
as transformers' GPTNeoForTokenClassification names it; tag with `gptneo tag --model OUTPUT
FILE`.
"""

QA_DOC = """Train an extractive question-answering head for `gptneo answer`.

DATA is SQuAD-style .jsonl: {"question", "context", "answers": {"text": [...],
"answer_start": [...]}} per line (or "answers" as a list of {"text", "answer_start"}, or an
"answer" string found in the context). Questions without an answer are skipped.

Questions on one context are held out together. The best epoch (by held-out exact-span
accuracy) is written to OUTPUT with a `qa_outputs` layer, as transformers'
GPTNeoForQuestionAnswering names it; ask with `gptneo answer QUESTION --model OUTPUT
--context FILE`.
"""


TextColumnOpt = Annotated[
    str,
    typer.Option("--text-column", help="Field holding the text.", rich_help_panel=DATA_PANEL),
]
LabelColumnOpt = Annotated[
    str,
    typer.Option("--label-column", help="Field holding the label.", rich_help_panel=DATA_PANEL),
]
#: The options only train-classifier has (its data has named columns).
COLUMN_OPTIONS = ("text_column", "label_column")
TITLES = {"classifier": "Classifier trained", "tagger": "Tagger trained", "qa": "QA head trained"}
DOCS = {"classifier": CLASSIFIER_DOC, "tagger": TAGGER_DOC, "qa": QA_DOC}


def register(app: typer.Typer) -> None:
    app.command(
        "train-classifier",
        epilog=examples(
            (
                "Train a classifier head on labeled lines",
                "gptneo train-classifier tiny lines.jsonl -o ./code-or-comment --epochs 5",
            ),
            ("Then use it", 'echo "the cache is cleared" | gptneo classify -m ./code-or-comment'),
        ),
    )(_command("classifier"))
    app.command(
        "train-tagger",
        epilog=examples(
            (
                "Train a tagger on the demo model",
                "gptneo train-tagger tiny words.conll -o ./tagger --epochs 20 --lr 0.01",
            ),
            ("Then tag a text", 'echo "Ada met Alan in London" | gptneo tag --model ./tagger'),
        ),
    )(_command("tagger"))
    app.command(
        "train-qa",
        epilog=examples(
            (
                "Train a QA head on the demo model",
                "gptneo train-qa tiny squad.jsonl -o ./qa --epochs 30 --lr 0.01",
            ),
            (
                "Then ask a question",
                'gptneo answer "Who wrote it?" --model ./qa --context story.txt',
            ),
        ),
    )(_command("qa"))


def _command(kind: str) -> Callable[..., None]:
    """The train-classifier, train-tagger or train-qa command."""

    def command(
        model_arg: BaseModelArg,
        data: DataArg,
        output: OutputOpt,
        revision: RevisionOpt = None,
        device: DeviceOpt = None,
        val_data: ValDataOpt = None,
        val_fraction: ValFractionOpt = 0.1,
        text_column: TextColumnOpt = "text",
        label_column: LabelColumnOpt = "label",
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
        threads: ThreadsOpt = None,
        debug: DebugOpt = False,
    ) -> None:
        fmt = check_format(fmt)
        settings = load_settings()
        thread_count = thread_setting(settings, threads)
        check_output(output, force=force, yes=yes)
        config = head_config(
            train=train,
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            max_length=max_length,
            val_fraction=val_fraction,
            precision=precision,
            seed=seed,
        )
        folder = resolve_base(model_arg, settings.get("revision", revision))
        apply_threads(*thread_count)
        extra = (
            {"text_column": text_column, "label_column": label_column}
            if kind == "classifier"
            else {}
        )
        result = _trainer(kind)(
            folder,
            data,
            output,
            config,
            val_data=val_data or None,
            device=settings.get("device", device),
            reporter=make_reporter(),
            base_name=model_arg,
            **extra,
        )
        head_summary(TITLES[kind], result, fmt)

    command.__name__ = f"train_{kind}"
    command.__doc__ = DOCS[kind]
    if kind != "classifier":  # Typer reads the options from the signature
        signature = inspect.signature(command, eval_str=True)
        command.__signature__ = signature.replace(
            parameters=[  # type: ignore[attr-defined]
                p for p in signature.parameters.values() if p.name not in COLUMN_OPTIONS
            ]
        )
    return command


def _trainer(kind: str) -> Callable[..., object]:
    """The library function of each command (imported late: it imports torch)."""
    if kind == "classifier":
        from ..training.classifier import fit_classifier

        return fit_classifier
    if kind == "tagger":
        from ..training.tagger import fit_tagger

        return fit_tagger
    from ..training.qa import fit_qa

    return fit_qa
