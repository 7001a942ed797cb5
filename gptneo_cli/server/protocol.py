"""The OpenAI-shaped request bodies, with the sampling fields derived from the one options
schema (types, ranges, defaults and help come from there, not from a copy here).

OpenAI's names map onto ours (`max_tokens` -> max_new_tokens, `min_tokens` ->
min_new_tokens); vLLM's extras (`top_k`, `min_p`, `typical_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`) are accepted in the body the same way. The semantic checks run
once more in GenerationConfig, whose errors name our option; `to_config` maps them back.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model, field_validator

from ..options import (
    MAX_DRAFT_TOKENS,
    MAX_LOGPROBS,
    MAX_LOOKUP_NGRAM,
    GenerationConfig,
    Option,
    OptionError,
    option,
)

#: The most choices (`n`) one request may ask for, and prompts in one request.
MAX_N = 16
MAX_PROMPTS = 64

#: API field -> option name, for the sampling fields both endpoints share.
SHARED = {
    "max_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens",
    "ignore_eos": "ignore_eos",
}

#: Speculative decoding's fields (same names as the options): a request's own value, else
#: the server's default (`gptneo serve --prompt-lookup N | --draft-model NAME`,
#: `--draft-tokens K`). The first two are the ways to draft: a request that names either
#: drafts its own way (prompt_lookup 0: not at all).
DRAFTING = ("prompt_lookup", "draft_model", "draft_tokens")
_METHODS = ("prompt_lookup", "draft_model")


def _field(api_name: str, spec: Option) -> tuple[Any, Any]:
    """A pydantic (type, Field) for one option."""
    kind: Any = spec.kind
    default = spec.default
    if api_name == "max_tokens":
        low: float | None = 0  # OpenAI allows 0 with echo: score the prompt only
    else:
        low = spec.low
    bounds: dict[str, Any] = {}
    if kind in (int, float):
        if low is not None:
            bounds["gt" if spec.low_open and api_name != "max_tokens" else "ge"] = low
        if spec.high is not None:
            bounds["le"] = spec.high
    if spec.optional or default is None:
        kind = kind | None
    return kind, Field(default, description=spec.help, **bounds)


def _sampling_fields() -> dict[str, Any]:
    """One pydantic field per shared option, read from gptneo_cli.options.GENERATION."""
    return {api: _field(api, option(opt)) for api, opt in SHARED.items()}


def _valid_text(value: Any) -> Any:
    """Refuse text that cannot be UTF-8: JSON's "\\ud800" escapes decode to lone surrogates,
    which the tokenizer cannot take (a 400 naming the field, not a failure deep inside)."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "text must be valid Unicode: it holds a lone surrogate (e.g. \\ud800)"
                ) from None
    elif isinstance(value, list):
        for item in value:
            _valid_text(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_text(key)
            _valid_text(item)
    return value


class _Body(BaseModel):
    """A request body: unknown fields are ignored (as OpenAI's clients send many), every
    text must be valid Unicode."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="after")
    @classmethod
    def _unicode(cls, value: Any) -> Any:
        return _valid_text(value)


class StreamOptions(_Body):
    include_usage: bool = False


class _Base(_Body):
    model: str | None = Field(None, description="The served model's id (optional).")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices per prompt.")
    stop: str | list[str] | None = Field(None, description="Strings that end the text.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Speculative decoding, per row of the scheduler (draft_model: the one the server loaded).
    prompt_lookup: StrictInt | None = Field(
        None, ge=0, le=MAX_LOOKUP_NGRAM, description=option("prompt_lookup").help
    )
    draft_tokens: StrictInt | None = Field(
        None, ge=1, le=MAX_DRAFT_TOKENS, description=option("draft_tokens").help
    )
    draft_model: str | None = Field(
        None,
        description="Speculative decoding with the server's draft model (gptneo serve "
        "--draft-model): only the name it was started with.",
    )


#: Token ids are strict ints: JSON true must not become token 1 (found by schemathesis).
PromptType = str | list[str] | list[StrictInt] | list[list[StrictInt]]

CompletionRequest = create_model(
    "CompletionRequest",
    __base__=_Base,
    prompt=(PromptType, Field(..., description="Text, texts, token ids or lists of them.")),
    echo=(
        bool,
        Field(
            False,
            description="Return the prompt before the completion (with "
            "logprobs: the prompt tokens' too, the first null).",
        ),
    ),
    logprobs=(
        int | None,
        Field(None, ge=0, le=MAX_LOGPROBS, description="Top alternatives per token."),
    ),
    **_sampling_fields(),
)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if isinstance(p, dict))
        return self.content or ""


ChatRequest = create_model(
    "ChatCompletionRequest",
    __base__=_Base,
    messages=(list[ChatMessage], Field(..., min_length=1)),
    logprobs=(bool, Field(False, description="Return the chosen tokens' log-probabilities.")),
    top_logprobs=(int | None, Field(None, ge=0, le=MAX_LOGPROBS)),
    max_completion_tokens=(int | None, Field(None, ge=1, description="Alias of max_tokens.")),
    **_sampling_fields(),
)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    content: str | None = Field(None, description="llama.cpp's name for prompt.")


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[StrictInt]


class ClassifyRequest(_Body):
    model: str | None = None
    input: str | list[str] = Field(..., description="One text or several.")
    labels: list[str] | None = Field(
        None,
        min_length=1,
        description="The candidate labels (zero-shot: required; a classification "
        "checkpoint answers with its own labels, and a list given must name them).",
    )
    template: str | None = Field(None, description="Zero-shot prompt with {text}.")
    calibrate: bool = Field(True, description="Zero-shot: subtract an empty text's scores.")


class ErrorDetail(BaseModel):
    message: str = Field(..., description="One line saying what is wrong.")
    type: str = Field(..., description="e.g. invalid_request_error, authentication_error.")
    param: str | None = Field(None, description="The request field at fault, if one is.")
    code: str | None = Field(None, description="e.g. context_length_exceeded, queue_full.")


class ErrorResponse(BaseModel):
    """Every failure's body, in OpenAI's shape."""

    error: ErrorDetail


def to_config(
    body: BaseModel, *, logprobs: int | None, drafting: dict[str, Any] | None = None
) -> GenerationConfig:
    """The request's GenerationConfig; ValueError names the API field on a bad value.
    `drafting`: the server's prompt_lookup / draft_tokens, for the fields a request leaves
    out (prompt_lookup 0 in a request turns the server's lookup off for it)."""
    values = _drafting_values(body, drafting or {})
    for api, opt in SHARED.items():
        if api in body.model_fields_set:
            value = getattr(body, api, None)
            if api == "max_tokens" and value == 0:
                value = 1  # echo-only scoring: one token is generated and dropped
            values[opt] = value
    if getattr(body, "max_completion_tokens", None) is not None and "max_tokens" not in (
        body.model_fields_set
    ):
        values["max_new_tokens"] = body.max_completion_tokens
    stop = body.stop
    values["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
    values["logprobs"] = logprobs
    values = {
        k: v
        for k, v in values.items()
        if v is not None or k in ("seed", "logprobs", "max_new_tokens")
    }
    try:
        return GenerationConfig(**values)
    except OptionError as exc:
        names = {**SHARED, **{name: name for name in DRAFTING}}
        api = next((a for a, o in names.items() if o == exc.option), None)
        message = str(exc)
        if api is not None and exc.option is not None and message.startswith(exc.option):
            message = api + message[len(exc.option) :]
        raise FieldError(api, message) from None
    except ValueError as exc:
        raise FieldError(None, str(exc)) from None


def _drafting_values(body: BaseModel, drafting: dict[str, Any]) -> dict[str, Any]:
    """prompt_lookup / draft_model / draft_tokens: the request's, else the server's. A draft
    model other than the one loaded is a 400 (models are loaded at start, not per request)."""
    asked, served = getattr(body, "draft_model", None), drafting.get("draft_model")
    if asked is not None and asked != served:
        raise FieldError(
            "draft_model",
            f"draft_model: this server drafts with {served!r} only (gptneo serve "
            "--draft-model); prompt_lookup drafts without a model"
            if served
            else "draft_model: no draft model is loaded here (gptneo serve --draft-model "
            "NAME loads one; batch files cannot use one); prompt_lookup drafts without one",
        )
    own = any(getattr(body, name, None) is not None for name in _METHODS)
    values: dict[str, Any] = {}
    for name in DRAFTING:
        value = getattr(body, name, None)
        if value is None and not (own and name in _METHODS):
            value = drafting.get(name)
        values[name] = value
    return {k: v for k, v in values.items() if v is not None}


class FieldError(ValueError):
    """A bad request field: the message, and the field it names (OpenAI's `param`)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param
