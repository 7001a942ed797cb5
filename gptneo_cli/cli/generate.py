"""`gptneo generate`: continue a prompt, or a file of prompts, with a causal LM.

Thin on purpose: read prompts (inputs), build a GenerationConfig from the flags the
options schema gives it (options; validated before torch loads), load the model (loading),
call gptneo_cli.generation, render (output). The model code is imported inside the
command so `gptneo --help` never imports torch.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from ..settings import Settings, load_settings
from .errors import EXIT_INTERRUPTED
from .help import examples
from .inputs import (
    MAX_PROMPT_BYTES,
    check_text,
    read_prompt,
    read_stdin,
    read_text_file,
    stdin_has_input,
)
from .loading import LoadedModel, ModelOptions, load_draft, load_model, spinner
from .options import DebugOpt, generation_config, generation_options, loading_options
from .output import Diagnostics, TextStream, check_format, is_tty, write_json
from .userfiles import AtomicTextFile

IO_PANEL = "Input and output"
MORE_PANEL = "Generation"


def register(app: typer.Typer) -> None:
    app.command(
        "generate",
        epilog=examples(
            (
                "Continue a prompt with the bundled demo model",
                'gptneo generate "def read_config(path):" -m tiny -n 40',
            ),
            (
                "Pipe text in and get JSON back",
                'echo "The Pile is" | gptneo generate -m 125m --format json',
            ),
            (
                "A file of prompts, one per line, as JSON Lines",
                "gptneo generate --input prompts.txt --format jsonl",
            ),
        ),
    )(generate)


@generation_options("generate")
@loading_options(quantize=True, compile=True)
def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="Text to continue. '-' (or piping into gptneo) reads stdin; with both, "
            "stdin comes first and PROMPT follows after a blank line.",
            show_default=False,
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="Read the prompt from a UTF-8 text file.",
            rich_help_panel=IO_PANEL,
            show_default=False,
        ),
    ] = None,
    input_file: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help="Many prompts: .txt one per line, or .jsonl with "
            '{"prompt": ...} per line. Results keep the input order.',
            rich_help_panel=IO_PANEL,
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write results to this file instead of stdout.",
            rich_help_panel=IO_PANEL,
            show_default=False,
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="text, json (one document) or jsonl (one record per result).",
            rich_help_panel=IO_PANEL,
        ),
    ] = "text",
    echo: Annotated[
        bool,
        typer.Option(
            "--echo",
            help="Print the prompt before the text when piped too.",
            rich_help_panel=IO_PANEL,
        ),
    ] = False,
    stats: Annotated[
        bool,
        typer.Option(
            "--stats",
            help="Print load time, time to first token, tokens/s and peak memory to stderr.",
            rich_help_panel=IO_PANEL,
        ),
    ] = False,
    show_config: Annotated[
        bool,
        typer.Option(
            "--show-config",
            help="Print the effective settings to stderr (and exit when there is no prompt).",
            rich_help_panel=IO_PANEL,
        ),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", help="Prompts per batch with --input.", rich_help_panel=IO_PANEL
        ),
    ] = 8,
    generation: dict[str, Any] | None = None,
    loading: dict[str, Any] | None = None,
    debug: DebugOpt = False,
) -> None:
    """Continue a prompt with a GPT-Neo model, streaming the text as it is generated."""
    fmt = check_format(fmt)
    settings = load_settings()
    given = generation or {}
    config = generation_config(settings, given)
    model_flags = dict(loading or {})
    options = ModelOptions.merge(settings, **model_flags)
    diag = Diagnostics()
    _check_flags(diag, fmt, batch_size, config)
    stdin: IO[str] | None = sys.stdin
    if show_config:
        # Given on the command line: a value, or an on/off flag that is on (--compile).
        flags = {k for k, v in {**given, **model_flags}.items() if v is not None and v is not False}
        _show_config(diag, settings, options, config, flags)
        if input_file is None and file is None and prompt is None:
            stdin = _piped_after_show_config()
    if stdin is None:  # --show-config alone: the table was the whole job
        return
    prompts = _collect_prompts(prompt, file, input_file, stdin)
    # --output is written beside the file and renamed over it at the end (the old file stays
    # whole if anything fails); it is opened now so that a bad path fails before loading.
    target = AtomicTextFile(output) if output is not None else None
    sink: Any = sys.stdout if target is None else target
    try:
        loaded = load_model(options, fast=True)
        load_draft(loaded, config)
        started = time.perf_counter()
        if fmt == "text" and len(prompts) == 1 and config.num_return_sequences == 1:
            results = [_stream_one(loaded, prompts[0], config, TextStream(sink), echo)]
        else:
            results = _run_batches(loaded, prompts, config, batch_size, fmt, sink, echo)
        elapsed = time.perf_counter() - started
    except BaseException:
        if target is not None:
            target.discard()
        raise
    if target is not None:
        target.commit()  # Ctrl-C too: what was generated is kept, as on stdout
    _report(diag, loaded, results, elapsed, stats)


def _check_flags(diag: Diagnostics, fmt: str, batch_size: int, config: Any) -> None:
    """What the flags say together, checked before any model loads."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    for text in config.stop:
        check_text(text, "--stop")
    if config.logprobs is not None and fmt == "text":
        diag.warn("--logprobs is reported in --format json or jsonl only")


