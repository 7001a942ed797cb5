"""The generation options, each declared once: name, type, default, range, help, CLI flag.

Everything else is derived from `GENERATION` below, so a new option is one `Option(...)`
here plus the code that uses it (usually a rule in sampling.py):

- `GenerationConfig`: the library's dataclass, one field per option, validated by it;
- the `generate` and `chat` flags (gptneo_cli/cli/options.py builds the Typer parameters);
- the settings file and GPTNEO_* variables (settings.py), for options with `setting=True`;
- chat's `/set` and `/show`, for options with `chat=True`;
- (next) the server's request schema and the batch line format: iterate `GENERATION` and
  read each option's `kind`, `default`, `low`/`high`, `choices` and `help`, or take
  `Option.json_schema()`; `Option.check` validates a value from JSON as it does a flag's.

Nothing here imports torch, so the CLI validates every flag before the model code loads.
Errors keep the library's words (`top_p must be in (0, 1], got 0`); an `OptionError` also
carries the option, so the CLI can say the same thing with its flag (`--top-p ...`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: New tokens when neither max_new_tokens nor max_length is given.
DEFAULT_MAX_NEW_TOKENS = 100
#: The most alternatives `logprobs` may ask for per step.
MAX_LOGPROBS = 20
#: Speculative decoding: tokens drafted per step (default, most), longest n-gram looked up.
DEFAULT_DRAFT_TOKENS = 5
MAX_DRAFT_TOKENS = 32
MAX_LOOKUP_NGRAM = 16

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class OptionError(ValueError):
    """A bad option value. str() is the library's wording; `cli` the same with CLI flags."""

    def __init__(self, message: str, *, option: str | None = None, cli: str | None = None):
        super().__init__(message)
        self.option = option
        self.cli = cli or message


@dataclass(frozen=True)
class Option:
    """One generation option. `kind` is int, float, bool, str or list (of str)."""

    name: str
    kind: type
    default: Any
    help: str
    flag: str | None = ""
    """The CLI flag; "" means --name-with-dashes, None means no flag (Python only)."""
    short: str | None = None
    flag_value: Any = True
    """For a bool: the value the (valueless) flag sets, e.g. --greedy sets do_sample False."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """True: the value must be greater than `low`, not equal to it."""
    optional: bool = False
    """None is a valid value (it means "off" or "let the engine decide")."""
    choices: tuple[str, ...] = ()
    hint: str = ""
    """Added to a range error, e.g. "0 means greedy decoding"."""
    shown_default: str | None = None
    """The default as the help states it, when `default` alone would not say it."""
    setting: bool = True
    """Also a key of the settings file and a GPTNEO_* variable."""
    chat: bool = True
    """Also a `gptneo chat` flag and a /set key."""
    batch: bool = True
    """Also a `gptneo batch` flag (batch and the server run the continuous-batching
    scheduler, which does not implement every option)."""

    @property
    def cli_flag(self) -> str | None:
        if self.flag is None:
            return None
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "GPTNEO_" + self.name.upper()

    # ---- checking -----------------------------------------------------------------------

    def check(self, value: Any) -> Any:
        """The value, normalized (an int for a float option becomes a float, one stop
        string a list); raise OptionError naming the option when it is not allowed."""
        if value is None and self.optional:
            return None
        value = _KIND_CHECKS[self.kind](self, value)
        if self.kind in (int, float) and not self._in_range(value):
            raise self._error(f"must be {self.range_math()}", value, range_error=True)
        return value

    def parse(self, raw: str) -> Any:
        """A value typed as text (env var, chat /set); raises OptionError. "none" clears an
        optional option; for a list it is one item ("none" empties it)."""
        text = raw.strip()
        if self.optional and text.lower() in ("none", "null", "off"):
            return None
        if self.kind is list:
            return [] if text.lower() in ("none", "") else [raw]
        if self.kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise self._error("must be true or false", raw)
        if self.kind in (int, float):
            try:
                number = self.kind(text)
            except ValueError:
                article = "an integer" if self.kind is int else "a number"
                raise self._error(f"must be {article}", raw) from None
            return self.check(number)
        return self.check(raw)

    def _in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def _error(self, problem: str, value: Any, *, range_error: bool = False) -> OptionError:
        got = f", got {value!r}" if not isinstance(value, (int, float)) else f", got {value}"
        hint = f" ({self.hint})" if self.hint and range_error else ""
        cli_problem = f"must be {self.range_words()}" if range_error else problem
        flag = self.cli_flag or self.name
        return OptionError(
            f"{self.name} {problem}{got}{hint}",
            option=self.name,
            cli=f"{flag} {cli_problem}{got}{hint}",
        )

    # ---- describing ---------------------------------------------------------------------

    def range_math(self) -> str:
        """The range in the library's notation: `in (0, 1]`, `>= 1`."""
        low, high = _num(self.low), _num(self.high)
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}]"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"<= {high}"
        return "a number"

    def range_words(self) -> str:
        """The range in words for help and CLI errors: `more than 0, at most 1`."""
        low, high = _num(self.low), _num(self.high)
        parts = []
        if self.low is not None:
            parts.append(f"more than {low}" if self.low_open else f"at least {low}")
        if self.high is not None:
            parts.append(f"at most {high}")
        return " and ".join(parts) or "any number"

    def type_label(self) -> str:
        """What a CLI user types: INTEGER, FLOAT or TEXT, and the range in words."""
        if self.choices:
            return "|".join(self.choices)
        label = {int: "INTEGER", float: "FLOAT"}.get(self.kind, "TEXT")
        if self.kind in (int, float) and (self.low is not None or self.high is not None):
            words = self.range_words()
            if self.high is not None and self.high >= 2**62:
                words = words.split(" and ")[0]
            label += ", " + words
        return label

    def json_schema(self) -> dict[str, Any]:
        """The option as a JSON Schema property (for a request model or a batch line)."""
        kind = {bool: "boolean", int: "integer", float: "number", str: "string"}
        schema: dict[str, Any] = {"description": self.help, "default": self.default}
        if self.kind is list:
            schema.update(type="array", items={"type": "string", "minLength": 1})
        else:
            schema["type"] = [kind[self.kind], "null"] if self.optional else kind[self.kind]
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.low is not None:
            schema["exclusiveMinimum" if self.low_open else "minimum"] = self.low
        if self.high is not None:
            schema["maximum"] = self.high
        return schema

    def help_text(self) -> str:
        """The help line with its default, e.g. "Nucleus sampling mass. (default 1.0)"."""
        default = self.shown_default
        if default is None and self.kind is not list and self.default is not None:
            default = str(self.default).lower() if self.kind is bool else str(self.default)
        return f"{self.help} (default {default})" if default else self.help


