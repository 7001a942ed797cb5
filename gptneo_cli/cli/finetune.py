"""`gptneo finetune`: train a causal LM on text files, folders or jsonl.

Thin: check the options, hand over to gptneo_cli.training.finetune, show progress on stderr
and a summary on stdout. Training code (and torch) is imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..settings import load_settings
from .errors import EXIT_INTERRUPTED
from .help import examples
from .loading import apply_threads, thread_setting
from .options import DebugOpt, DeviceOpt, RevisionOpt, ThreadsOpt, complete_model
from .output import check_format
from .progress import make_reporter
from .train_common import (
    DATA_PANEL,
    OPT_PANEL,
    EpochsOpt,
    ForceOpt,
    MaxStepsOpt,
    OutputOpt,
    YesOpt,
    check_output,
    resolve_base,
    write_summary,
)

RUN_PANEL = "Run"


def register(app: typer.Typer) -> None:
    app.command(
        "finetune",
        epilog=examples(
            (
                "Fine-tune the demo model on Python files",
                "gptneo finetune tiny ./src --include .py -o ./tiny-code --max-steps 40",
            ),
            (
                "Fine-tune 125M on notes and a JSON Lines file",
                "gptneo finetune 125m notes/ posts.jsonl -o ./neo-notes --block-size 512",
            ),
        ),
    )(finetune)


def finetune(
    model_arg: Annotated[
        str,
        typer.Argument(
            metavar="MODEL",
            help="Model to start from: folder, Hub id or alias (125m, tiny, ...).",
            show_default=False,
            autocompletion=complete_model,
        ),
    ],
    data: Annotated[
        list[Path],
        typer.Argument(
            metavar="DATA",
            show_default=False,
            help="Training text: files, folders (walked recursively) or .jsonl "
            'with {"text": ...} per line.',
        ),
    ],
    output: OutputOpt,
    revision: RevisionOpt = None,
    device: DeviceOpt = None,
    include: Annotated[
        list[str] | None,
        typer.Option(
            "--include",
            help="Only files with this suffix inside folders, e.g. '.py' (repeatable).",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
    val_data: Annotated[
        list[Path] | None,
        typer.Option(
            "--val-data",
            help="Held-out text (repeatable); default: hold out --val-fraction of the documents.",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
    val_fraction: Annotated[
        float,
        typer.Option(
            "--val-fraction",
            help="Share of documents held out for validation.",
            rich_help_panel=DATA_PANEL,
        ),
    ] = 0.05,
    block_size: Annotated[
        int,
        typer.Option(
            "--block-size",
            help="Tokens per training block (documents are packed, separated by end-of-text).",
            rich_help_panel=DATA_PANEL,
        ),
    ] = 512,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Blocks per micro-batch.", rich_help_panel=OPT_PANEL)
    ] = 8,
    grad_accum: Annotated[
        int,
        typer.Option(
            "--grad-accum", help="Micro-batches per optimizer step.", rich_help_panel=OPT_PANEL
        ),
    ] = 1,
    lr: Annotated[
        float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=OPT_PANEL)
    ] = 5e-5,
    weight_decay: Annotated[
        float,
        typer.Option(
            "--weight-decay",
            rich_help_panel=OPT_PANEL,
            help="AdamW weight decay (not on biases and LayerNorms).",
        ),
    ] = 0.01,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            "--warmup-steps",
            help="Linear warmup steps, then cosine decay to 10% of --lr. (default 5% of the steps)",
            rich_help_panel=OPT_PANEL,
            show_default=False,
        ),
    ] = None,
    epochs: EpochsOpt = 1,
    max_steps: MaxStepsOpt = None,
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (bf16/fp16 autocast on GPUs, float32 on CPU), float32, bfloat16 or float16.",
            rich_help_panel=OPT_PANEL,
        ),
    ] = "auto",
    eval_every: Annotated[
        int | None,
        typer.Option(
            "--eval-every",
            help="Evaluate, keep the best model and "
            "checkpoint every N steps. (default: 10 times per run)",
            rich_help_panel=RUN_PANEL,
            show_default=False,
        ),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed for the split and data order.", rich_help_panel=RUN_PANEL
        ),
    ] = 0,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue from a checkpoint folder (OUTPUT/checkpoint of an interrupted run).",
            rich_help_panel=RUN_PANEL,
            show_default=False,
        ),
    ] = None,
    from_scratch: Annotated[
        bool,
        typer.Option(
            "--from-scratch",
            help="Ignore MODEL's weights: start from a "
            "random init of its config.json (its tokenizer is kept).",
            rich_help_panel=RUN_PANEL,
        ),
    ] = False,
    save_dtype: Annotated[
        str,
        typer.Option(
            "--save-dtype",
            help="float32, bfloat16 or float16 for the saved weights.",
            rich_help_panel=RUN_PANEL,
        ),
    ] = "float32",
    keep_checkpoint: Annotated[
        bool,
        typer.Option(
            "--keep-checkpoint",
            help="Keep OUTPUT/checkpoint after a run that finished.",
            rich_help_panel=RUN_PANEL,
        ),
    ] = False,
    force: ForceOpt = False,
    yes: YesOpt = False,
    fmt: Annotated[
        str, typer.Option("--format", help="Summary as text or json.", rich_help_panel=RUN_PANEL)
    ] = "text",
    threads: ThreadsOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune a causal language model on your text; keeps the best model by held-out loss.

    Writes OUTPUT/config.json, model.safetensors and the tokenizer files (loadable by gptneo
    and by transformers). Ctrl-C saves OUTPUT/checkpoint; continue with --resume.
    """
    fmt = check_format(fmt)
    settings = load_settings()
    thread_count = thread_setting(settings, threads)
    check_output(output, force=force, yes=yes, resume=resume)
    from ..training import CheckpointMismatch, TrainConfig, TrainingInterrupted
    from ..training import finetune as run

    config = TrainConfig(
        block_size=block_size,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        epochs=epochs,
        max_steps=max_steps,
        eval_every=eval_every,
        val_fraction=val_fraction,
        precision=precision.strip().lower(),
        seed=seed,
        keep_checkpoint=keep_checkpoint,
    )
    config.validate()
    dtype = _save_dtype(save_dtype)
    suffixes = [s if s.startswith(".") else f".{s}" for s in include] if include else None
    folder = resolve_base(model_arg, settings.get("revision", revision))
    apply_threads(*thread_count)
    try:
        result = run(
            folder,
            data,
            output,
            config,
            val_data=val_data or None,
            suffixes=suffixes,
            from_scratch=from_scratch,
            device=settings.get("device", device),
            resume_from=resume,
            reporter=make_reporter(),
            save_dtype=dtype,
            base_name=model_arg,
        )
    except TrainingInterrupted as stop:
        typer.echo(
            f"Interrupted at step {stop.step}; continue it with --resume {stop.checkpoint}",
            err=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except CheckpointMismatch as exc:
        raise ValueError(
            f"--resume {exc.folder} was trained on different data (or another "
            "--block-size, --val-fraction or --seed): resume with the same data "
            "and options"
        ) from None
    write_summary(
        "Fine-tuning finished",
        {
            "output": str(result.output),
            "steps": result.steps,
            "best_val_loss": result.best_val_loss,
            "best_step": result.best_step,
            "final_train_loss": result.final_train_loss,
            "tokens_seen": result.tokens_seen,
            "train_time_s": round(result.train_time_s, 2),
        },
        fmt,
    )


def _save_dtype(name: str):  # type: ignore[no-untyped-def]
    import torch

    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    key = name.strip().lower()
    if key not in choices:
        raise ValueError(f"unknown --save-dtype {name!r}: use float32, bfloat16 or float16")
    return choices[key]
