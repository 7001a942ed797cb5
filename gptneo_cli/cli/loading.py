"""Loading a model for a command: flags merged with the settings, torch imported with
Ctrl-C held back, the name resolved, weights and tokenizer read under a spinner.

Nothing here imports torch at module load; `load_model` imports the model code when called.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import threads
from ..settings import Settings
from ..threads import check_threads
from .output import is_tty, make_console

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ATTN_CHOICES = ("auto", "eager", "sdpa", "flash")
#: What gptneo_cli.device accepts, checked here by name so a typo fails before torch loads.
_DEVICE_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half")


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
    """Import torch (once) with Ctrl-C held back; commands call this before model code.

    The CPU-usage sample for the default thread count (gptneo_cli.threads) runs meanwhile,
    so it costs no time."""
    if "torch" in sys.modules:
        return
    threads.start_sample()
    with sigint_deferred():
        import torch  # noqa: F401


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
    threads: int | None = None
    """CPU threads; None: the free-core rule of gptneo_cli.threads."""
    threads_source: str = "threads"
    """Where `threads` came from (--threads, env GPTNEO_THREADS, file ...), for --stats."""

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
        threads: str | int | None = None,
    ) -> ModelOptions:
        """Flags win; then the settings (env > file > default). The backend name and the
        thread count are checked here so a typo fails before anything is read (before torch
        is imported); device and dtype in `load_model`."""
        count, source = thread_setting(settings, threads)
        opts = cls(
            model=settings.model(model),
            revision=settings.get("revision", revision),
            device=settings.get("device", device).strip().lower(),
            dtype=settings.get("dtype", dtype).strip().lower(),
            attn=settings.get("attn", attn).strip().lower(),
            quantize=quantize,
            compile=compile,
            threads=count,
            threads_source=source,
        )
        if quantize is not None and quantize.strip().lower() not in (
            "none",
            "int8",
            "int8-dynamic",
        ):
            raise ValueError(f"unknown --quantize {quantize!r}: use int8, int8-dynamic or none")
        if opts.attn not in ATTN_CHOICES:
            raise ValueError(
                f"unknown attention backend {opts.attn!r}: use auto, eager, sdpa or flash"
            )
        if not _DEVICE_NAME.match(opts.device):
            raise ValueError(f"unknown device {opts.device!r}: use auto, cpu, cuda, cuda:N or mps")
        if opts.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"unknown dtype {opts.dtype!r}: use auto, float32, bfloat16 or float16"
            )
        return opts


def thread_setting(settings: Settings, flag: str | int | None) -> tuple[int | None, str]:
    """(--threads, else GPTNEO_THREADS, else the file's `threads`; None = auto, where it
    came from). The flag is checked here, before torch loads; settings were when read."""
    count = check_threads(flag, "--threads")
    if flag is not None:
        return count, "--threads" if count is not None else "auto"
    return settings.get("threads"), settings.sources.get("threads", "default")


def apply_threads(count: int | None, source: str) -> None:
    """Import torch and set its thread count (commands that load models their own way)."""
    import_torch()
    threads.apply(count, source)


@dataclass
class LoadedModel:
    """A model with its tokenizer and how long loading took (for --stats and JSON timings)."""

    model: Any
    tokenizer: Any
    options: ModelOptions
    path: Path
    load_s: float


def load_model(
    options: ModelOptions,
    head: str = "GPTNeoForCausalLM",
    *,
    fast: bool = False,
    path: Path | None = None,
    long_running: bool = False,
) -> LoadedModel:
    """Resolve the name (unless `path` is the folder it resolved to already), read weights
    and tokenizer through gptneo_cli.loader; a spinner runs on a terminal's stderr.

    fast=True (generation) loads the causal LM as gptneo_cli.fast.FastCausalLM: packed
    weights, same outputs, plus options.quantize / options.compile. head="auto" (serve,
    batch) loads what the checkpoint is: its sequence-classification head when it has one
    (gptneo_cli.tasks.checkpoint_head), else the causal LM. long_running (serve, batch,
    chat): the model stays loaded, so its panels go in huge pages unless GPTNEO_HUGE_PAGES=0
    (gptneo_cli.native.huge_pages: faster decoding for a slower first load on some VMs).
    """
    start = time.perf_counter()
    import_torch()
    if long_running:
        from .. import native

        native.HUGE_PAGES_DEFAULT = True
    threads.apply(options.threads, options.threads_source)  # before kernels are measured
    from ..device import resolve_device, resolve_dtype
    from ..loader import load_folder, resolve

    if head == "auto":
        from ..tasks import checkpoint_head

        resolve_device(options.device)  # bad values fail before any download
        path = path if path is not None else resolve(options.model, options.revision)
        head = checkpoint_head(path)
    reference = not (fast and head == "GPTNeoForCausalLM")
    if reference and (options.quantize not in (None, "none") or options.compile):
        raise ValueError("--quantize and --compile apply to text generation only")
    device = resolve_device(options.device)  # bad values fail before any download
    dtype = resolve_dtype(options.dtype, device, None if reference else options.quantize)
    # Resolve (and on first use download) outside the spinner: huggingface_hub's progress
    # bars would fight a live spinner for the same stderr line.
    if path is None:
        path = resolve(options.model, options.revision)
    with spinner(f"Loading {options.model}"):
        model, tokenizer = load_folder(
            path,
            head=head,
            reference=reference,
            dtype=dtype,
            device=device,
            attn=options.attn,
            quantize=None if reference else options.quantize,
            compile=options.compile and not reference,
            threads=None,  # applied above, with where the number came from
        )
    return LoadedModel(model, tokenizer, options, path, time.perf_counter() - start)


def load_draft(loaded: LoadedModel, config: Any) -> None:
    """--draft-model: load the draft model beside the model now, so that a bad one (not
    found, another tokenizer) fails before any text is generated."""
    if config.draft_model is None:
        return
    from ..speculative import load_draft as load

    with spinner(f"Loading draft model {config.draft_model}"):
        load(loaded.model, config.draft_model, tokenizer=loaded.tokenizer, folder=loaded.path)


@contextlib.contextmanager
def spinner(message: str) -> Iterator[None]:
    """A Rich spinner on stderr when it is a terminal; silent otherwise (pipes, CI, logs)."""
    if not is_tty(sys.stderr):
        yield
        return
    with make_console(sys.stderr).status(f"{message}…", spinner="dots"):
        yield