def _check_bool(opt: Option, value: Any) -> bool:
    if not isinstance(value, bool):
        raise opt._error("must be true or false", value)
    return value


def _check_int(opt: Option, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise opt._error("must be a whole number", value)
    return value


def _check_float(opt: Option, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise opt._error("must be a finite number", value)
    return float(value)


def _check_str(opt: Option, value: Any) -> str:
    if not isinstance(value, str):
        raise opt._error("must be text", value)
    if opt.choices and value not in opt.choices:
        raise opt._error(f"must be {_either(opt.choices)}", value)
    return value


def _check_list(opt: Option, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise opt._error("must be a list of text", value)
    for item in value:
        if not isinstance(item, str) or not item:
            raise opt._error("must be non-empty text", item)
    return list(value)


_KIND_CHECKS: dict[type, Callable[[Option, Any], Any]] = {
    bool: _check_bool,
    int: _check_int,
    float: _check_float,
    str: _check_str,
    list: _check_list,
}


def _num(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else str(value)


def _either(choices: Iterable[str]) -> str:
    names = [repr(c) for c in choices]
    return " or ".join(names) if len(names) < 3 else ", ".join(names[:-1]) + " or " + names[-1]


# ---- the schema -------------------------------------------------------------------------

GENERATION: list[Option] = [
    Option(
        "max_new_tokens",
        int,
        None,
        "New tokens at most.",
        short="-n",
        low=1,
        optional=True,
        shown_default=str(DEFAULT_MAX_NEW_TOKENS),
    ),
    Option(
        "max_length",
        int,
        None,
        "Prompt + new tokens at most, per prompt (with "
        "max_new_tokens too, the tighter limit wins).",
        low=1,
        optional=True,
        chat=False,
    ),
    Option("min_new_tokens", int, 0, "eos cannot end the text before this many new tokens.", low=0),
    Option(
        "do_sample",
        bool,
        True,
        "Always take the most likely token (no sampling).",
        flag="--greedy",
        flag_value=False,
        shown_default="",
    ),
    Option(
        "temperature",
        float,
        0.9,
        "Sampling temperature; 0 means greedy.",
        short="-t",
        low=0,
        hint="0 means greedy decoding",
    ),
    Option(
        "top_k",
        int,
        50,
        "Keep the k most likely tokens; 0 disables.",
        low=0,
        hint="0 disables top-k",
    ),
    Option(
        "top_p",
        float,
        1.0,
        "Nucleus sampling: the smallest set of top tokens whose probability reaches p.",
        low=0,
        high=1,
        low_open=True,
    ),
    Option("min_p", float, 0.0, "Drop tokens below min_p x the top probability.", low=0, high=1),
    Option("typical_p", float, 1.0, "Locally typical sampling mass.", low=0, high=1, low_open=True),
    Option(
        "repetition_penalty",
        float,
        1.0,
        "Above 1 discourages tokens already in the context.",
        low=0,
        low_open=True,
    ),
    Option(
        "repetition_window",
        int,
        0,
        "Apply the repetition penalty to the last N tokens only; 0 means the whole context.",
        low=0,
    ),
    Option("presence_penalty", float, 0.0, "Subtracted once from every token already generated."),
    Option("frequency_penalty", float, 0.0, "Subtracted per time a token was already generated."),
    Option("no_repeat_ngram_size", int, 0, "Never repeat an n-gram of this size.", low=0),
    Option(
        "seed",
        int,
        None,
        "Sampling seed, to repeat a run exactly.",
        short="-s",
        low=0,
        high=2**63 - 1,
        optional=True,
        shown_default="",
    ),
    Option("stop", list, [], "End the text at this string (repeatable); it is not printed."),
    Option("ignore_eos", bool, False, "Keep going after the end-of-text token.", shown_default=""),
    Option(
        "num_return_sequences",
        int,
        1,
        "Samples per prompt (needs sampling).",
        low=1,
        setting=False,
        chat=False,
    ),
    Option(
        "logprobs",
        int,
        None,
        "Report each token's log-probability and the top N alternatives (JSON formats).",
        low=0,
        high=MAX_LOGPROBS,
        optional=True,
        setting=False,
        chat=False,
        shown_default="",
    ),
    Option(
        "truncate",
        str,
        "error",
        "When the prompt is too long: drop its oldest tokens (left) or stop with an error (error).",
        choices=("left", "error"),
        chat=False,
    ),
    Option(
        "prompt_lookup",
        int,
        0,
        "Speculative decoding: draft tokens copied from where the context's last N tokens "
        "(or fewer) occurred before; 0 disables.",
        low=0,
        high=MAX_LOOKUP_NGRAM,
    ),
    Option(
        "draft_model",
        str,
        None,
        "Speculative decoding: a GPT-Neo model with the same tokenizer drafts the tokens "
        "(name or folder; self-int8 = this model's own int8 copy).",
        optional=True,
        batch=False,
        shown_default="",
    ),
    Option(
        "draft_tokens",
        int,
        DEFAULT_DRAFT_TOKENS,
        "Speculative decoding: tokens drafted per step.",
        low=1,
        high=MAX_DRAFT_TOKENS,
    ),
]


def option(name: str) -> Option:
    """The option called `name` (KeyError if there is none)."""
    for opt in GENERATION:
        if opt.name == name:
            return opt
    raise KeyError(name)


def add_option(new: Option) -> None:
    """Register an option (plugins, tests) and rebuild GenerationConfig with it.

    Run it before the rest of gptneo_cli is imported: modules that already imported
    GenerationConfig keep the class they got.
    """
    if any(opt.name == new.name for opt in GENERATION):
        raise ValueError(f"option {new.name!r} exists already")
    GENERATION.append(new)
    globals()["GenerationConfig"] = _make_config_class()


# ---- GenerationConfig ---------------------------------------------------------------------


class _ConfigMethods:
    """What every GenerationConfig does besides holding the option values."""

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0  # type: ignore[attr-defined]

    @property
    def speculative(self) -> bool:
        """Whether tokens are drafted and verified (prompt lookup or a draft model)."""
        return bool(self.prompt_lookup) or self.draft_model is not None  # type: ignore[attr-defined]

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def validate(self) -> None:
        """Raise OptionError (a ValueError) naming the first invalid option."""
        for opt in GENERATION:
            object.__setattr__(self, opt.name, opt.check(getattr(self, opt.name)))
        if self.num_return_sequences > 1 and self.greedy:  # type: ignore[attr-defined]
            raise OptionError(
                "num_return_sequences > 1 needs sampling: greedy decoding would repeat the "
                "same text (set do_sample and a temperature > 0)",
                option="num_return_sequences",
                cli="--num-return-sequences above 1 needs sampling: greedy decoding would "
                "repeat the same text (drop --greedy, and use a --temperature above 0)",
            )
        if self.prompt_lookup and self.draft_model is not None:  # type: ignore[attr-defined]
            raise OptionError(
                "prompt_lookup and draft_model are two ways to draft tokens: use one",
                option="prompt_lookup",
                cli="--prompt-lookup and --draft-model are two ways to draft tokens: use one",
            )
        if self.draft_model is not None and not self.draft_model.strip():  # type: ignore[attr-defined]
            raise OptionError(
                "draft_model is empty: name a model or leave it out",
                option="draft_model",
                cli="--draft-model is empty: name a model or leave it out",
            )


def _make_config_class() -> type:
    def default(opt: Option) -> Any:
        if isinstance(opt.default, list):
            return field(default_factory=lambda value=opt.default: list(value))
        return field(default=opt.default)

    doc = [
        "Every generation option, validated on creation and on `replace`.",
        "",
        "The fields come from gptneo_cli.options.GENERATION:",
        "",
    ]
    doc += [f"- {opt.name} (default {opt.default!r}): {opt.help}" for opt in GENERATION]
    cls = dataclasses.make_dataclass(
        "GenerationConfig",
        [(opt.name, Any, default(opt)) for opt in GENERATION],
        bases=(_ConfigMethods,),
        namespace={"__doc__": "\n".join(doc), "__module__": __name__},
    )
    return cls


GenerationConfig: Any = _make_config_class()


def config_from(values: Mapping[str, Any]) -> Any:
    """A GenerationConfig from a mapping, leaving out None (= the option's default)."""
    return GenerationConfig(**{k: v for k, v in values.items() if v is not None})
