"""`gptneo answer QUESTION --context FILE|-`: the best answer span in a context, with score."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from .help import examples
from .inputs import read_source
from .options import DebugOpt, loading_options
from .output import check_format, is_tty, make_console, tsv, write_json
from .task_options import FormatOpt, MaxSeqLenOpt, StrideOpt, load_with_head, model_options


def register(app: typer.Typer) -> None:
    app.command(
        "answer",
        epilog=examples(
            (
                "Answer from a context file",
                'gptneo answer "Where did Alice meet Bob?" --context story.txt -m ./qa',
            ),
            (
                "Context on stdin, as JSON",
                'cat story.txt | gptneo answer "Who met Bob?" -m ./qa --format json',
            ),
        ),
    )(answer)


@loading_options()
def answer(
    question: Annotated[str, typer.Argument(help="The question to answer.", show_default=False)],
    context: Annotated[
        str | None,
        typer.Option(
            "--context",
            "-c",
            show_default=False,
            help="File holding the context, or - for stdin (the default when piped).",
        ),
    ] = None,
    max_answer_tokens: Annotated[
        int, typer.Option("--max-answer-tokens", min=1, help="Longest answer, in tokens.")
    ] = 30,
    stride: StrideOpt = 128,
    max_seq_len: MaxSeqLenOpt = None,
    fmt: FormatOpt = "text",
    loading: dict[str, Any] | None = None,
    debug: DebugOpt = False,
) -> None:
    """Answer a question from a context with a question-answering checkpoint.

    The model reads the question, a newline, then the context; contexts longer than the
    model's positions run in overlapping windows and the best span over all of them wins.
    """
    fmt = check_format(fmt)
    if not question.strip():
        raise ValueError("the question is empty")
    options = model_options(loading)
    text, _ = read_source(context)
    from .. import tasks

    loaded = load_with_head(options, "GPTNeoForQuestionAnswering")
    best = tasks.answer(
        loaded.model,
        loaded.tokenizer,
        question,
        text,
        max_answer_tokens=max_answer_tokens,
        max_seq_len=max_seq_len,
        stride=stride,
    )
    if fmt != "text":
        record = best.to_dict()
        record = {"question": question, "answer": record.pop("text"), **record}
        write_json(record, lines=fmt == "jsonl")
    elif is_tty(sys.stdout):
        out = make_console(sys.stdout)
        out.print(best.text, style="bold", markup=False)
        out.print(
            f"score {best.score:.4f} · characters {best.start}-{best.end}"
            + (f" · window {best.window + 1} of {best.windows}" if best.windows > 1 else ""),
            style="dim",
            markup=False,
        )
    else:
        sys.stdout.write(tsv(best.text, f"{best.score:.4f}"))
