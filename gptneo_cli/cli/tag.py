"""`gptneo tag FILE|-`: the spans a token-classification checkpoint tags in a text."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from .help import examples
from .inputs import read_source
from .options import DebugOpt, loading_options
from .output import Diagnostics, check_format, is_tty, make_console, tsv, write_json
from .task_options import FormatOpt, MaxSeqLenOpt, StrideOpt, load_with_head, model_options


def register(app: typer.Typer) -> None:
    app.command(
        "tag",
        epilog=examples(
            (
                "Tag the tokens of a file",
                "gptneo tag story.txt -m ./ner",
            ),
            (
                "Tag piped text, as JSON",
                'echo "Alice met Bob in London." | gptneo tag -m ./ner --format json',
            ),
        ),
    )(tag)


@loading_options()
def tag(
    source: Annotated[
        str | None,
        typer.Argument(
            help="A text file, or - (or nothing, when piped) for stdin.", show_default=False
        ),
    ] = None,
    stride: StrideOpt = 128,
    max_seq_len: MaxSeqLenOpt = None,
    fmt: FormatOpt = "text",
    loading: dict[str, Any] | None = None,
    debug: DebugOpt = False,
) -> None:
    """Tag a text (e.g. named entities) and print each span with its label and score."""
    fmt = check_format(fmt)
    options = model_options(loading)
    text, name = read_source(source)
    from .. import tasks

    loaded = load_with_head(options, "GPTNeoForTokenClassification")
    spans = tasks.tag(loaded.model, loaded.tokenizer, text, max_seq_len=max_seq_len, stride=stride)
    if fmt == "json":
        write_json({"source": name, "spans": [s.to_dict() for s in spans]})
    elif fmt == "jsonl":
        for span in spans:
            write_json(span.to_dict(), lines=True)
    elif is_tty(sys.stdout):
        _table(spans)
    else:
        for s in spans:
            sys.stdout.write(tsv(s.label, s.start, s.end, f"{s.score:.4f}", s.text))
    if not spans and fmt == "text":
        Diagnostics().note("no tagged spans: every token was labelled O")


def _table(spans: list) -> None:
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    table.add_column("label", style="bold")
    table.add_column("text", overflow="fold")
    table.add_column("chars", justify="right", style="dim")
    table.add_column("score", justify="right")
    for s in spans:
        table.add_row(s.label, s.text, f"{s.start}-{s.end}", f"{s.score:.3f}")
    make_console(sys.stdout).print(table)
