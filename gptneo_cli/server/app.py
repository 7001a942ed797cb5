"""The HTTP API: OpenAI's completions, chat completions and models, plus health,
tokenize/detokenize, Prometheus metrics and zero-shot classify.

Thin like the CLI: requests are validated (protocol.py), turned into scheduler Requests,
and the scheduler's updates are turned into OpenAI's JSON or Server-Sent Events. The
scheduler calls back on its own thread; the callbacks only hand updates to the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..conversation import Conversation, Turn
from ..generation import GenerationResult, TokenLogprob
from ..options import DEFAULT_MAX_NEW_TOKENS
from ..scheduler import QueueFull, Scheduler, SchedulerClosed, Update
from ..scheduler import Request as Job
from . import errors
from .errors import APIError
from .metrics import Metrics
from .protocol import (
    MAX_PROMPTS,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    DetokenizeRequest,
    FieldError,
    TokenizeRequest,
    to_config,
)


@dataclass
class ServeOptions:
    """How the app behaves (the command fills it from flags and settings)."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    shutdown_timeout: float = 10.0
    user_prefix: str = "User:"
    assistant_prefix: str = "Assistant:"
    log: Callable[[str], None] | None = None
    aliases: list[str] = field(default_factory=list)
    """Other names a request's `model` may use for the served model (its repo id, alias)."""


