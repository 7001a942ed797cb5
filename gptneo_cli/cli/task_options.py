"""What the task commands (classify, tag, answer) share: their options and loading a
checkpoint that must have a given head.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ..settings import load_settings
from .loading import LoadedModel, ModelOptions, load_model

TASK_PANEL = "Task"

FormatOpt = Annotated[
    str, typer.Option("--format", "-f", help="text, json or jsonl.", show_default=True)
]
MaxSeqLenOpt = Annotated[
    int | None,
    typer.Option(
        "--max-seq-len",
        min=2,
        rich_help_panel=TASK_PANEL,
        show_default=False,
        help="Tokens per forward pass at most (default: the model's positions).",
    ),
]
StrideOpt = Annotated[
    int,
    typer.Option(
        "--stride",
        min=0,
        rich_help_panel=TASK_PANEL,
        help="Tokens each window repeats from the one before (long inputs).",
    ),
]


def model_options(loading: dict[str, Any] | None) -> ModelOptions:
    """The Model panel's flags (see options.loading_options) merged with the settings."""
    return ModelOptions.merge(load_settings(), **(loading or {}))


def load_with_head(options: ModelOptions, head: str, hint: str | None = None) -> LoadedModel:
    """Load `head`, refusing a checkpoint without that head's weights (it would print noise)."""
    from .. import modeling
    from ..errors import WeightsError
    from ..loader import resolve
    from ..tasks import missing_head

    path = resolve(options.model, options.revision)
    missing = missing_head(path, getattr(modeling, head))
    if missing:
        kind = head.removeprefix("GPTNeoFor")
        raise WeightsError(
            f"{options.model} has no {kind} head ({', '.join(missing)} missing); "
            + (hint or f"use a checkpoint fine-tuned for {kind}")
        )
    return load_model(options, head, path=path)
