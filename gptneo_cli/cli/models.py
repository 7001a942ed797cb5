"""`gptneo models list|pull|rm|info`: the GPT-Neo models in the Hugging Face cache.

Thin on purpose: gptneo_cli.hub does the work; this module parses and renders (a Rich
table on a terminal, aligned plain text when piped, JSON with --format json).
"""

from __future__ import annotations

import sys
from typing import Annotated, TextIO

import typer

from ..hub import (
    cache_dir,
    cached_models,
    describe,
    fetch,
    find_cached,
    format_bytes,
    format_count,
    remove_cached,
)
from ..settings import load_settings
from .errors import EXIT_RUNTIME, guard_app
from .help import examples
from .options import DebugOpt, RevisionOpt, complete_model
from .output import check_format, is_tty, make_console, write_json, write_table

models_app = typer.Typer(
    name="models",
    help="List, download, inspect and remove models in the Hugging Face cache.",
    no_args_is_help=True,
)

ModelArg = Annotated[
    str | None,
    typer.Argument(
        help="Hub id (org/name), alias (125m, 1.3b, 2.7b) or folder. "
        "[default: GPTNEO_MODEL, else EleutherAI/gpt-neo-125M]",
        autocompletion=complete_model,
        show_default=False,
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help="text or json.", show_default=True)]


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


def _model_name(model: str | None, revision: str | None) -> tuple[str, str | None]:
    settings = load_settings()
    return settings.model(model), settings.get("revision", revision)


@models_app.command(
    "list",
    epilog=examples(
        ("Models in the cache", "gptneo models list"),
        ("As JSON", "gptneo models list --format json"),
    ),
)
def list_models(fmt: FormatOpt = "text", debug: DebugOpt = False) -> None:
    """Show the cached GPT-Neo models: id, revision, size on disk, parameters.

    With an empty cache, the models available without a Hub id are listed instead (on
    stderr): the bundled demo model and the aliases one can pull, with their sizes.
    """
    from ..catalog import alias_offers, bundled_models

    fmt = check_format(fmt)
    models = cached_models()
    if fmt != "text":
        write_json(
            {
                "cache_dir": str(cache_dir()),
                "models": [
                    {
                        "id": m.repo_id,
                        "revision": m.revision,
                        "commit": m.commit,
                        "refs": list(m.refs),
                        "size_on_disk": m.size_on_disk,
                        "parameters": m.num_parameters,
                        "complete": m.complete,
                        "folder": str(m.folder),
                    }
                    for m in models
                ],
                "bundled": [o.to_dict() for o in bundled_models()],
                "aliases": [o.to_dict() for o in alias_offers()],
            },
            lines=fmt == "jsonl",
        )
        return
    if not models:
        _write_offers()
        return
    rows = [
        [
            m.repo_id,
            m.revision,
            format_bytes(m.size_on_disk),
            format_count(m.num_parameters or 0),
            "" if m.complete else "no weights",
        ]
        for m in models
    ]
    _write_rows(["ID", "REVISION", "SIZE", "PARAMS", "NOTE"], rows)


def _write_offers() -> None:
    """What an empty cache can still run, or pull by alias (stderr: guidance, not data)."""
    from ..catalog import alias_offers, bundled_models

    rows = [
        [
            o.name,
            "bundled, no download",
            format_bytes(o.size),
            format_count(o.parameters or 0),
            f"--model {o.name}",
        ]
        for o in bundled_models()
    ]
    rows += [
        [
            o.name,
            o.repo_id or "",
            f"{format_bytes(o.size)} download",
            format_count(o.parameters or 0),
            f"gptneo models pull {o.name}",
        ]
        for o in alias_offers()
    ]
    sys.stderr.write(f"No GPT-Neo models in {cache_dir()} yet. Available:\n")
    _write_rows(["NAME", "MODEL", "SIZE", "PARAMS", "USE"], rows, out=sys.stderr)


@models_app.command(
    "pull",
    epilog=examples(
        ("Download GPT-Neo 1.3B (prints its folder)", "gptneo models pull 1.3b"),
        ("A given revision", "gptneo models pull EleutherAI/gpt-neo-125M --revision main"),
    ),
)
def pull(model: ModelArg = None, revision: RevisionOpt = None, debug: DebugOpt = False) -> None:
    """Download a model into the cache (progress on stderr); print its folder."""
    name, revision = _model_name(model, revision)
    snap = fetch(name, revision)
    size = sum(p.stat().st_size for p in snap.folder.iterdir() if p.is_file())
    where = f"{snap.repo_id}@{snap.commit[:12]}" if snap.repo_id and snap.commit else name
    sys.stderr.write(f"{where}: {format_bytes(size)} ready\n")
    sys.stdout.write(f"{snap.folder}\n")


