"""The CLI's failure contract: one stderr line, a documented exit code, never a traceback.

Exit codes: 0 ok, 1 runtime error, 2 usage (bad input), 130 interrupted. `guard` wraps
every command; `run_app` runs the Typer app without Click's own error printing.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import typer

try:  # typer >= 0.2x vendors click as typer._click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer with click as a dependency
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from ..errors import GPTNeoError, is_out_of_memory
from .output import inert, is_tty

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "gptneo"
#: The documented line for any allocation that fails (README "Exit codes").
OUT_OF_MEMORY = "out of memory: try a smaller model, --dtype bfloat16, or a shorter input"


def is_native_panic(exc: BaseException) -> bool:
    """A Rust panic surfaced by pyo3 (tokenizers, safetensors): a BaseException, so
    `except Exception` lets it through."""
    return type(exc).__name__ == "PanicException"


class _State:
    """Process-wide flags set by the root callback (`gptneo --debug ...`)."""

    debug: bool = False


state = _State()


def debug_enabled() -> bool:
    return state.debug or os.environ.get("GPTNEO_DEBUG", "") not in ("", "0")


def report_error(message: str) -> None:
    """One line on stderr: the contract for every failure a user can cause. Whatever the
    message quotes from data (file names, labels, text) is made inert for the terminal."""
    line = inert(" ".join(str(message).split())) or "unknown error"
    try:
        sys.stderr.write(f"Error: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def exit_code_for(exc: BaseException) -> int:
    """Map an exception to the documented exit code and print its one-line message."""
    if debug_enabled() and not isinstance(exc, (KeyboardInterrupt, BrokenPipeError)):
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        if is_tty(sys.stderr):
            sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    if isinstance(exc, BrokenPipeError):
        _silence_stdout()
        return EXIT_OK
    if isinstance(exc, GPTNeoError):
        report_error(exc.cli or str(exc))  # the CLI's wording names its flags
        return EXIT_RUNTIME
    if isinstance(exc, ValueError):
        report_error(getattr(exc, "cli", None) or str(exc))  # OptionError: in CLI flags
        return EXIT_USAGE
    if is_out_of_memory(exc):
        report_error(OUT_OF_MEMORY)
        return EXIT_RUNTIME
    if is_native_panic(exc):
        text = str(exc).strip()
        report_error(
            f"internal error in a native library (it panicked: "
            f"{text.splitlines()[0][:200] if text else 'no message'})"
        )
        return EXIT_RUNTIME
    if isinstance(exc, OSError):
        report_error(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
        return EXIT_RUNTIME
    hint = "" if debug_enabled() else " (run again with --debug for the traceback)"
    report_error(f"internal error: {type(exc).__name__}: {exc}{hint}")
    return EXIT_RUNTIME


def guard(callback: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command so that any failure becomes one stderr line and the right exit code."""

    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("debug"):
            state.debug = True
        try:
            return callback(*args, **kwargs)
        except (typer.Exit, typer.Abort, click_exceptions.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI boundary
            raise typer.Exit(exit_code_for(exc)) from None
        except BaseException as exc:
            if is_native_panic(exc):
                raise typer.Exit(exit_code_for(exc)) from None
            raise

    return wrapper


def guard_app(app: typer.Typer) -> None:
    """Apply `guard` to every registered command, including sub-apps such as `models`."""
    for info in app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "_gptneo_guarded", False):
            info.callback = guard(info.callback)
            info.callback._gptneo_guarded = True  # type: ignore[attr-defined]
    for group in app.registered_groups:
        if group.typer_instance is not None:
            guard_app(group.typer_instance)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> int:
    """Run the app without Click's own error printing and return the exit code."""
    try:
        result = app(args=argv, prog_name=PROG, standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as exc:
        text = exc.format_message()  # Typer's Rich help printed itself already; Click's did not
        if text.strip():
            sys.stdout.write(text + "\n")
        return EXIT_USAGE
    except click_exceptions.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else PROG
        report_error(f"{exc.format_message()} (see '{where} --help')")
        return EXIT_USAGE
    except click_exceptions.ClickException as exc:
        report_error(exc.format_message())
        return exc.exit_code
    except typer.Abort:
        return EXIT_INTERRUPTED
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary
        return _at_the_boundary(exc)
    return result if isinstance(result, int) else EXIT_OK


def _at_the_boundary(exc: BaseException) -> int:
    """The exit code for what reached the top; re-raises what is not ours to handle."""
    if isinstance(exc, (Exception, KeyboardInterrupt)) or is_native_panic(exc):
        return exit_code_for(exc)
    # Click (and Rich) exit 1 when stdout is a closed pipe, e.g. while printing help into
    # `| head -1`; the CLI's rule for a closed pipe is exit 0, quietly.
    if (
        isinstance(exc, SystemExit)
        and isinstance(exc.__context__, OSError)
        and exc.__context__.errno == errno.EPIPE
    ):
        _silence_stdout()
        return EXIT_OK
    raise exc
