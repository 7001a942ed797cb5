"""The Typer options commands share: the model panel and the generation panel.

Nothing here imports torch; `generation_config` imports the engine when called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer

from ..settings import Settings
from .loading import ATTN_CHOICES, DEVICE_CHOICES, DTYPE_CHOICES, import_torch


def complete_from(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """Shell completion for an option with a fixed set of values."""
    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]

    return complete


def complete_model(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion for a model: bundled models, aliases and the cache's repo ids."""
    from ..catalog import model_completions

    return model_completions(incomplete)


MODEL_PANEL = "Model"

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Model: local folder, Hub id (org/name) or alias (125m, 1.3b, 2.7b; "
        "tiny = the bundled demo). (env GPTNEO_MODEL; default EleutherAI/gpt-neo-125M)",
        autocompletion=complete_model,
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
