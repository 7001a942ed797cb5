"""Reading what a command works on: prompts from arguments, stdin and files (UTF-8 text only).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from .output import is_tty


def decode_text(data: bytes, source: str) -> str:
    """Text files only: NUL bytes or invalid UTF-8 mean a binary file, which we refuse."""
    if b"\x00" in data[:8192]:
        raise ValueError(f"{source} looks like a binary file; give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{source} is not valid UTF-8 text; give a UTF-8 text file") from None


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file; a missing, unreadable or binary file is a ValueError (exit 2)."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode_text(data, str(path))


def read_stdin(stdin: TextIO | None = None) -> str:
    stream = stdin or sys.stdin
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # a StringIO in tests
        return stream.read()
    return decode_text(buffer.read(), "stdin")


def read_prompt(
    argument: str | None, file: Path | None = None, stdin: TextIO | None = None
) -> str:
    """Build the prompt the way llm and Ollama do: piped stdin (or --file) first, then the
    argument after a blank line. `-` or no argument reads stdin. Empty prompts are refused."""
    stream = stdin or sys.stdin
    parts: list[str] = []
    if file is not None:
        if argument == "-":
            raise ValueError("give the prompt either with --file or on stdin ('-'), not both")
        parts.append(read_text_file(file))
    elif argument is None or argument == "-":
        if argument is None and is_tty(stream):
            raise ValueError(
                "no prompt: pass PROMPT, pipe text on stdin, or use --file/--input"
            )
        parts.append(read_stdin(stream))
        argument = None
    elif not is_tty(stream):
        piped = read_stdin(stream)
        if piped.strip():
            parts.append(piped)
    if argument is not None:
        parts.append(argument)
    prompt = "\n\n".join(part.rstrip("\r\n") for part in parts)
    if not prompt.strip():
        raise ValueError("the prompt is empty: give some text to continue")
    return prompt


def read_source(source: str | None) -> tuple[str, str]:
    """(text, its name) from a file or stdin; an empty text is a usage error."""
    if source is None and is_tty(sys.stdin):
        raise ValueError("no input: give FILE, or - to read stdin")
    if source in (None, "-"):
        text, name = read_stdin(), "stdin"
    else:
        text, name = read_text_file(source), source
    if not text.strip():
        raise ValueError(f"{name} is empty: give some text")
    return text, name
