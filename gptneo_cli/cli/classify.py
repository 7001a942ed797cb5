"""`gptneo classify FILE... | -`: a label and its probability for each input.

A sequence-classification checkpoint labels with its head; `--labels` turns any causal LM
into a zero-shot classifier. One bad input (missing, binary, empty) costs one stderr line
and exit code 1 at the end; every other input is still classified.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from .errors import EXIT_RUNTIME, report_error
from .help import examples
from .inputs import check_text, read_stdin, read_text_file
from .options import DebugOpt, loading_options
from .output import Diagnostics, check_format, is_tty, make_console, tsv, write_json
from .task_options import TASK_PANEL, FormatOpt, MaxSeqLenOpt, load_with_head, model_options

DEFAULT_TEMPLATE = "{text}\\nTopic:"  # as typed on a command line; tasks.DEFAULT_TEMPLATE


def register(app: typer.Typer) -> None:
    app.command(
        "classify",
        epilog=examples(
            (
                "Label every file under a folder with a classification checkpoint",
                "gptneo classify reviews/ --recursive -m ./sentiment",
            ),
            (
                "Zero-shot with any causal LM",
                'echo "Stocks fell sharply." | gptneo classify -m 125m --labels finance,sports',
            ),
        ),
    )(classify)


@dataclass
class Item:
    """One input: its name for the output, and its text or why it could not be read."""

    source: str
    text: str | None = None
    error: str | None = None
    result: Any = None


@loading_options()
def classify(
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Text files, folders (with --recursive) or - for stdin.", show_default=False
        ),
    ] = None,
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="Read every file under each folder.")
    ] = False,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            show_default=False,
            help='JSON Lines file, one {"text": ...} per line ("id" names it).',
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            "--labels",
            "-l",
            rich_help_panel=TASK_PANEL,
            show_default=False,
            help="Comma-separated labels: classify zero-shot with a causal LM.",
        ),
    ] = None,
    template: Annotated[
        str,
        typer.Option(
            "--template",
            rich_help_panel=TASK_PANEL,
            help="Zero-shot prompt; {text} is the input, \\n a newline. "
            "Each label is scored after it (with a space unless the "
            "template ends in one).",
        ),
    ] = DEFAULT_TEMPLATE,
    calibrate: Annotated[
        bool,
        typer.Option(
            "--calibrate/--no-calibrate",
            rich_help_panel=TASK_PANEL,
            help="Zero-shot: subtract each label's score for an empty text.",
        ),
    ] = True,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            rich_help_panel=TASK_PANEL,
            help="Sequences per forward pass.",
        ),
    ] = 8,
    max_seq_len: MaxSeqLenOpt = None,
    fmt: FormatOpt = "text",
    loading: dict[str, Any] | None = None,
    debug: DebugOpt = False,
) -> None:
    """Classify texts with a classification checkpoint, or zero-shot with --labels."""
    fmt = check_format(fmt)
    label_list = parse_labels(labels) if labels is not None else None
    template = unescape(template)
    if label_list is not None and "{text}" not in template:
        raise ValueError("--template must contain {text}, e.g. '{text}\\nTopic:'")
    options = model_options(loading)

    items = gather(inputs or [], recursive=recursive, input_file=input_file)
    for item in items:
        if item.error:
            report_error(item.error)
    good = [item for item in items if item.error is None]
    if good:
        from .. import tasks

        head = "GPTNeoForCausalLM" if label_list else "GPTNeoForSequenceClassification"
        loaded = load_with_head(
            options,
            head,
            hint=None
            if label_list
            else ("pass --labels a,b,c to classify zero-shot with it as a language model"),
        )
        texts = [item.text or "" for item in good]
        results = tasks.classify_texts(  # the head, or zero-shot with --labels
            loaded.model,
            loaded.tokenizer,
            texts,
            label_list,
            template=template,
            calibrate=calibrate,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
        )
        for item, result in zip(good, results, strict=True):
            item.result = result
            if result.truncated_tokens:
                Diagnostics().warn(
                    f"{item.source}: the last {result.truncated_tokens} tokens "
                    "did not fit the model and were not read"
                )
    render(items, fmt)
    if len(good) < len(items):
        raise typer.Exit(EXIT_RUNTIME)


# ---- inputs -------------------------------------------------------------------------------
def parse_labels(raw: str) -> list[str]:
    labels = [part.strip() for part in check_text(raw, "--labels").split(",")]
    if not raw.strip() or any(not label for label in labels):
        raise ValueError("--labels must be comma-separated non-empty names, e.g. sports,politics")
    return labels


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """Turn the two-character sequences \\n, \\t and \\\\ typed in a shell into the real ones."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def gather(inputs: list[str], *, recursive: bool, input_file: Path | None) -> list[Item]:
    """Every input in order; unreadable ones carry their one-line error instead of text."""
    items: list[Item] = []
    if input_file is not None:
        items += read_jsonl(input_file)
    if not inputs and input_file is None:
        if is_tty(sys.stdin):
            raise ValueError("no input: give FILE..., - for stdin, or --input FILE.jsonl")
        inputs = ["-"]
    for name in inputs:
        if name == "-":
            items.append(_item("stdin", read_stdin))
            continue
        path = Path(name).expanduser()
        if path.is_dir():
            if not recursive:
                items.append(Item(name, error=f"{name} is a folder: add --recursive to read it"))
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
            if not files:  # say so: an empty run that exits 0 looks like success
                items.append(Item(name, error=f"{name} holds no files to classify"))
            items += [_item(str(p), lambda p=p: read_text_file(p)) for p in files]
        else:
            items.append(_item(name, lambda path=path: read_text_file(path)))
    return items


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _item(source: str, read: Any) -> Item:
    try:
        text = read()
    except (ValueError, OSError) as exc:
        return Item(source, error=str(exc))
    if not text.strip():
        return Item(source, error=f"{source} is empty: nothing to classify")
    return Item(source, text=text)


