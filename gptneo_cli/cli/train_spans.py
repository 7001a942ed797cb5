"""`gptneo train-tagger` and `gptneo train-qa`: train the heads that `gptneo tag` and
`gptneo answer` need, small like `train-classifier` (same options, same summary).

Both commands are one function built twice (`_command`), since only the data format, the
library call and the wording differ. Training code (and torch) is imported inside.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from ..settings import load_settings
from .help import examples
from .options import DebugOpt, DeviceOpt, RevisionOpt
from .output import check_format
from .progress import make_reporter
from .train_common import (
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

DataArg = Annotated[
    list[Path],
    typer.Argument(metavar="DATA", show_default=False,
                   help="Training files (formats above)."),
]

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


def register(app: typer.Typer) -> None:
    app.command("train-tagger", epilog=examples(
        ("Train a tagger on the demo model", "gptneo train-tagger tiny words.conll -o ./tagger "
         "--epochs 20 --lr 0.01"),
        ("Then tag a text", 'echo "Ada met Alan in London" | gptneo tag --model ./tagger'),
    ))(_command("tagger"))
    app.command("train-qa", epilog=examples(
        ("Train a QA head on the demo model", "gptneo train-qa tiny squad.jsonl -o ./qa "
         "--epochs 30 --lr 0.01"),
        ("Then ask a question", 'gptneo answer "Who wrote it?" --model ./qa --context '
         "story.txt"),
    ))(_command("qa"))


def _command(kind: str) -> Callable[..., None]:
    """The train-tagger or train-qa command (identical options, different data)."""

    def command(
        model_arg: BaseModelArg,
        data: DataArg,
        output: HeadOutputOpt,
        revision: RevisionOpt = None,
        device: DeviceOpt = None,
        val_data: ValDataOpt = None,
        val_fraction: ValFractionOpt = 0.1,
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
        fmt = check_format(fmt)
        settings = load_settings()
        check_output(output, force=force, yes=yes)
        config = head_config(train=train, epochs=epochs, max_steps=max_steps,
                             batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                             max_length=max_length, val_fraction=val_fraction,
                             precision=precision, seed=seed)
        folder = resolve_base(model_arg, settings.get("revision", revision))
        if kind == "tagger":
            from ..training.tagger import fit_tagger as fit
        else:
            from ..training.qa import fit_qa as fit
        result = fit(folder, data, output, config, val_data=val_data or None,
                     device=settings.get("device", device), reporter=make_reporter(),
                     base_name=model_arg)
        head_summary("Tagger trained" if kind == "tagger" else "QA head trained", result, fmt)

    command.__name__ = f"train_{kind}"
    command.__doc__ = TAGGER_DOC if kind == "tagger" else QA_DOC
    return command
