"""Pieces every command shares: error handling and exit codes, common options, model
loading with a spinner, and reading prompts from arguments, stdin and files.

Nothing here imports torch at module load; `load_model` imports the model code when called.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

try:  # typer >= 0.2x vendors click as typer._click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer with click as a dependency
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

from ..errors import GPTNeoError
from ..settings import Settings
from .output import is_tty, make_console

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "gptneo"

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ATTN_CHOICES = ("auto", "eager", "sdpa", "flash")


class _State:
    """Process-wide flags set by the root callback (`gptneo --debug ...`)."""

    debug: bool = False


state = _State()


def debug_enabled() -> bool:
    return state.debug or os.environ.get("GPTNEO_DEBUG", "") not in ("", "0")


# --------------------------------------------------------------------------- options


def complete_from(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """Shell completion for an option with a fixed set of values."""
    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]

    return complete


MODEL_PANEL = "Model"

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model: local folder, Hub id (org/name) or alias (125m, 1.3b, 2.7b; "
        "tiny = the bundled demo). (env GPTNEO_MODEL; default EleutherAI/gpt-neo-125M)",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option(
        "--revision",
        help="Hub branch, tag or commit. (env GPTNEO_REVISION; default main)",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(
        "--device",
        help="auto, cpu, cuda, cuda:N or mps. (env GPTNEO_DEVICE; default auto)",
        autocompletion=complete_from(DEVICE_CHOICES),
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="auto, float32, bfloat16 or float16. (env GPTNEO_DTYPE; default auto)",
        autocompletion=complete_from(DTYPE_CHOICES),
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
AttnOpt = Annotated[
    str | None,
    typer.Option(
        "--attn",
        help="Attention backend: auto, eager, sdpa or flash. (env GPTNEO_ATTN; default auto)",
        autocompletion=complete_from(ATTN_CHOICES),
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
QuantizeOpt = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="Quantize the weights when loading: int8 (weight-only, per-channel scales; "
        "~4x less memory, faster on CPU) or int8-dynamic (also quantizes activations: "
        "faster still on CPU, a little less exact). (default none)",
        autocompletion=complete_from(("none", "int8", "int8-dynamic")),
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the decode step (slow first token; see docs/PERFORMANCE.md for "
        "when it pays).",
        rich_help_panel=MODEL_PANEL,
    ),
]
DebugOpt = Annotated[
    bool,
    typer.Option("--debug", help="Show the full traceback on errors. (env GPTNEO_DEBUG)"),
]


GEN_PANEL = "Generation"


def _gen_option(*names: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=GEN_PANEL, show_default=False, **kwargs)


MaxNewTokensOpt = Annotated[
    int | None,
    _gen_option("--max-new-tokens", "-n", help="New tokens at most. (default 100)"),
]
TemperatureOpt = Annotated[
    float | None,
    _gen_option("--temperature", "-t", help="Sampling temperature; 0 means greedy. (default 0.9)"),
]
TopKOpt = Annotated[
    int | None,
    _gen_option("--top-k", help="Keep the k most likely tokens; 0 disables. (default 50)"),
]
TopPOpt = Annotated[
    float | None, _gen_option("--top-p", help="Nucleus sampling mass in (0, 1]. (default 1.0)")
]
MinPOpt = Annotated[
    float | None,
    _gen_option("--min-p", help="Drop tokens below min_p x the top probability. (default 0)"),
]
TypicalPOpt = Annotated[
    float | None, _gen_option("--typical-p", help="Locally typical sampling mass. (default 1.0)")
]
RepetitionPenaltyOpt = Annotated[
    float | None,
    _gen_option("--repetition-penalty", help="> 1 discourages repeating tokens. (default 1.0)"),
]
PresencePenaltyOpt = Annotated[
    float | None,
    _gen_option("--presence-penalty", help="Subtracted once per generated token. (default 0)"),
]
FrequencyPenaltyOpt = Annotated[
    float | None,
    _gen_option("--frequency-penalty", help="Subtracted per occurrence. (default 0)"),
]
NoRepeatNgramOpt = Annotated[
    int | None,
    _gen_option("--no-repeat-ngram-size", help="Never repeat an n-gram of this size. (default 0)"),
]
SeedOpt = Annotated[
    int | None, _gen_option("--seed", "-s", help="Sampling seed, to repeat a run exactly.")
]
GreedyOpt = Annotated[
    bool, _gen_option("--greedy", help="Always take the most likely token (no sampling).")
]
StopOpt = Annotated[
    list[str] | None,
    _gen_option("--stop", help="End the text at this string (repeatable); it is not printed."),
]


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise KeyboardInterrupt.

    `import torch` cannot be interrupted safely: a KeyboardInterrupt inside it is swallowed
    (the run goes on), turns into an ImportError, or aborts the process from C++. Holding
    the signal for the half second the import takes gives the documented exit 130 instead.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def import_torch() -> None:
    """Import torch (once) with Ctrl-C held back; commands call this before model code."""
    if "torch" in sys.modules:
        return
    with sigint_deferred():
        import torch  # noqa: F401


def generation_config(settings: Settings, **flags: Any) -> Any:
    """A validated GenerationConfig from flags > env > config file > the engine's defaults.

    `flags` are GenerationConfig field names; None means "not given". Invalid values raise
    ValueError naming the parameter, before any model is loaded.
    """
    import_torch()
    from ..generation import GenerationConfig
    from ..settings import GENERATION_KEYS

    values = {key: settings.get(key, flags.pop(key, None)) for key in GENERATION_KEYS}
    values.update(flags)
    return GenerationConfig(**{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load and how, after flags, env and config file are merged."""

    model: str
    revision: str | None
    device: str
    dtype: str
    attn: str
    quantize: str | None = None
    compile: bool = False

    @classmethod
    def merge(
        cls,
        settings: Settings,
        *,
        model: str | None,
        revision: str | None,
        device: str | None,
        dtype: str | None,
        attn: str | None,
        quantize: str | None = None,
        compile: bool = False,
    ) -> ModelOptions:
        """Flags win; then the settings (env > file > default). The backend name is checked
        here so a typo fails before anything is read; device and dtype in `load_model`."""
        opts = cls(
            model=settings.model(model),
            revision=settings.get("revision", revision),
            device=settings.get("device", device).strip().lower(),
            dtype=settings.get("dtype", dtype).strip().lower(),
            attn=settings.get("attn", attn).strip().lower(),
            quantize=quantize,
            compile=compile,
        )
        if quantize is not None and quantize.strip().lower() not in (
            "none", "int8", "int8-dynamic"
        ):
            raise ValueError(f"unknown --quantize {quantize!r}: use int8, int8-dynamic or none")
        if opts.attn not in ATTN_CHOICES:
            raise ValueError(
                f"unknown attention backend {opts.attn!r}: use auto, eager, sdpa or flash"
            )
        return opts


