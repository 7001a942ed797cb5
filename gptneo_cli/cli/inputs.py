"""Reading what a command works on: prompts from arguments, stdin and files (UTF-8 text only)."""

from __future__ import annotations

import io
import os
import select
import stat
import sys
from pathlib import Path
from typing import BinaryIO, TextIO

from .output import is_tty


def check_text(value: str, what: str) -> str:
    """A command-line text argument as given, or a ValueError when it is not valid UTF-8
    (Python hands undecodable argument bytes over as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text (it holds undecodable bytes)") from None
    return value


def decode_text(data: bytes, source: str) -> str:
    """Text files only: NUL bytes or invalid UTF-8 mean a binary file, which we refuse."""
    if b"\x00" in data[:8192]:
        raise ValueError(f"{source} looks like a binary file; give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{source} is not valid UTF-8 text; give a UTF-8 text file") from None


#: The most a text input (a file, stdin) may hold. It is checked before anything is read
#: whole or tokenized: a 50 MB file would cost minutes and gigabytes to tokenize.
MAX_INPUT_BYTES = 16 * 2**20
#: The most a generation prompt may hold: a GPT-Neo context (2048 tokens) is ~8 KB of
#: English, so 1 MB is far beyond any prompt that fits, even with --truncate left.
MAX_PROMPT_BYTES = 2**20
#: How long a PROMPT argument waits for piped stdin to start (data or its end).
STDIN_GRACE_S = 1.0


def _megabytes(n: int) -> str:
    return f"{n / 2**20:g} MB"


def read_text_file(path: str | Path, limit: int = MAX_INPUT_BYTES) -> str:
    """Read a UTF-8 text file; a missing, unreadable, binary or too large file is a
    ValueError (exit 2). A FIFO or device is opened without blocking and read to `limit` at
    most: `<(command)` works, a FIFO nobody writes to reads as empty, /dev/zero is refused."""
    p = Path(path).expanduser()
    try:
        info = p.stat()
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise ValueError(
                f"{path} is {_megabytes(info.st_size)}: more than the "
                f"{_megabytes(limit)} a text input may hold"
            )
        nonblock = getattr(os, "O_NONBLOCK", 0)  # POSIX: open() never waits for a writer
        fd = os.open(p, os.O_RDONLY | nonblock)
        with os.fdopen(fd, "rb") as handle:
            if nonblock:
                os.set_blocking(fd, True)  # opened; now reads wait for data as usual
            data = _read_limited(handle, limit, str(path))
    except FileNotFoundError:
        raise ValueError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return decode_text(data, str(path))


def _read_limited(handle: BinaryIO, limit: int, source: str) -> bytes:
    data = handle.read(limit + 1)
    if data is None:  # a non-blocking stream with nothing yet
        data = b""
    if len(data) > limit:
        raise ValueError(f"{source} holds more than the {_megabytes(limit)} a text input may hold")
    return data


def read_stdin(stdin: TextIO | None = None, limit: int = MAX_INPUT_BYTES) -> str:
    stream = stdin or sys.stdin
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # a StringIO in tests, or a stdin the shell closed
        text = stream.read(limit + 1)
        if len(text) > limit:
            raise ValueError(f"stdin holds more than the {_megabytes(limit)} a text input may hold")
        return text
    return decode_text(_read_limited(buffer, limit, "stdin"), "stdin")


def stdin_has_input(stream: TextIO | None = None, wait_s: float = STDIN_GRACE_S) -> bool:
    """Whether piped stdin starts (data, or its end) within `wait_s`: a PROMPT argument
    does not need stdin, so an idle pipe (`sleep 1000 | gptneo generate "..."`) must not
    hold the command. Files and /dev/null are always ready."""
    stream = stream or sys.stdin
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return True  # not a descriptor (a StringIO in tests): reading cannot block
    if stat.S_ISREG(mode) or os.name == "nt":  # select() takes sockets only on Windows
        return True
    try:
        ready, _, _ = select.select([fd], [], [], wait_s)
    except (OSError, ValueError):
        return True
    return bool(ready)


def read_prompt(argument: str | None, file: Path | None = None, stdin: TextIO | None = None) -> str:
    """Build the prompt the way llm and Ollama do: piped stdin (or --file) first, then the
    argument after a blank line. `-` or no argument reads stdin. Empty prompts are refused."""
    stream = stdin or sys.stdin
    parts: list[str] = []
    if file is not None:
        if argument == "-":
            raise ValueError("give the prompt either with --file or on stdin ('-'), not both")
        parts.append(read_text_file(file, MAX_PROMPT_BYTES))
    elif argument is None or argument == "-":
        if argument is None and is_tty(stream):
            raise ValueError("no prompt: pass PROMPT, pipe text on stdin, or use --file/--input")
        parts.append(read_stdin(stream, MAX_PROMPT_BYTES))
        argument = None
    elif not is_tty(stream) and stdin_has_input(stream):
        piped = read_stdin(stream, MAX_PROMPT_BYTES)
        if piped.strip():
            parts.append(piped)
    if argument is not None:
        parts.append(check_text(argument, "PROMPT"))
    prompt = "\n\n".join(part.rstrip("\r\n") for part in parts)
    if len(prompt) > MAX_PROMPT_BYTES:  # characters: a lower bound of the bytes
        raise ValueError(
            f"the prompt is longer than {_megabytes(MAX_PROMPT_BYTES)}, far more "
            "than a model's context holds"
        )
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