def create_app(model: Any, tokenizer: Any, scheduler: Scheduler, options: ServeOptions) -> FastAPI:
    """The ASGI app over a started scheduler (closed when the app shuts down)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(scheduler.close, options.shutdown_timeout)

    app = FastAPI(title="gptneo", version="1", lifespan=lifespan,
                  description="OpenAI-compatible API over a local GPT-Neo model.")
    errors.install(app)
    api = _Api(model, tokenizer, scheduler, options)
    auth = [Depends(api.check_key)]

    app.get("/health", summary="200 while the server runs")(api.health)
    app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)(
        api.metrics_text)
    app.get("/v1/models", dependencies=auth)(api.models)
    app.post("/v1/completions", dependencies=auth)(api.completions)
    app.post("/v1/chat/completions", dependencies=auth)(api.chat)
    app.post("/v1/classify", dependencies=auth)(api.classify)
    app.post("/tokenize", dependencies=auth)(api.tokenize)
    app.post("/detokenize", dependencies=auth)(api.detokenize)

    wrapped: Any = app
    if options.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=options.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(_Guard, max_body=options.max_body_bytes, metrics=api.metrics,
                       log=options.log)
    return wrapped


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """Pure ASGI middleware: caps the body size (413) and logs one line per request.

    (BaseHTTPMiddleware would buffer streams and hide client disconnects.)
    """

    def __init__(self, app: Any, max_body: int, metrics: Metrics,
                 log: Callable[[str], None] | None) -> None:
        self.app, self.max_body, self.metrics, self.log = app, max_body, metrics, log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._too_large(send)
            self._done(scope, 413, start)
            return
        seen = [0]

        async def limited_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    raise _BodyTooLarge
            return message

        async def watched_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _BodyTooLarge:
            if status[0] == 0:
                await self._too_large(send)
                status[0] = 413
        except Exception as exc:  # noqa: BLE001 - answered in OpenAI's shape, no traceback
            if status[0] == 0:
                body = json.dumps(errors.error_body(
                    500, f"internal error: {type(exc).__name__}: {exc}")).encode()
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                status[0] = 500
        finally:
            self._done(scope, status[0] or 500, start)

    async def _too_large(self, send: Callable) -> None:
        body = json.dumps(errors.error_body(
            413, f"the request body is larger than {self.max_body} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _done(self, scope: dict, status: int, start: float) -> None:
        path = scope.get("path", "")
        self.metrics.request(path, status)
        if self.log is None:
            return
        state = scope.get("state") or {}
        parts = [scope.get("method", "?"), path, str(status)]
        if "tokens" in state:
            parts.append(f"{state['tokens']} tokens")
        parts.append(f"{time.perf_counter() - start:.2f}s")
        if "prompt_text" in state:
            parts.append(f"prompt={state['prompt_text']!r}")
        self.log(" ".join(parts))


def _finish(reason: str | None) -> str | None:
    return {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}.get(
        reason or "", None)


@dataclass
class _Row:
    """One choice: which prompt, its scheduler job, and what the response needs of it."""

    index: int
    prompt: int
    ids: list[int]
    job: Job
    drop_output: bool = False  # max_tokens 0 (echo only): the one generated token is dropped


class _Api:
    def __init__(self, model: Any, tokenizer: Any, scheduler: Scheduler,
                 options: ServeOptions) -> None:
        self.model, self.tokenizer, self.scheduler, self.options = (
            model, tokenizer, scheduler, options)
        self.positions = model.config.max_position_embeddings
        self.created = int(time.time())
        self.metrics = Metrics(scheduler)

    # ---- plumbing -----------------------------------------------------------------------
    async def check_key(self, request: Request) -> None:
        key = self.options.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), key.encode())
        if not ok:
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def _check_model(self, name: str | None) -> None:
        if name and name != self.options.model_name and name not in self.options.aliases:
            raise APIError(404, f"model {name!r} is not served here: this server serves "
                           f"{self.options.model_name!r}", param="model",
                           code="model_not_found")

    def _prompts(self, prompt: Any) -> list[list[int]]:
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
            ids = self.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not ids:
                start = self.tokenizer.bos_id if self.tokenizer.bos_id is not None else (
                    self.tokenizer.eos_id)
                ids = [start]
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt has token ids outside the vocabulary (0..{vocab - 1})",
                               param="prompt")
            out.append(ids)
        return out

    def _budget(self, ids: list[int], asked: int | None) -> int:
        """New tokens for a prompt; a prompt that cannot fit is a 400 before any compute."""
        room = self.positions - len(ids)
        if asked is None:
            if room < 1:
                raise APIError(400, self._too_long(len(ids), 1), param="prompt",
                               code="context_length_exceeded")
            return min(DEFAULT_MAX_NEW_TOKENS, room)
        if len(ids) + asked > self.positions:
            raise APIError(400, self._too_long(len(ids), asked), param="max_tokens",
                           code="context_length_exceeded")
        return asked

    def _too_long(self, prompt: int, new: int) -> str:
        return (f"This model's maximum context length is {self.positions} tokens. However, "
                f"you requested {prompt + new} tokens ({prompt} in the prompt, {new} for the "
                "completion). Please reduce the prompt or max_tokens.")

    def _submit(self, rows: list[_Row]) -> None:
        done: list[_Row] = []
        try:
            for row in rows:
                self.scheduler.submit(row.job)
                done.append(row)
        except QueueFull as exc:
            for row in done:
                row.job.cancel()
            raise APIError(429, str(exc), code="queue_full",
                           headers={"Retry-After": str(max(1, round(exc.retry_after)))}) from None
        except SchedulerClosed as exc:
            for row in done:
                row.job.cancel()
            raise APIError(503, str(exc), headers={"Retry-After": "5"}) from None

    def _rows(self, body: Any, prompts: list[list[int]], config: Any, *,
              prompt_logprobs: bool, queue: asyncio.Queue) -> list[_Row]:
        loop = asyncio.get_running_loop()
        rows: list[_Row] = []
        asked = body.max_tokens if "max_tokens" in body.model_fields_set else None
        if asked is None and getattr(body, "max_completion_tokens", None) is not None:
            asked = body.max_completion_tokens
        for p, ids in enumerate(prompts):
            max_new = self._budget(ids, max(asked, 1) if asked is not None else None)
            for j in range(body.n):
                index = p * body.n + j
                seed = None if config.seed is None else config.seed + j

                def on_update(update: Update, index: int = index) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, update))

                job = Job(ids, config, max_new, on_update=on_update,
                          prompt_logprobs=prompt_logprobs, seed=seed)
                rows.append(_Row(index, p, ids, job, drop_output=asked == 0))
        return rows

    async def _events(self, rows: list[_Row], queue: asyncio.Queue
                      ) -> AsyncIterator[tuple[_Row, Update]]:
        """Updates of every row as they come; cancels unfinished rows when left early."""
        by_index = {r.index: r for r in rows}
        open_rows = set(by_index)
        arrived = time.perf_counter()
        last: dict[int, float] = {}
        try:
            while open_rows:
                index, update = await queue.get()
                row = by_index[index]
                now = time.perf_counter()
                if update.token_id is not None:
                    if index in last:
                        self.metrics.inter_token.observe(now - last[index])
                    else:
                        self.metrics.ttft.observe(now - arrived)
                    last[index] = now
                if update.finish_reason is not None:
                    open_rows.discard(index)
                yield row, update
        finally:
            for index in open_rows:
                by_index[index].job.cancel()

    # ---- routes -------------------------------------------------------------------------
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def metrics_text(self) -> PlainTextResponse:
        body, content_type = self.metrics.render()
        return PlainTextResponse(body, media_type=content_type)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.options.model_name, "object": "model", "created": self.created,
            "owned_by": "gptneo", "max_model_len": self.positions,
            "context_length": self.positions,
        }]}

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self._check_model(body.model)
        text = body.prompt if body.prompt is not None else body.content
        if text is None:
            raise APIError(400, "prompt is required", param="prompt")
        tokens = self.tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.positions}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self._check_model(body.model)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"tokens must be ids in 0..{vocab - 1}", param="tokens")
        text = self.tokenizer.decode(body.tokens)
        return {"prompt": text, "content": text}

    async def classify(self, body: ClassifyRequest, request: Request) -> dict[str, Any]:
        self._check_model(body.model)
        from .. import tasks

        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts or len(texts) > MAX_PROMPTS:
            raise APIError(400, f"input must hold 1 to {MAX_PROMPTS} texts", param="input")
        template = body.template or tasks.DEFAULT_TEMPLATE
        if "{text}" not in template:
            raise APIError(400, "template must contain {text}", param="template")

        def run() -> list[Any]:
            import torch

            with torch.inference_mode():
                return tasks.zero_shot(self.model, self.tokenizer, texts, body.labels,
                                       template=template, calibrate=body.calibrate)

        try:
            future = self.scheduler.call(run)
        except SchedulerClosed as exc:
            raise APIError(503, str(exc), headers={"Retry-After": "5"}) from None
        try:
            results = await asyncio.wrap_future(future)
        except ValueError as exc:
            raise APIError(400, str(exc), param="labels") from None
        return {"object": "list", "model": self.options.model_name, "data": [
            {"index": i, **r.to_dict()} for i, r in enumerate(results)]}

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._check_model(body.model)
        config = self._config(body, body.logprobs)
        prompts = self._prompts(body.prompt)
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 is allowed with echo only", param="max_tokens")
        if self.options.log_prompts:
            request.state.prompt_text = str(body.prompt)[:200]
        queue: asyncio.Queue = asyncio.Queue()
        want_prompt_lp = body.echo and body.logprobs is not None
        rows = self._rows(body, prompts, config, prompt_logprobs=want_prompt_lp, queue=queue)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        self._submit(rows)
        if body.stream:
            return _sse(self._completion_stream(body, rows, queue, rid, request))
        async for _row, _update in self._events(rows, queue):
            pass
        choices = []
        completion_tokens = 0
        for row in rows:
            result = row.job.wait(0)
            n_out = 0 if row.drop_output else result.completion_tokens
            completion_tokens += n_out
            text = "" if row.drop_output else result.text
            if body.echo:
                text = self.tokenizer.decode(row.ids) + text
            choices.append({
                "index": row.index, "text": text,
                "logprobs": self._completion_logprobs(body, row, result),
                "finish_reason": "length" if row.drop_output else _finish(result.finish_reason),
            })
        usage = self._usage(prompts, completion_tokens)
        request.state.tokens = completion_tokens
        return {"id": rid, "object": "text_completion", "created": int(time.time()),
                "model": self.options.model_name, "choices": choices, "usage": usage}

    def _config(self, body: Any, logprobs: int | None) -> Any:
        try:
            return to_config(body, logprobs=logprobs)
        except FieldError as exc:
            raise APIError(400, str(exc), param=exc.param) from None

    def _usage(self, prompts: list[list[int]], completion: int) -> dict[str, int]:
        prompt = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _completion_logprobs(self, body: Any, row: _Row, result: GenerationResult
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
            text = item.token if item is not None and item.token else self._token_text(token_id)
            tokens.append(text)
            offsets.append(at)
            at += len(text)
            token_logprobs.append(None if item is None else item.logprob)
            if item is None:
                top_logprobs.append(None)
            else:
                top = {(a.token or self._token_text(a.token_id)): a.logprob for a in item.top}
                top.setdefault(text, item.logprob)
                top_logprobs.append(top if body.logprobs else {text: item.logprob})
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": offsets}

    async def _completion_stream(self, body: Any, rows: list[_Row], queue: asyncio.Queue,
                                 rid: str, request: Request) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())
        name = self.options.model_name

        def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None):
            return {"id": rid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish}]}

        if body.echo:
            for row in rows:
                logprobs = None
                if body.logprobs is not None:
                    await self._wait_prompt_logprobs(row)
                    prompt_only = _Row(row.index, row.prompt, row.ids, row.job, drop_output=True)
                    logprobs = self._completion_logprobs(body, prompt_only, _empty_result())
                yield chunk(row.index, self.tokenizer.decode(row.ids), logprobs)
        completion_tokens = 0
        async for row, update in self._events(rows, queue):
            if row.drop_output:
                if update.finish_reason is not None:
                    yield chunk(row.index, "", None, "length")
                continue
            if update.token_id is not None:
                completion_tokens += 1
            logprobs = None
            if body.logprobs is not None and update.logprob is not None:
                lp = update.logprob
                text = self._token_text(lp.token_id)
                top = {self._token_text(a.token_id): a.logprob for a in lp.top}
                top.setdefault(text, lp.logprob)
                logprobs = {"tokens": [text], "token_logprobs": [lp.logprob],
                            "top_logprobs": [top], "text_offset": [0]}
            finish = _finish(update.finish_reason)
            if update.text or logprobs is not None or finish is not None:
                yield chunk(row.index, update.text, logprobs, finish)
        request.state.tokens = completion_tokens
        if body.stream_options is not None and body.stream_options.include_usage:
            prompts = [r.ids for r in rows if r.index % body.n == 0]
            yield {"id": rid, "object": "text_completion", "created": created, "model": name,
                   "choices": [], "usage": self._usage(prompts, completion_tokens)}

    async def _wait_prompt_logprobs(self, row: _Row) -> Any:
        """The prompt's logprobs are set before the first token; wait for them."""
        while row.job.prompt_logprobs is None or len(row.job.prompt_logprobs) < len(row.ids):
            if row.job.done:
                break
            await asyncio.sleep(0.005)
        return row.job.prompt_logprobs

    # ---- chat ---------------------------------------------------------------------------
    def _render_chat(self, messages: list[Any]) -> str:
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
        conv = Conversation(system=system, user_prefix=self.options.user_prefix,
                            assistant_prefix=self.options.assistant_prefix, turns=turns)
        return conv.render(last)

    async def chat(self, body: ChatRequest, request: Request) -> Any:
        self._check_model(body.model)
        top = body.top_logprobs or 0
        config = self._config(body, top if body.logprobs else None)
        config = config.replace(stop=[*config.stop, self.options.user_prefix])
        prompt = self._render_chat(body.messages)
        if self.options.log_prompts:
            request.state.prompt_text = prompt[:200]
        prompts = self._prompts(prompt)
        queue: asyncio.Queue = asyncio.Queue()
        rows = self._rows(body, prompts, config, prompt_logprobs=False, queue=queue)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self._submit(rows)
        if body.stream:
            return _sse(self._chat_stream(body, rows, queue, rid, prompts, request))
        async for _row, _update in self._events(rows, queue):
            pass
        choices = []
        completion_tokens = 0
        for row in rows:
            result = row.job.wait(0)
            completion_tokens += result.completion_tokens
            choices.append({
                "index": row.index,
                "message": {"role": "assistant", "content": result.text.strip()},
                "logprobs": self._chat_logprobs(result.logprobs) if body.logprobs else None,
                "finish_reason": _finish(result.finish_reason),
            })
        request.state.tokens = completion_tokens
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": self.options.model_name, "choices": choices,
                "usage": self._usage(prompts, completion_tokens)}

    def _chat_logprobs(self, items: list[TokenLogprob] | None) -> dict[str, Any]:
        def entry(item: TokenLogprob) -> dict[str, Any]:
            text = item.token or self._token_text(item.token_id)
            return {"token": text, "logprob": item.logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(i), "top_logprobs": [entry(a) for a in i.top]}
                            for i in items or []]}

    async def _chat_stream(self, body: Any, rows: list[_Row], queue: asyncio.Queue, rid: str,
                           prompts: list[list[int]], request: Request
                           ) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())
        name = self.options.model_name

        def chunk(index: int, delta: dict[str, Any], logprobs: Any = None,
                  finish: str | None = None) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": name, "choices": [{"index": index, "delta": delta,
                                                "logprobs": logprobs, "finish_reason": finish}]}

        for row in rows:
            yield chunk(row.index, {"role": "assistant", "content": ""})
        started = {r.index: False for r in rows}
        completion_tokens = 0
        async for row, update in self._events(rows, queue):
            if update.token_id is not None:
                completion_tokens += 1
            text = update.text
            if not started[row.index]:
                text = text.lstrip()
                started[row.index] = bool(text)
            logprobs = None
            if body.logprobs and update.logprob is not None:
                logprobs = self._chat_logprobs([update.logprob])
                for item in logprobs["content"]:
                    item["token"] = item["token"] or self._token_text(update.logprob.token_id)
            finish = _finish(update.finish_reason)
            if text or logprobs is not None:
                yield chunk(row.index, {"content": text}, logprobs)
            if finish is not None:
                yield chunk(row.index, {}, None, finish)
        request.state.tokens = completion_tokens
        if body.stream_options is not None and body.stream_options.include_usage:
            yield {"id": rid, "object": "chat.completion.chunk", "created": created,
                   "model": name, "choices": [], "usage": self._usage(prompts, completion_tokens)}


def _empty_result() -> GenerationResult:
    from ..generation import Timings

    return GenerationResult(text="", token_ids=[], finish_reason="length", prompt_tokens=0,
                            completion_tokens=0, timings=Timings(), seed=None)


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-Sent Events: one `data: {json}` per chunk, then `data: [DONE]`."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
        except Exception as exc:  # noqa: BLE001 - the status is sent: report in-band
            error = errors.error_body(500, f"internal error: {type(exc).__name__}: {exc}")
            yield f"data: {json.dumps(error)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["ServeOptions", "create_app", "stderr_log", "JSONResponse"]