def read_jsonl(path: Path) -> list[Item]:
    """{"text": ...} per line; a bad line is an error for that line only."""
    items = []
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            items.append(Item(source, error=f"{source}: not valid JSON ({exc.msg})"))
            continue
        except RecursionError:
            items.append(Item(source, error=f"{source}: JSON nested too deeply"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            items.append(Item(source, error=f'{source}: expected {{"text": "..."}}'))
            continue
        source = str(record["id"]) if record.get("id") is not None else source
        items.append(_item(source, lambda record=record: record["text"]))
    return items


# ---- output -------------------------------------------------------------------------------
def render(items: list[Item], fmt: str) -> None:
    """Every item in input order; failed ones appear only in JSON (as {"source", "error"})."""
    records = [
        {"source": item.source, **item.result.to_dict()}
        if item.result is not None
        else {"source": item.source, "error": item.error}
        for item in items
    ]
    if fmt == "json":
        write_json(records)
    elif fmt == "jsonl":
        for record in records:
            write_json(record, lines=True)
    elif is_tty(sys.stdout):
        _table(records)
    else:
        out = sys.stdout
        for r in records:
            if "error" not in r:
                probs = " ".join(f"{label}={p:.4f}" for label, p in r["scores"].items())
                out.write(tsv(r["source"], r["label"], f"{r['score']:.4f}", probs))
        out.flush()


def _table(records: list[dict[str, Any]]) -> None:
    """Input, label, probability; plus one column per label when there are few labels."""
    from rich.table import Table

    done = [r for r in records if "error" not in r]
    if not done:
        return
    labels = list(done[0]["scores"])
    per_label = len(labels) <= 6
    table = Table(box=None, header_style="bold")
    table.add_column("input", overflow="fold")
    table.add_column("label", style="bold")
    table.add_column("prob", justify="right")
    for label in labels if per_label else ():
        table.add_column(f"p({label})", justify="right", style="dim")
    for r in done:
        extra = [f"{r['scores'][label]:.3f}" for label in labels] if per_label else []
        table.add_row(r["source"], r["label"], f"{r['score']:.3f}", *extra)
    make_console(sys.stdout).print(table)
