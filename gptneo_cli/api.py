"""OpenAI-shaped requests without HTTP: validate a body, turn it into scheduler jobs, and
build the response body from their results.

The one code path that both `gptneo serve` (gptneo_cli.server) and `gptneo batch`
(gptneo_cli.batch) run for /v1/completions, /v1/chat/completions and /v1/classify, so a
body means the same in a batch file as over HTTP. No fastapi here (batch does not need
it); the server maps `APIError` to its JSON error answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from .conversation import ChatTemplate
from .generation import GenerationResult, TokenLogprob, prompt_ids
from .options import DEFAULT_MAX_NEW_TOKENS
from .scheduler import Request as Job
from .scheduler import Scheduler, Update
from .server.protocol import (
    MAX_PROMPTS,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    FieldError,
    to_config,
)

#: The endpoints a body can be sent to, and their request schema.
SCHEMAS: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatRequest,
    "/v1/classify": ClassifyRequest,
}


class APIError(Exception):
    """A failed request: its HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    503: "service_unavailable",
}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """A failure in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


_TYPE_NAMES = ("str", "int", "list[str]", "list[int]", "list[list[int]]", "float", "bool", "none")


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One line naming the first bad field, e.g. "temperature: Input should be ..."."""
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members add their type names to the location; keep the field path only.
    path = []
    for part in loc:
        if part in _TYPE_NAMES or part.startswith(("list[", "function-", "literal[")):
            break
        path.append(part)
    param = ".".join(path) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if first.get("type") == "missing":
        if param is None:
            return "the request body is missing: send a JSON object", None
        return f"{param} is required", param
    message = str(first.get("msg", "is not valid")).removeprefix("Value error, ")
    return (f"{param}: {message}" if param else message), param


def parse_body(url: str, body: Any) -> BaseModel:
    """The validated request model of `body` sent to `url` (APIError 400/404 otherwise)."""
    schema = SCHEMAS.get(url)
    if schema is None:
        raise APIError(404, f"no route POST {url}: use one of {', '.join(SCHEMAS)}", param="url")
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", param="body")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise APIError(400, message, param=param) from None


def finish_name(reason: str | None) -> str | None:
    """Our finish reasons in OpenAI's words."""
    return {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}.get(
        reason or "", None
    )


@dataclass
class Row:
    """One choice: which prompt, its scheduler job, and what the response needs of it."""

    index: int
    prompt: int
    ids: list[int]
    job: Job
    drop_output: bool = False  # max_tokens 0 (echo only): the one generated token is dropped


def make_scheduler(
    model: Any, tokenizer: Any, *, max_running: int, max_queue: int, **options: Any
) -> Scheduler:
    """The scheduler that runs a served model's work. A sequence classifier never decodes
    (its requests run through `Scheduler.call`), so it gets one KV-cache row, not
    `max_running`."""
    from .tasks import is_sequence_classifier

    rows = 1 if is_sequence_classifier(model) else max_running
    return Scheduler(model, tokenizer, max_running=rows, max_queue=max_queue, **options)


#: Given a row's index, the callback its job reports updates to (or None).
UpdateHook = Callable[[int], Callable[[Update], None] | None]


