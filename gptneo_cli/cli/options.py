"""The Typer options commands share: the model panel, and the generation panel built from
the options schema (gptneo_cli/options.py) by `generation_options`.

Nothing here imports torch: every generation flag is checked before the model code loads.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from ..options import GENERATION, Option, config_from
from ..settings import Settings
from .loading import ATTN_CHOICES, DEVICE_CHOICES, DTYPE_CHOICES


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


def _model_choice(flag: str, help: str, choices: tuple[str, ...]) -> Any:
    """A Model-panel flag that takes one of `choices` (completed by the shell); no default
    shown, since the default comes from the settings."""
    return typer.Option(
        flag,
        help=help,
        autocompletion=complete_from(choices),
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    )


DeviceOpt = Annotated[
    str | None,
    _model_choice(
        "--device",
        "auto, cpu, cuda, cuda:N or mps. (env GPTNEO_DEVICE; default auto)",
        DEVICE_CHOICES,
    ),
]
DtypeOpt = Annotated[
    str | None,
    _model_choice(
        "--dtype",
        "auto, float32, bfloat16 or float16. (env GPTNEO_DTYPE; default auto)",
        DTYPE_CHOICES,
    ),
]
AttnOpt = Annotated[
    str | None,
    _model_choice(
        "--attn",
        "Attention backend: auto, eager, sdpa or flash. (env GPTNEO_ATTN; default auto)",
        ATTN_CHOICES,
    ),
]
ThreadsOpt = Annotated[
    str | None,
    typer.Option(
        "--threads",
        metavar="N|auto",
        help="CPU threads torch uses. auto: the cores other processes leave free (a core "
        "busy with another program would stall every step). (env GPTNEO_THREADS; default auto)",
        rich_help_panel=MODEL_PANEL,
        show_default=False,
    ),
]
QuantizeOpt = Annotated[
    str | None,
    _model_choice(
        "--quantize",
        "Quantize the weights when loading: int8 (weight-only, per-channel scales; "
        "~4x less memory, faster on CPU) or int8-dynamic (also quantizes activations: "
        "faster still on CPU, a little less exact). (default none)",
        ("none", "int8", "int8-dynamic"),
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


def max_running_option(panel: str) -> Any:
    """--max-running of the commands that run the scheduler (batch, serve), in their panel."""
    return typer.Option(
        "--max-running",
        min=1,
        max=1024,
        rich_help_panel=panel,
        help="Sequences decoded together (continuous batching).",
    )


GEN_PANEL = "Generation"


def generation_options(command: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one flag per option of gptneo_cli.options.GENERATION.

    The command declares a `generation` parameter instead of one per option; it receives
    {option name: the flag's value, or None when the flag was not given}. `chat` gets the
    options marked chat=True. A new option in the schema is a new flag here, with no edit.
    """
    opts = [o for o in GENERATION if o.cli_flag and _offered(o, command)]
    by_name = {o.name: o for o in opts}
    return _expand(
        "generation",
        [_parameter(o) for o in opts],
        lambda name, value: _flag_value(by_name[name], value),
    )


def loading_options(
    *, quantize: bool = False, compile: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the Model panel: --model, --revision, --device, --dtype, --attn,
    --quantize / --compile where it loads the fast model, and --threads.

    The command declares a `loading` parameter where the panel goes; it receives the flags'
    values by ModelOptions.merge's keyword names (None when not given), so a new loading
    flag is one edit here and in ModelOptions, not one per command.
    """
    flags: list[tuple[str, Any, Any]] = [
        ("model", ModelOpt, None),
        ("revision", RevisionOpt, None),
        ("device", DeviceOpt, None),
        ("dtype", DtypeOpt, None),
        ("attn", AttnOpt, None),
    ]
    if quantize:
        flags.append(("quantize", QuantizeOpt, None))
    if compile:
        flags.append(("compile", CompileOpt, False))
    flags.append(("threads", ThreadsOpt, None))
    params = [
        inspect.Parameter(
            name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=hint
        )
        for name, hint, default in flags
    ]
    return _expand("loading", params, lambda name, value: value)


def _expand(
    placeholder: str, params: list[inspect.Parameter], convert: Callable[[str, Any], Any]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Put `params` in the place of the command's `placeholder` parameter (so the help keeps
    the order the command declares); the command receives {name: convert(name, value)}."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(func, eval_str=True)
        own = list(signature.parameters.values())
        at = [p.name for p in own].index(placeholder)
        own[at : at + 1] = params

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {p.name: convert(p.name, kwargs.pop(p.name, p.default)) for p in params}
            return func(*args, **{placeholder: given}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own}
        return wrapper

    return decorate


def _offered(opt: Option, command: str) -> bool:
    """Whether `command` has a flag for `opt` (chat and batch take a subset)."""
    return (command != "chat" or opt.chat) and (command != "batch" or opt.batch)


def _parameter(opt: Option) -> inspect.Parameter:
    """The Typer parameter of one option: a valueless flag for a bool, else a typed value."""
    names = [opt.cli_flag] + ([opt.short] if opt.short else [])
    common: dict[str, Any] = dict(help=opt.help_text(), rich_help_panel=GEN_PANEL)
    if opt.kind is bool:
        annotation: Any = Annotated[bool, typer.Option(*names, **common)]
        default: Any = False
    else:
        kind = {int: int, float: float}.get(opt.kind, str)
        hint = list[str] if opt.kind is list else kind
        extra: dict[str, Any] = {"metavar": opt.type_label(), "show_default": False}
        if opt.choices:
            extra["autocompletion"] = complete_from(opt.choices)
        annotation = Annotated[hint | None, typer.Option(*names, **common, **extra)]
        default = None
    return inspect.Parameter(
        opt.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation
    )


def _flag_value(opt: Option, value: Any) -> Any:
    if opt.kind is bool:
        return opt.flag_value if value else None
    if opt.kind is list:
        return list(value) if value else None
    if isinstance(value, str) and opt.choices:
        return value.strip().lower()
    return value


def generation_config(settings: Settings, given: dict[str, Any], *, command: str = "") -> Any:
    """A validated GenerationConfig: flags > env > config file > the options' defaults.

    No torch: this runs before the model code is imported. A bad flag raises OptionError,
    whose `cli` wording (printed by the CLI) names the flag; settings were checked when
    they were read, with their file or variable named.
    """
    values: dict[str, Any] = {}
    for opt in GENERATION:
        if command == "chat" and not opt.chat:
            continue
        value = given.get(opt.name)
        if value is not None:
            values[opt.name] = opt.check(value)
        elif opt.setting:
            values[opt.name] = settings.get(opt.name)
    return config_from(values)