def _piped_after_show_config() -> IO[str] | None:
    """--show-config alone only shows the settings, unless a prompt is piped in: a terminal
    or an empty stdin (</dev/null, scripts) gives None (exit 0 after the table)."""
    waiting = not is_tty(sys.stdin) and stdin_has_input(sys.stdin)  # never an idle pipe
    piped = read_stdin(sys.stdin, MAX_PROMPT_BYTES) if waiting else ""
    return io.StringIO(piped) if piped.strip() else None


def _report(
    diag: Diagnostics, loaded: LoadedModel, results: list[Any], elapsed: float, stats: bool
) -> None:
    """After the text: truncation warnings, --stats, and exit 130 when Ctrl-C cut it short."""
    cut = [r.truncated_tokens for r in results if r.truncated_tokens]
    if cut:
        where = f" (in {len(cut)} of {len(results)} results)" if len(results) > 1 else ""
        diag.warn(f"prompt too long for the model: dropped its oldest {max(cut)} tokens{where}")
    if stats:
        _print_stats(diag, loaded, results, elapsed)
    if any(r.finish_reason == "cancelled" for r in results):
        raise typer.Exit(EXIT_INTERRUPTED)  # Ctrl-C: what was generated stays printed


# --------------------------------------------------------------------------- input


def _collect_prompts(
    prompt: str | None, file: Path | None, input_file: Path | None, stdin: IO[str]
) -> list[str]:
    if input_file is None:
        return [read_prompt(prompt, file, stdin)]
    if prompt is not None or file is not None:
        raise ValueError("--input runs a file of prompts: leave out PROMPT and --file")
    return read_input_file(input_file)


def read_input_file(path: Path) -> list[str]:
    """Prompts from .txt (one per non-blank line) or .jsonl ({"prompt": ...} per line)."""
    text = read_text_file(path)
    prompts: list[str] = []
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {lineno}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise ValueError(f"{path} line {lineno}: JSON nested too deeply") from None
        value = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'{path} line {lineno}: expected {{"prompt": "<non-empty text>"}}')
        prompts.append(value)
    for lineno, value in enumerate(prompts, start=1):
        if len(value) > MAX_PROMPT_BYTES:
            raise ValueError(
                f"{path}: prompt {lineno} is longer than "
                f"{MAX_PROMPT_BYTES // 2**20} MB, far more than a model's context"
            )
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


# --------------------------------------------------------------------------- generation


def _stream_one(loaded: LoadedModel, prompt: str, config: Any, out: TextStream, echo: bool) -> Any:
    """Stream one continuation: the prompt dimmed on a terminal (or with --echo), then text."""
    from ..generation import stream

    if out.tty or echo:
        out.prompt(prompt)
    run = stream(loaded.model, loaded.tokenizer, prompt, config)
    try:
        for delta in run:
            out.write(delta)
    finally:
        result = run.close()
        out.end()
    return result


def _run_batches(
    loaded: LoadedModel,
    prompts: list[str],
    config: Any,
    batch_size: int,
    fmt: str,
    sink: IO[str],
    echo: bool,
) -> list[Any]:
    """Batches in input order; each batch's results are written as soon as it finishes."""
    from ..generation import generate as run_generation

    out = TextStream(sink) if fmt == "text" else None
    records: list[dict[str, Any]] = []
    results: list[Any] = []
    total = len(prompts)
    for start in range(0, total, batch_size):
        chunk = prompts[start : start + batch_size]
        label = f"Generating {start + 1}-{start + len(chunk)} of {total}"
        with spinner(label):
            batch = run_generation(loaded.model, loaded.tokenizer, chunk, config)
        for number, result in enumerate(batch):
            index = start + result.prompt_index
            sequence = number % config.num_return_sequences
            results.append(result)
            if out is not None:
                _write_text(out, prompts[index], result, index, sequence, config, echo)
                continue
            record = result_record(loaded, prompts[index], result, config, index, sequence)
            if fmt == "jsonl":
                write_json(record, sink, lines=True)
            else:
                records.append(record)
        if any(r.finish_reason == "cancelled" for r in batch):
            break
    if fmt == "json":
        write_json(records[0] if len(records) == 1 else records, sink)
    return results


