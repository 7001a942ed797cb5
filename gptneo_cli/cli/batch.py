"""`gptneo batch`: run a file of OpenAI Batch API requests, resumably, here or on Ray.

Thin: check the flags, the input (ids unique) and the output (what is already done, a
torn last line cut), then hand the remaining requests to gptneo_cli.batch, with a Rich
bar on a terminal's stderr and one summary line at the end. torch and ray are imported
inside the command only.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ..settings import load_settings
from .help import examples
from .loading import ModelOptions, load_model
from .options import (
    DebugOpt,
    generation_config,
    generation_options,
    loading_options,
    max_running_option,
)
from .output import is_tty, make_console

JOB_PANEL = "Batch job"
RAY_PANEL = 'Ray (pip install "gptneo-cli\\[ray]")'  # \[: not Rich markup
RAY_INSTALL = 'pip install "gptneo-cli[ray]"'


def register(app: typer.Typer) -> None:
    app.command(
        "batch",
        epilog=examples(
            (
                "One prompt a line, with the demo model",
                "gptneo batch prompts.txt -o out.jsonl -m tiny",
            ),
            (
                "OpenAI Batch API requests; rerun to resume",
                "gptneo batch requests.jsonl -o out.jsonl",
            ),
            (
                "On a Ray cluster, 4 models",
                "gptneo batch requests.jsonl -o out.jsonl --ray --actors 4",
            ),
        ),
    )(batch)


@generation_options("batch")
@loading_options(quantize=True)
def batch(
    input_file: Annotated[
        str,
        typer.Argument(
            metavar="INPUT",
            show_default=False,
            help='OpenAI Batch API requests (.jsonl), {"prompt": ...} lines, or a .txt file '
            "with one prompt a line; '-' reads stdin.",
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            show_default=False,
            rich_help_panel=JOB_PANEL,
            help="Output .jsonl (OpenAI Batch output lines). Requests already in it are skipped.",
        ),
    ],
    restart: Annotated[
        bool,
        typer.Option(
            "--restart",
            rich_help_panel=JOB_PANEL,
            help="Delete OUTPUT's results and start over (asks first; --yes does not).",
        ),
    ] = False,
    chat_template: Annotated[
        str | None,
        typer.Option(
            "--chat-template",
            rich_help_panel=JOB_PANEL,
            show_default=False,
            help="How /v1/chat/completions lines are laid out, as for `gptneo serve`: "
            "default, human-ai, qa or a JSON/TOML file.",
        ),
    ] = None,
    yes: Annotated[
        bool,
        typer.Option("--yes", "-y", rich_help_panel=JOB_PANEL, help="Do not ask before --restart."),
    ] = False,
    max_running: Annotated[int, max_running_option(JOB_PANEL)] = 16,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            rich_help_panel=RAY_PANEL,
            help="Run on a Ray cluster: Ray Data reads the input, one model per actor.",
        ),
    ] = False,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            rich_help_panel=RAY_PANEL,
            show_default=False,
            help="Cluster to join, e.g. ray://head:10001 or auto (default: RAY_ADDRESS, else a "
            "local Ray).",
        ),
    ] = None,
    actors: Annotated[
        int,
        typer.Option(
            "--actors",
            min=1,
            max=10000,
            rich_help_panel=RAY_PANEL,
            help="Actors (loaded models) in the pool.",
        ),
    ] = 1,
    cpus_per_actor: Annotated[
        float,
        typer.Option(
            "--cpus-per-actor",
            min=0,
            rich_help_panel=RAY_PANEL,
            help="CPUs Ray reserves per actor (and its threads, unless --threads).",
        ),
    ] = 1.0,
    gpus_per_actor: Annotated[
        float,
        typer.Option(
            "--gpus-per-actor",
            min=0,
            rich_help_panel=RAY_PANEL,
            help="GPUs Ray reserves per actor (fractions share a GPU).",
        ),
    ] = 0.0,
    generation: dict[str, Any] | None = None,
    loading: dict[str, Any] | None = None,
    debug: DebugOpt = False,
) -> None:
    """Run a file of requests (completions, chat, classify) resumably; --ray scales out.

    Exit code: 0 every request succeeded, 1 some failed (their lines hold the error),
    2 unusable arguments or input.
    """
    settings = load_settings()
    given = generation or {}
    generation_config(settings, given)  # bad flags fail here, before any work
    options = ModelOptions.merge(settings, **(loading or {}))
    if ray and not _has_ray():
        raise ValueError(f"--ray needs Ray: {RAY_INSTALL}")
    if input_file != "-" and Path(input_file).resolve() == output.resolve():
        raise ValueError("--output must not be the input file")
    from .serve import chat_template_of

    template = chat_template_of(settings, chat_template)
    from ..batch.jobs import BatchInput, scan_output
    from ..batch.runner import Progress, body_defaults

    defaults = body_defaults(given)
    with BatchInput(input_file) as source:
        total = source.check_ids()
        if restart:
            _confirm_restart(output, yes)
        previous = scan_output(output)
        remaining = max(total - len(previous.done), 0)
        items = (it for it in source.items() if it.custom_id not in previous.done)
        progress = Progress()

        def work(on_record: Any) -> None:
            if remaining == 0:  # nothing (left) to do: the output exists, no model loads
                from ..batch.jobs import OutputWriter

                OutputWriter(output).close()
            elif ray:
                from ..batch.ray_job import RaySpec, run_on_ray

                spec = RaySpec(
                    model=options.model,
                    revision=options.revision,
                    device=options.device,
                    dtype=options.dtype,
                    attn=options.attn,
                    quantize=options.quantize,
                    max_running=max_running,
                    threads=options.threads or max(1, int(cpus_per_actor)),
                    defaults=defaults,
                    aliases=_aliases(options.model),
                    chat_template=dataclasses.asdict(template),
                )
                run_on_ray(
                    items,
                    output,
                    spec,
                    address=ray_address,
                    actors=actors,
                    cpus_per_actor=cpus_per_actor,
                    gpus_per_actor=gpus_per_actor,
                    progress=progress,
                    on_record=on_record,
                )
            else:
                _run_here(
                    items, output, options, max_running, defaults, template, progress, on_record
                )

        _with_bar(remaining, work, lambda: _summary(progress, previous, output))
    if previous.failed + progress.failed:
        raise typer.Exit(1)


def _with_bar(remaining: int, work: Any, summary: Any) -> None:
    """Run work(on_record) under a progress bar on a terminal's stderr; the summary line
    comes after it, also when Ctrl-C stops the job (what is written stays: rerun to resume)."""
    bar = _Bar(remaining) if is_tty(sys.stderr) else None
    try:
        work(bar.update if bar is not None else None)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        summary()
        raise
    except BaseException:
        if bar is not None:
            bar.close()
        raise
    if bar is not None:
        bar.close()
    summary()


def _has_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _run_here(
    items: Any,
    output: Path,
    options: ModelOptions,
    max_running: int,
    defaults: dict[str, Any],
    template: Any,
    progress: Any,
    on_record: Any,
) -> None:
    from ..threads import passive_openmp_waits

    passive_openmp_waits()  # the model runs on the scheduler's thread
    loaded = load_model(options, "auto", fast=True, long_running=True)  # a classifier: its head
    from ..batch.jobs import OutputWriter
    from ..batch.runner import make_runner

    runner, scheduler = make_runner(
        loaded.model,
        loaded.tokenizer,
        model_name=options.model,
        max_running=max_running,
        defaults=defaults,
        aliases=_aliases(options.model),
        chat_template=template,
    )
    try:
        with OutputWriter(output) as writer:
            runner.run(items, writer.write, progress, on_record)
    finally:
        scheduler.close(0)


def _aliases(name: str) -> list[str]:
    from .serve import _aliases as aliases

    return aliases(name)


def _confirm_restart(output: Path, yes: bool) -> None:
    if not output.exists() or output.stat().st_size == 0:
        return
    if not yes:
        if not is_tty(sys.stdin):
            raise ValueError(f"--restart deletes the results in {output}: add --yes to confirm")
        if not typer.confirm(
            f"Delete the results in {output} and start over?", default=False, err=True
        ):
            raise typer.Exit(2)
    output.write_bytes(b"")


def _summary(progress: Any, previous: Any, output: Path) -> None:
    seconds = time.perf_counter() - progress.started
    ran = progress.done + progress.failed
    parts = [f"batch: {ran} done ({progress.failed} failed)"]
    if len(previous.done):
        parts.append(
            f"{len(previous.done)} already in {output}"
            + (f" ({previous.failed} failed)" if previous.failed else "")
        )
    if previous.torn:
        parts.append("a torn last line was redone")
    rate = f"{ran / seconds:.2f} req/s, {progress.tokens / seconds:.1f} tok/s" if ran else ""
    parts.append(f"{progress.tokens} tokens in {seconds:.1f}s" + (f" ({rate})" if rate else ""))
    print(", ".join(parts) + f" -> {output}", file=sys.stderr, flush=True)


class _Bar:
    """done/total, requests/s, generated tok/s and ETA on a terminal's stderr."""

    def __init__(self, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        # On a copy of the descriptor: `--ray` mutes Ray's native logging on fd 2.
        self.stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", encoding="utf-8")
        self.progress = Progress(
            TextColumn("batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=make_console(self.stream),
            transient=True,
        )
        self.task = self.progress.add_task("batch", total=total or None, rates="")
        self.progress.start()

    def update(self, record: Any, stats: Any) -> None:
        seconds = max(time.perf_counter() - stats.started, 1e-9)
        done = stats.done + stats.failed
        rates = f"{done / seconds:.2f} req/s {stats.tokens / seconds:.1f} tok/s"
        if stats.failed:
            rates += f" {stats.failed} failed"
        self.progress.update(self.task, completed=done, rates=rates)

    def close(self) -> None:
        self.progress.stop()
        self.stream.close()
