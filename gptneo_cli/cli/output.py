"""Rendering: Rich on a terminal, plain text when piped, JSON / JSON Lines for programs.

The rule (from simonw/llm): stdout carries only results; when it is not a terminal it gets
plain text without a single escape byte, whatever FORCE_COLOR says. Diagnostics, stats and
progress always go to stderr. NO_COLOR turns colour off everywhere.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Any, TextIO

FORMATS = ("text", "json", "jsonl")

#: Characters a terminal acts on instead of showing: C0 controls but tab and newline, DEL,
#: and the C1 controls (U+0080-U+009F; U+009B alone starts a CSI sequence on some terminals).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def inert(text: str, *, newlines: bool = True) -> str:
    """`text` safe to show on a terminal: every control character that could move the
    cursor, clear the screen, set the title or start an escape sequence is shown as a
    visible escape (ESC -> \\x1b). Tab and, with `newlines`, newline are kept as they are.

    Applied to everything that came from data (prompts, generated text, labels, file
    names, error messages) on its way to a terminal; piped results stay byte-exact."""
    text = _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if newlines else text.replace("\n", "\\n")


def no_color() -> bool:
    return bool(os.environ.get("NO_COLOR"))


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def make_console(stream: TextIO, **options: Any) -> Any:
    """A Rich console on `stream`; NO_COLOR removes every escape code, not only colours.

    Every string it renders (printed text, table cells, titles) goes through `inert` first:
    Rich itself passes ESC and the other controls through, with or without colour."""
    settings: dict[str, Any] = {
        "highlight": False,
        "soft_wrap": True,
        "color_system": None if no_color() else "auto",
    }
    return _inert_console_class()(file=stream, **{**settings, **options})


@functools.lru_cache(maxsize=1)
def _inert_console_class() -> Any:
    from rich.console import Console

    class InertConsole(Console):
        def render_str(self, text: str, **kwargs: Any) -> Any:
            return super().render_str(inert(text), **kwargs)

    return InertConsole


def check_format(fmt: str) -> str:
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown --format {fmt!r}: use text, json or jsonl")
    return fmt


class TextStream:
    """Streams generated text to stdout: dim prompt and live tokens on a terminal, bare text
    (flushed per delta, so pipes see it as it comes) otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = is_tty(self.stream)
        self._console = make_console(self.stream) if self.tty else None
        self._at_line_start = True

    def prompt(self, text: str) -> None:
        """The prompt, dimmed, before the continuation (terminal, or plain with --echo)."""
        self._write(text, style="dim")

    def write(self, delta: str) -> None:
        self._write(delta)

    def note(self, text: str) -> None:
        """A dim marker between results (terminal only; pipes get just the texts)."""
        if self.tty:
            self.end()
            self._write(text + "\n", style="dim")

    def end(self) -> None:
        """Finish the current line so the shell prompt starts on its own line."""
        if not self._at_line_start:
            self._write("\n")

    def _write(self, text: str, style: str | None = None) -> None:
        if not text:
            return
        # Noted before writing: a Ctrl-C landing just after the write must still see that
        # the line is open, so end() closes it (at worst one extra newline).
        self._at_line_start = text.endswith("\n")
        if self._console is not None:
            self._console.print(text, style=style, end="", markup=False, emoji=False)
        else:
            self.stream.write(text)
        self.stream.flush()


def write_json(obj: Any, stream: TextIO | None = None, *, lines: bool = False) -> None:
    """One JSON document (indented) or one JSON Lines record; never coloured."""
    out = stream or sys.stdout
    text = json.dumps(obj, ensure_ascii=False, indent=None if lines else 2)
    if is_tty(out):  # json escapes C0 controls itself; DEL and C1 (U+009B: CSI) too here
        text = re.sub("[\x7f-\x9f]", lambda m: f"\\u{ord(m.group()):04x}", text)
    out.write(text + "\n")
    out.flush()


class Diagnostics:
    """Messages for humans on stderr: dim notes, yellow warnings, key/value tables."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.console = make_console(self.stream)

    def note(self, message: str) -> None:
        self.console.print(message, style="dim", markup=False)

    def warn(self, message: str) -> None:
        self.console.print(f"Warning: {message}", style="yellow", markup=False)

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        write_table(title, rows, self.stream)


def write_table(title: str, rows: list[tuple[str, str]], stream: TextIO | None = None) -> None:
    """A titled two-column table on a terminal; indented `key: value` lines otherwise."""
    out = stream or sys.stdout
    if not is_tty(out):
        out.write(f"{inert(title)}\n")
        for key, value in rows:  # values quote data (system text, labels): made inert too
            out.write(f"  {inert(key)}: {inert(str(value), newlines=False)}\n")
        out.flush()
        return
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left", box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    make_console(out).print(table)


def tsv(*fields: Any) -> str:
    """One tab-separated line; tabs and newlines inside a field are written as \\t and \\n."""
    return "\t".join(str(f).replace("\t", "\\t").replace("\n", "\\n") for f in fields) + "\n"