@dataclass
class LoadedModel:
    """A model with its tokenizer and how long loading took (for --stats and JSON timings)."""

    model: Any
    tokenizer: Any
    options: ModelOptions
    path: Path
    load_s: float


def load_model(
    options: ModelOptions, head: str = "GPTNeoForCausalLM", *, fast: bool = False
) -> LoadedModel:
    """Resolve the name, read weights and tokenizer; a spinner runs on a terminal's stderr.

    fast=True (generation) loads a causal LM into gptneo_cli.fast.FastCausalLM: packed
    weights, same outputs, plus options.quantize / options.compile.
    """
    start = time.perf_counter()
    import_torch()
    from ..device import resolve_device, resolve_dtype
    from ..hub import resolve_model_dir

    device = resolve_device(options.device)  # bad values fail before any download
    dtype = resolve_dtype(options.dtype, device, options.quantize if fast else None)
    # Resolve (and on first use download) outside the spinner: huggingface_hub's progress
    # bars would fight a live spinner for the same stderr line.
    path = resolve_model_dir(options.model, revision=options.revision)
    with spinner(f"Loading {options.model}"):
        from .. import modeling
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
        if fast and head == "GPTNeoForCausalLM":
            from ..fast import FastCausalLM

            model = FastCausalLM.from_pretrained(
                path, dtype=dtype, device=device, attn=options.attn,
                quantize=options.quantize, compile=options.compile,
            )
        else:
            if options.quantize not in (None, "none") or options.compile:
                raise ValueError("--quantize and --compile apply to text generation only")
            model = getattr(modeling, head).from_pretrained(
                path, dtype=dtype, device=device, attn=options.attn
            )
    return LoadedModel(model, tokenizer, options, path, time.perf_counter() - start)


@contextlib.contextmanager
def spinner(message: str) -> Iterator[None]:
    """A Rich spinner on stderr when it is a terminal; silent otherwise (pipes, CI, logs)."""
    if not is_tty(sys.stderr):
        yield
        return
    with make_console(sys.stderr).status(f"{message}…", spinner="dots"):
        yield


# --------------------------------------------------------------------------- input


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


# --------------------------------------------------------------------------- errors


def report_error(message: str) -> None:
    """One line on stderr: the contract for every failure a user can cause."""
    line = " ".join(str(message).split()) or "unknown error"
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
        report_error(str(exc))
        return EXIT_RUNTIME
    if isinstance(exc, ValueError):
        report_error(str(exc))
        return EXIT_USAGE
    if isinstance(exc, MemoryError):
        report_error("out of memory: try a smaller model, --dtype bfloat16, or a shorter input")
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
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the CLI boundary
        return exit_code_for(exc)
    return result if isinstance(result, int) else EXIT_OK
