"""Standard streams the shell closed (`0<&-`, `>&-`, `2>&-`).

Python then sets sys.stdin/stdout/stderr to None, and every read or write would fail with
an AttributeError far from the cause. They are replaced at start-up: a closed stdin reads
as empty, a closed stdout fails on the first write with an OSError that names it (one
error line, exit 1; a command writing only to --output never notices), a closed stderr
swallows what is written to it.
"""

from __future__ import annotations

import errno
import io
import os
import sys


class ClosedInput(io.StringIO):
    """stdin closed by the shell: no data, and no terminal."""

    def isatty(self) -> bool:
        return False


class ClosedOutput(io.TextIOBase):
    """stdout closed by the shell: the first write is an error that says so."""

    def __init__(self, name: str) -> None:
        self._name = name

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        if not text:
            return 0
        raise OSError(
            errno.EBADF,
            f"{self._name} is closed: nothing can be printed (open it, "
            "or write to a file with --output where the command has it)",
        )

    def flush(self) -> None:
        """Nothing is buffered."""


def _descriptor_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def stand_in_for_closed_streams() -> None:
    """Replace the standard streams the shell closed (see the module docstring)."""
    if sys.stdin is None or not _descriptor_open(0):
        sys.stdin = ClosedInput("")
    if sys.stdout is None or not _descriptor_open(1):
        sys.stdout = ClosedOutput("stdout")
    if sys.stderr is None or not _descriptor_open(2):
        sys.stderr = io.StringIO()  # nowhere to report to; the exit code still tells


EXIT_TERMINATED = 128 + 15


def exit_cleanly_on_sigterm() -> None:
    """`kill` (SIGTERM) ends the command like Ctrl-C does: through the normal unwinding, so
    a file being written is dropped and the old one stays (exit 143). Without this Python
    dies on the spot and leaves its temporary files behind."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(EXIT_TERMINATED)

    try:
        signal.signal(signal.SIGTERM, terminate)
    except (ValueError, OSError):  # pragma: no cover - no SIGTERM to catch here
        pass


def library_warnings_inert() -> None:
    """The library logs a few warnings (logger "gptneo") that quote data, such as a model
    folder's name; the CLI shows them as Python would (message only, on stderr, WARNING and
    up), with control characters made inert."""
    import logging

    from .output import inert

    class InertHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                sys.stderr.write(inert(record.getMessage(), newlines=False) + "\n")
            except (OSError, ValueError):
                pass

    logger = logging.getLogger("gptneo")
    if not any(type(h).__name__ == "InertHandler" for h in logger.handlers):
        handler = InertHandler(logging.WARNING)
        logger.addHandler(handler)