def _write_text(
    out: TextStream, prompt: str, result: Any, index: int, sequence: int, config: Any, echo: bool
) -> None:
    header = f"[prompt {index + 1}"
    header += f", sample {sequence + 1}]" if config.num_return_sequences > 1 else "]"
    out.note(header)
    if out.tty or echo:
        out.prompt(prompt)
    out.write(result.text + "\n")  # every result ends with one newline of its own


def result_record(
    loaded: LoadedModel, prompt: str, result: Any, config: Any, index: int = 0, sequence: int = 0
) -> dict[str, Any]:
    """The JSON object for one result (the schema documented in the README)."""
    from ..attention import choose_backend

    model = loaded.model
    record: dict[str, Any] = {
        "model": loaded.options.model,
        "revision": loaded.options.revision,
        "index": index,
        "sequence": sequence,
        "prompt": prompt,
        "text": result.text,
        "token_ids": list(result.token_ids),
        "finish_reason": result.finish_reason,
        "usage": dict(result.usage),
        "timings": {
            "load_s": round(loaded.load_s, 4),
            "ttft_s": round(result.timings.ttft_s, 4),
            "prompt_tok_s": round(result.timings.prompt_tok_s, 2),
            "gen_tok_s": round(result.timings.gen_tok_s, 2),
        },
        "seed": result.seed,
        "truncated_tokens": result.truncated_tokens,
        "settings": {
            **config.to_dict(),
            "device": str(model.device),
            "dtype": str(model.dtype).removeprefix("torch."),
            "attn": choose_backend(model.attn_implementation, model.device, model.dtype),
        },
    }
    if config.logprobs is not None and result.logprobs is not None:
        record["logprobs"] = [item.to_dict() for item in result.logprobs]
    if config.speculative:
        record["speculative"] = {"drafted": result.drafted, "accepted": result.accepted}
    return record


# --------------------------------------------------------------------------- diagnostics


def _show_config(
    diag: Diagnostics, settings: Settings, options: ModelOptions, config: Any, given: set[str]
) -> None:
    """Every effective value and where it came from: flag, env, config file or default."""

    def source(key: str) -> str:
        if key in given:
            return "flag"
        return settings.sources.get(key, "default")

    values = {**asdict(options), **config.to_dict()}
    del values["threads_source"]  # source() says where threads came from
    if values["threads"] is None:
        values["threads"] = "auto"
    if config.max_new_tokens is None and config.max_length is None:
        from ..options import DEFAULT_MAX_NEW_TOKENS

        values["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS  # the value in force, not "-"
    rows = [(key, f"{_show(value)} ({source(key)})") for key, value in values.items()]
    rows.append(("config file", f"{settings.path} ({'found' if settings.file_found else 'none'})"))
    diag.table("Effective settings", rows)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, str)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def peak_memory(model: Any) -> str:
    """Peak CUDA memory allocated on the model's GPU, else the process's peak RSS."""
    import torch

    device = model.device
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (CUDA allocated)"
    try:
        import resource
    except ImportError:  # Windows
        return "n/a"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return f"{peak * scale / 2**20:.0f} MiB (peak RSS)"


def _print_stats(
    diag: Diagnostics, loaded: LoadedModel, results: list[Any], elapsed: float
) -> None:
    completion = sum(r.completion_tokens for r in results)
    prompt_tokens = sum(r.prompt_tokens for r in results)
    first = results[0].timings if results else None
    rows = [("load", f"{loaded.load_s:.2f} s")]
    if first is not None:
        rows.append(("time to first token", f"{first.ttft_s * 1000:.0f} ms"))
    if len(results) == 1 and first is not None:
        rows.append(("prompt", f"{prompt_tokens} tokens, {first.prompt_tok_s:.1f} tok/s"))
        rows.append(("generation", f"{completion} tokens, {first.gen_tok_s:.1f} tok/s"))
    else:
        rate = completion / elapsed if elapsed > 0 else 0.0
        rows.append(("results", str(len(results))))
        rows.append(("prompt", f"{prompt_tokens} tokens"))
        rows.append(("generation", f"{completion} tokens in {elapsed:.2f} s, {rate:.1f} tok/s"))
    drafted = sum(r.drafted for r in results)
    if drafted or any(r.accepted for r in results):
        accepted = sum(r.accepted for r in results)
        rate = accepted / drafted if drafted else 0.0
        rows.append(("speculative", f"{drafted} drafted, {accepted} accepted ({rate:.0%})"))
    from ..threads import current

    choice = current()
    if choice is not None:
        rows.append(("threads", choice.describe()))
    rows.append(("peak memory", peak_memory(loaded.model)))
    diag.table("Stats", rows)