@models_app.command(
    "rm",
    epilog=examples(
        ("Remove a cached model (asks first)", "gptneo models rm 1.3b"),
        ("Without asking", "gptneo models rm 1.3b --yes"),
    ),
)
def rm(
    model: Annotated[str, typer.Argument(help="Hub id or alias of a cached model.")],
    revision: Annotated[
        str | None,
        typer.Option(
            "--revision", help="Remove only this branch, tag or commit.", show_default=False
        ),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Remove a model (all revisions, or one) from the cache."""
    matches = find_cached(model, revision)
    size = sum(m.size_on_disk for m in matches)
    revisions = ", ".join(m.revision for m in matches)
    what = f"{matches[0].repo_id} ({revisions}; {format_bytes(size)})"
    if not yes and not _confirm(f"Remove {what} from {cache_dir()}?"):
        sys.stderr.write("Nothing removed.\n")
        raise typer.Exit(EXIT_RUNTIME)
    _, freed = remove_cached(model, revision)
    sys.stderr.write(f"Removed {what}; freed {format_bytes(freed)}.\n")


def _confirm(question: str) -> bool:
    """Ask on the terminal (or read y/n from piped stdin); end of input means no."""
    try:
        return typer.confirm(question, default=False, err=True)
    except (typer.Abort, EOFError):
        return False


@models_app.command(
    "info",
    epilog=examples(
        ("Shape and size of a model (reads config.json only)", "gptneo models info 1.3b"),
        ("As JSON", "gptneo models info tiny --format json"),
    ),
)
def info(
    model: ModelArg = None,
    revision: RevisionOpt = None,
    fmt: FormatOpt = "text",
    debug: DebugOpt = False,
) -> None:
    """Config, parameter count, files and memory per dtype (needs only config.json)."""
    fmt = check_format(fmt)
    name, revision = _model_name(model, revision)
    summary = describe(name, revision)
    if fmt != "text":
        write_json(summary.to_dict(), lines=fmt == "jsonl")
        return
    c = summary.config
    layout = ", ".join(f"{'/'.join(kinds)} x{n}" for kinds, n in c.attention_types)
    title = summary.repo_id or str(summary.folder)
    rows = [("folder", str(summary.folder))]
    if summary.repo_id:
        rows.insert(0, ("revision", f"{summary.revision} ({(summary.commit or '?')[:12]})"))
    rows += [
        ("parameters", f"{format_count(summary.num_parameters)} ({summary.num_parameters:,})"),
        ("layers", f"{c.num_layers} ({layout}; local window {c.window_size})"),
        ("hidden size", f"{c.hidden_size} ({c.num_heads} heads of {c.head_dim})"),
        ("MLP size", str(c.inner_size)),
        ("vocabulary", str(c.vocab_size)),
        ("context", f"{c.max_position_embeddings} tokens"),
        ("activation", c.activation_function),
        ("stored dtype", str(c.torch_dtype or "unknown")),
        (
            "weights",
            "downloaded"
            if summary.weights_present
            else "not downloaded (this summary comes from config.json alone)",
        ),
    ]
    write_table(title, rows)
    write_table(
        "Memory for the weights",
        [(dtype, format_bytes(n)) for dtype, n in summary.memory().items()],
    )
    if summary.files:
        heading = "files" if summary.online else "files on disk (offline)"
        if not is_tty(sys.stdout):
            sys.stdout.write(f"\n{heading}:\n")
        _write_rows(
            ["FILE", "SIZE", "GPTNEO", "LOCAL"],
            [
                [
                    f.name,
                    format_bytes(f.size),
                    "fetch" if f.needed else "skip",
                    "yes" if f.present else "no",
                ]
                for f in summary.files
            ],
            title=heading,
        )


def _write_rows(
    headers: list[str], rows: list[list[str]], title: str | None = None, out: TextIO | None = None
) -> None:
    """A Rich table on a terminal; aligned plain columns (no escape bytes) when piped."""
    out = out or sys.stdout
    if not is_tty(out):
        table = [headers, *rows]
        widths = [max(len(str(row[i])) for row in table) for i in range(len(headers))]
        for row in table:
            cells = zip(row, widths, strict=True)
            line = "  ".join(str(cell).ljust(width) for cell, width in cells)
            out.write(line.rstrip() + "\n")
        out.flush()
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    for header in headers:
        table.add_column(header, justify="right" if header in ("SIZE", "PARAMS") else "left")
    for row in rows:
        table.add_row(*row)
    make_console(out, soft_wrap=False).print(table)


guard_app(models_app)