class Endpoints:
    """Checks and builds requests for one loaded model (shared by the server and batch)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str,
        aliases: Sequence[str] = (),
        chat_template: ChatTemplate | None = None,
        drafting: dict[str, Any] | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        #: The server's prompt_lookup / draft_tokens, for the fields a request leaves out.
        self.drafting = dict(drafting or {})
        self.model_name, self.aliases = model_name, list(aliases)
        #: How /v1/chat/completions lays out messages: the `gptneo chat` turn template.
        self.template = chat_template or ChatTemplate()
        self.positions = model.config.max_position_embeddings
        from .tasks import is_sequence_classifier

        #: False for a sequence-classification checkpoint: it answers /v1/classify only.
        self.generates = not is_sequence_classifier(model)

    # ---- checks -------------------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name and name != self.model_name and name not in self.aliases:
            raise APIError(
                404,
                f"model {name!r} is not served here: this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_generates(self) -> None:
        """A 400 for completions and chat on a model that has no language-model head."""
        if not self.generates:
            raise APIError(
                400,
                f"{self.model_name} is a sequence-classification checkpoint: it has no "
                "language-model head to generate text with; use POST /v1/classify",
                param="model",
                code="model_not_generative",
            )

    def prompts(self, prompt: Any) -> list[list[int]]:
        """The prompt field as token-id lists (text is encoded; empty text is bos)."""
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt is empty", param="prompt")
        if len(items) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        out = []
        vocab = self.model.config.vocab_size
        for item in items:
            try:
                ids = prompt_ids(self.tokenizer, item, vocab)
            except ValueError as exc:
                raise APIError(400, f"prompt: {exc}", param="prompt") from None
            out.append(ids)
        return out

    def budget(self, ids: list[int], asked: int | None) -> int:
        """New tokens for a prompt; a prompt that cannot fit is a 400 before any compute."""
        room = self.positions - len(ids)
        if asked is None:
            if room < 1:
                raise APIError(
                    400, self.too_long(len(ids), 1), param="prompt", code="context_length_exceeded"
                )
            return min(DEFAULT_MAX_NEW_TOKENS, room)
        if len(ids) + asked > self.positions:
            raise APIError(
                400,
                self.too_long(len(ids), asked),
                param="max_tokens",
                code="context_length_exceeded",
            )
        return asked

    def too_long(self, prompt: int, new: int) -> str:
        return (
            f"This model's maximum context length is {self.positions} tokens. However, "
            f"you requested {prompt + new} tokens ({prompt} in the prompt, {new} for the "
            "completion). Please reduce the prompt or max_tokens."
        )

    def config(self, body: Any, logprobs: int | None) -> Any:
        try:
            return to_config(body, logprobs=logprobs, drafting=self.drafting)
        except FieldError as exc:
            raise APIError(400, str(exc), param=exc.param) from None

    def render_chat(self, messages: list[Any]) -> str:
        """The conversation as one prompt, rendered as `gptneo chat` renders it (one
        renderer: gptneo_cli.conversation) with the served chat template; the template's
        system text applies when the messages bring none."""
        from .conversation import Turn

        system = "\n".join(m.text() for m in messages if m.role in ("system", "developer"))
        talk = [m for m in messages if m.role not in ("system", "developer")]
        if not talk or talk[-1].role != "user":
            raise APIError(400, "messages must end with a user message", param="messages")
        turns: list[Turn] = []
        user: list[str] = []
        for m in talk[:-1]:
            if m.role == "user":
                user.append(m.text())
            else:
                turns.append(Turn("\n".join(user), m.text()))
                user = []
        last = "\n".join([*user, talk[-1].text()])
        has_system = any(m.role in ("system", "developer") for m in messages)
        conv = self.template.conversation(system if has_system else None, turns)
        return conv.render(last)

    # ---- jobs ---------------------------------------------------------------------------
    def completion_jobs(
        self, body: Any, hook: UpdateHook | None = None
    ) -> tuple[list[list[int]], list[Row]]:
        """(prompt ids, one row per choice) of a validated completion body."""
        self.check_model(body.model)
        self.check_generates()
        config = self.config(body, body.logprobs)
        prompts = self.prompts(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 is allowed with echo only", param="max_tokens")
        want_prompt_lp = body.echo and body.logprobs is not None
        return prompts, self.rows(body, prompts, config, prompt_logprobs=want_prompt_lp, hook=hook)

    def chat_jobs(
        self, body: Any, hook: UpdateHook | None = None
    ) -> tuple[list[list[int]], list[Row], str]:
        """(prompt ids, rows, the rendered prompt) of a validated chat body."""
        self.check_model(body.model)
        self.check_generates()
        top = body.top_logprobs or 0
        config = self.config(body, top if body.logprobs else None)
        config = config.replace(stop=[*config.stop, *self.template.conversation().stops()])
        prompt = self.render_chat(body.messages)
        prompts = self.prompts(prompt)
        return prompts, self.rows(body, prompts, config, prompt_logprobs=False, hook=hook), prompt

    def rows(
        self,
        body: Any,
        prompts: list[list[int]],
        config: Any,
        *,
        prompt_logprobs: bool,
        hook: UpdateHook | None = None,
    ) -> list[Row]:
        rows: list[Row] = []
        asked = body.max_tokens if "max_tokens" in body.model_fields_set else None
        if asked is None and getattr(body, "max_completion_tokens", None) is not None:
            asked = body.max_completion_tokens
        for p, ids in enumerate(prompts):
            max_new = self.budget(ids, max(asked, 1) if asked is not None else None)
            for j in range(body.n):
                index = p * body.n + j
                seed = None if config.seed is None else config.seed + j
                job = Job(
                    ids,
                    config,
                    max_new,
                    on_update=hook(index) if hook else None,
                    prompt_logprobs=prompt_logprobs,
                    seed=seed,
                )
                rows.append(Row(index, p, ids, job, drop_output=asked == 0))
        return rows

    def classify_inputs(self, body: Any) -> tuple[list[str], str]:
        """(texts, template) of a validated classify body, checked before any compute."""
        from .tasks import DEFAULT_TEMPLATE, check_labels

        self.check_model(body.model)
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or len(texts) > MAX_PROMPTS:
            raise APIError(400, f"input must hold 1 to {MAX_PROMPTS} texts", param="input")
        try:
            check_labels(self.model, body.labels)
        except ValueError as exc:
            raise APIError(400, str(exc), param="labels") from None
        if not self.generates and any(not text for text in texts):
            raise APIError(400, "input holds an empty text: nothing to classify", param="input")
        template = body.template or DEFAULT_TEMPLATE
        if self.generates and "{text}" not in template:
            raise APIError(400, "template must contain {text}", param="template")
        return texts, template

    def classify_call(self, body: Any) -> Callable[[], list[Any]]:
        """The model work of a classify body, to run on the scheduler's thread: the
        checkpoint's classification head, or zero-shot among `labels` (as `gptneo classify`)."""
        texts, template = self.classify_inputs(body)

        def run() -> list[Any]:
            import torch

            from . import tasks

            with torch.inference_mode():
                return tasks.classify_texts(
                    self.model,
                    self.tokenizer,
                    texts,
                    body.labels,
                    template=template,
                    calibrate=body.calibrate,
                )

        return run

    # ---- response bodies ----------------------------------------------------------------
    def usage(self, prompts: list[list[int]], completion: int) -> dict[str, int]:
        prompt = sum(len(p) for p in prompts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def completion_body(
        self, body: Any, prompts: list[list[int]], rows: list[Row], rid: str
    ) -> dict[str, Any]:
        """The /v1/completions answer once every row is done."""

        def choice(row: Row, result: Any) -> tuple[dict[str, Any], int]:
            text = "" if row.drop_output else result.text
            if body.echo:
                text = self.tokenizer.decode(row.ids) + text
            entry = {
                "index": row.index,
                "text": text,
                "logprobs": self.completion_logprobs(body, row, result),
                "finish_reason": "length" if row.drop_output else finish_name(result.finish_reason),
            }
            return entry, 0 if row.drop_output else result.completion_tokens

        return self._answer(rid, "text_completion", prompts, rows, choice)

    def chat_body(
        self, body: Any, prompts: list[list[int]], rows: list[Row], rid: str
    ) -> dict[str, Any]:
        """The /v1/chat/completions answer once every row is done."""

        def choice(row: Row, result: Any) -> tuple[dict[str, Any], int]:
            entry = {
                "index": row.index,
                "message": {"role": "assistant", "content": result.text.strip()},
                "logprobs": self.chat_logprobs(result.logprobs) if body.logprobs else None,
                "finish_reason": finish_name(result.finish_reason),
            }
            return entry, result.completion_tokens

        return self._answer(rid, "chat.completion", prompts, rows, choice)

    def _answer(
        self,
        rid: str,
        kind: str,
        prompts: list[list[int]],
        rows: list[Row],
        choice: Callable[[Row, Any], tuple[dict[str, Any], int]],
    ) -> dict[str, Any]:
        """A finished response: `choice(row, result)` gives each row's entry and the tokens
        it counts toward usage."""
        choices = []
        completion_tokens = 0
        for row in rows:
            entry, tokens = choice(row, row.job.wait(0))
            choices.append(entry)
            completion_tokens += tokens
        return {
            "id": rid,
            "object": kind,
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": self.usage(prompts, completion_tokens),
        }

    def classify_body(self, results: list[Any]) -> dict[str, Any]:
        return {
            "object": "list",
            "model": self.model_name,
            "data": [{"index": i, **r.to_dict()} for i, r in enumerate(results)],
        }

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion_logprobs(
        self, body: Any, row: Row, result: GenerationResult
    ) -> dict[str, Any] | None:
        if body.logprobs is None:
            return None
        items: list[TokenLogprob | None] = []
        if body.echo:
            items.extend(row.job.prompt_logprobs or [None] * len(row.ids))
        if not row.drop_output:
            items.extend(result.logprobs or [])
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        at = 0
        for i, item in enumerate(items):
            token_id = item.token_id if item is not None else row.ids[0] if i == 0 else 0
            text = item.token if item is not None and item.token else self.token_text(token_id)
            tokens.append(text)
            offsets.append(at)
            at += len(text)
            token_logprobs.append(None if item is None else item.logprob)
            if item is None:
                top_logprobs.append(None)
            else:
                top = {(a.token or self.token_text(a.token_id)): a.logprob for a in item.top}
                top.setdefault(text, item.logprob)
                top_logprobs.append(top if body.logprobs else {text: item.logprob})
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }

    def chat_logprobs(self, items: list[TokenLogprob] | None) -> dict[str, Any]:
        def entry(item: TokenLogprob) -> dict[str, Any]:
            text = item.token or self.token_text(item.token_id)
            return {"token": text, "logprob": item.logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {**entry(i), "top_logprobs": [entry(a) for a in i.top]} for i in items or []
            ]
        }
