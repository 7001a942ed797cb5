"""The HTTP API: OpenAI's completions, chat completions and models, plus health,
tokenize/detokenize, Prometheus metrics and zero-shot classify.

Thin like the CLI: requests are validated and turned into scheduler Requests by
gptneo_cli.api (the code `gptneo batch` runs too), and the scheduler's updates are turned
into OpenAI's JSON or Server-Sent Events. The scheduler calls back on its own thread; the
callbacks only hand updates to the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..api import Endpoints, Row, finish_name
from ..conversation import ChatTemplate
from ..generation import GenerationResult
from ..scheduler import QueueFull, Scheduler, SchedulerClosed, Update
from . import errors, openapi
from .errors import APIError
from .metrics import Metrics
from .protocol import (
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
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
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)
    """How /v1/chat/completions renders messages (the `gptneo chat` turn template)."""
    log: Callable[[str], None] | None = None
    aliases: list[str] = field(default_factory=list)
    """Other names a request's `model` may use for the served model (its repo id, alias)."""
    drafting: dict[str, Any] = field(default_factory=dict)
    """prompt_lookup / draft_tokens for the fields a request leaves out (`--prompt-lookup`)."""


def create_app(model: Any, tokenizer: Any, scheduler: Scheduler, options: ServeOptions) -> FastAPI:
    """The ASGI app over a started scheduler (closed when the app shuts down)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(scheduler.close, options.shutdown_timeout)

    app = FastAPI(
        title="gptneo",
        version="1",
        lifespan=lifespan,
        description="OpenAI-compatible API over a local GPT-Neo model.",
    )
    errors.install(app)
    openapi.install(app)
    api = _Api(model, tokenizer, scheduler, options)
    # With a key, the routes need it (and the schema says so); /health and /metrics never.
    auth = [Depends(api.check_key)] if options.api_key else []
    key = (401,) if options.api_key else ()

    def post(path: str, handler: Any, *codes: int, stream: bool = False) -> None:
        responses = {**(openapi.streams() if stream else {}), **openapi.errors(*key, *codes)}
        app.post(path, dependencies=auth, responses=responses)(handler)

    app.get("/health", summary="200 while the server runs")(api.health)
    app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)(
        api.metrics_text
    )
    app.get("/v1/models", dependencies=auth, responses=openapi.errors(*key))(api.models)
    post("/v1/completions", api.completions, 400, 404, 413, 429, 503, stream=True)
    post("/v1/chat/completions", api.chat, 400, 404, 413, 429, 503, stream=True)
    post("/v1/classify", api.classify, 400, 404, 413, 503)
    post("/tokenize", api.tokenize, 400, 404, 413)
    post("/detokenize", api.detokenize, 400, 404, 413)

    wrapped: Any = app
    if options.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=options.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(
        _Guard, max_body=options.max_body_bytes, metrics=api.metrics, log=options.log
    )
    return wrapped


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """Pure ASGI middleware: caps the body size (413) and logs one line per request.

    (BaseHTTPMiddleware would buffer streams and hide client disconnects.)
    """

    def __init__(
        self, app: Any, max_body: int, metrics: Metrics, log: Callable[[str], None] | None
    ) -> None:
        self.app, self.max_body, self.metrics, self.log = app, max_body, metrics, log

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._too_large(send)
            self._done(scope, 413, start)
            return
        status = [0]
        over = [False]  # a body without content-length grew past the cap
        try:
            await self.app(scope, self._limited(receive, over), self._watched(send, status, over))
        except _BodyTooLarge:
            if status[0] == 0:
                await self._too_large(send)
                status[0] = 413
        except Exception as exc:  # noqa: BLE001 - answered in OpenAI's shape, no traceback
            if status[0] == 0:
                await self._internal_error(send, exc)
                status[0] = 500
        finally:
            self._done(scope, status[0] or 500, start)

    def _limited(self, receive: Callable, over: list[bool]) -> Callable:
        """receive() that stops a body growing past the cap (a missing content-length)."""
        seen = [0]

        async def limited_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    over[0] = True
                    raise _BodyTooLarge
            return message

        return limited_receive

    def _watched(self, send: Callable, status: list[int], over: list[bool]) -> Callable:
        """send() that records the response status for the log line. Once the body went
        past the cap, the app's answer (FastAPI turns the failed read into a 400) is
        replaced by the 413."""

        async def watched_send(message: dict) -> None:
            if over[0]:
                if message["type"] == "http.response.start" and status[0] == 0:
                    status[0] = 413
                    await self._too_large(send)
                return
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        return watched_send

    @staticmethod
    async def _internal_error(send: Callable, exc: Exception) -> None:
        await _send_error(send, 500, f"internal error: {type(exc).__name__}: {exc}")

    async def _too_large(self, send: Callable) -> None:
        await _send_error(send, 413, f"the request body is larger than {self.max_body} bytes")

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


#: The key as the schema shows it (an "Authorize" button in /docs); checked by check_key.
_BEARER = HTTPBearer(auto_error=False, description="The server's --api-key.")
_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]


async def _send_error(send: Callable, status: int, message: str) -> None:
    """An OpenAI-style JSON error straight on the ASGI channel (no route ran: the body
    was too large, or the app failed before answering)."""
    body = json.dumps(errors.error_body(status, message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Api:
    def __init__(
        self, model: Any, tokenizer: Any, scheduler: Scheduler, options: ServeOptions
    ) -> None:
        self.model, self.tokenizer, self.scheduler, self.options = (
            model,
            tokenizer,
            scheduler,
            options,
        )
        self.positions = model.config.max_position_embeddings
        self.created = int(time.time())
        self.metrics = Metrics(scheduler)
        self.ep = Endpoints(
            model,
            tokenizer,
            model_name=options.model_name,
            aliases=options.aliases,
            chat_template=options.chat_template,
            drafting=options.drafting,
        )

    # ---- plumbing -----------------------------------------------------------------------
    async def check_key(self, credentials: _Credentials = None) -> None:
        """Authorization: Bearer KEY, compared in constant time."""
        key = self.options.api_key
        if not key:
            return
        token = credentials.credentials.strip() if credentials is not None else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send Authorization: Bearer KEY",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _submit(self, rows: list[Row]) -> None:
        done: list[Row] = []
        try:
            for row in rows:
                self.scheduler.submit(row.job)
                done.append(row)
        except QueueFull as exc:
            for row in done:
                row.job.cancel()
            raise APIError(
                429,
                str(exc),
                code="queue_full",
                headers={"Retry-After": str(max(1, round(exc.retry_after)))},
            ) from None
        except SchedulerClosed as exc:
            for row in done:
                row.job.cancel()
            raise APIError(503, str(exc), headers={"Retry-After": "5"}) from None

    async def _events(
        self, rows: list[Row], queue: asyncio.Queue
    ) -> AsyncIterator[tuple[Row, Update]]:
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
        return {
            "object": "list",
            "data": [
                {
                    "id": self.options.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "gptneo",
                    "max_model_len": self.positions,
                    "context_length": self.positions,
                }
            ],
        }

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        self.ep.check_model(body.model)
        text = body.prompt if body.prompt is not None else body.content
        if text is None:
            raise APIError(400, "prompt is required", param="prompt")
        tokens = self.tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.positions}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        self.ep.check_model(body.model)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"tokens must be ids in 0..{vocab - 1}", param="tokens")
        text = self.tokenizer.decode(body.tokens)
        return {"prompt": text, "content": text}

    async def classify(self, body: ClassifyRequest, request: Request) -> dict[str, Any]:
        run = self.ep.classify_call(body)
        try:
            future = self.scheduler.call(run)
        except SchedulerClosed as exc:
            raise APIError(503, str(exc), headers={"Retry-After": "5"}) from None
        try:
            results = await asyncio.wrap_future(future)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None  # labels were checked before
        return self.ep.classify_body(results)

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        queue: asyncio.Queue = asyncio.Queue()
        prompts, rows = self.ep.completion_jobs(body, self._hook(queue))
        if self.options.log_prompts:
            request.state.prompt_text = str(body.prompt)[:200]
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        self._submit(rows)
        if body.stream:
            return _sse(self._completion_stream(body, rows, queue, rid, request))
        async for _row, _update in self._events(rows, queue):
            pass
        answer = self.ep.completion_body(body, prompts, rows, rid)
        request.state.tokens = answer["usage"]["completion_tokens"]
        return answer

    def _hook(self, queue: asyncio.Queue) -> Any:
        """Each row's updates go to `queue` on the event loop (from the scheduler thread)."""
        loop = asyncio.get_running_loop()

        def hook(index: int) -> Any:
            def on_update(update: Update) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, update))

            return on_update

        return hook

    def _usage(self, prompts: list[list[int]], completion: int) -> dict[str, int]:
        return self.ep.usage(prompts, completion)

    def _token_text(self, token_id: int) -> str:
        return self.ep.token_text(token_id)

    async def _completion_stream(
        self, body: Any, rows: list[Row], queue: asyncio.Queue, rid: str, request: Request
    ) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())
        name = self.options.model_name
        chunk = functools.partial(_text_chunk, rid, created, name)
        if body.echo:
            for row in rows:
                yield chunk(
                    row.index, self.tokenizer.decode(row.ids), await self._echo_logprobs(body, row)
                )
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
                logprobs = self._stream_logprobs(update.logprob)
            finish = finish_name(update.finish_reason)
            if update.text or logprobs is not None or finish is not None:
                yield chunk(row.index, update.text, logprobs, finish)
        request.state.tokens = completion_tokens
        if _wants_usage(body):
            prompts = [r.ids for r in rows if r.index % body.n == 0]
            yield {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [],
                "usage": self._usage(prompts, completion_tokens),
            }

    async def _echo_logprobs(self, body: Any, row: Row) -> Any:
        """The echoed prompt's logprobs (completions shape), or None when not asked for."""
        if body.logprobs is None:
            return None
        await self._wait_prompt_logprobs(row)
        prompt_only = Row(row.index, row.prompt, row.ids, row.job, drop_output=True)
        return self.ep.completion_logprobs(body, prompt_only, _empty_result())

    def _stream_logprobs(self, lp: Any) -> dict[str, Any]:
        """One streamed token's logprobs in the completions shape."""
        text = self._token_text(lp.token_id)
        top = {self._token_text(a.token_id): a.logprob for a in lp.top}
        top.setdefault(text, lp.logprob)
        return {
            "tokens": [text],
            "token_logprobs": [lp.logprob],
            "top_logprobs": [top],
            "text_offset": [0],
        }

    async def _wait_prompt_logprobs(self, row: Row) -> Any:
        """The prompt's logprobs are set before the first token; wait for them."""
        while row.job.prompt_logprobs is None or len(row.job.prompt_logprobs) < len(row.ids):
            if row.job.done:
                break
            await asyncio.sleep(0.005)
        return row.job.prompt_logprobs

    # ---- chat ---------------------------------------------------------------------------
    async def chat(self, body: ChatRequest, request: Request) -> Any:
        queue: asyncio.Queue = asyncio.Queue()
        prompts, rows, prompt = self.ep.chat_jobs(body, self._hook(queue))
        if self.options.log_prompts:
            request.state.prompt_text = prompt[:200]
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self._submit(rows)
        if body.stream:
            return _sse(self._chat_stream(body, rows, queue, rid, prompts, request))
        async for _row, _update in self._events(rows, queue):
            pass
        answer = self.ep.chat_body(body, prompts, rows, rid)
        request.state.tokens = answer["usage"]["completion_tokens"]
        return answer

    async def _chat_stream(
        self,
        body: Any,
        rows: list[Row],
        queue: asyncio.Queue,
        rid: str,
        prompts: list[list[int]],
        request: Request,
    ) -> AsyncIterator[dict[str, Any]]:
        created = int(time.time())
        name = self.options.model_name

        def chunk(
            index: int, delta: dict[str, Any], logprobs: Any = None, finish: str | None = None
        ) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [
                    {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
                ],
            }

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
                logprobs = self._chat_stream_logprobs(update.logprob)
            finish = finish_name(update.finish_reason)
            if text or logprobs is not None:
                yield chunk(row.index, {"content": text}, logprobs)
            if finish is not None:
                yield chunk(row.index, {}, None, finish)
        request.state.tokens = completion_tokens
        if _wants_usage(body):
            yield {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [],
                "usage": self._usage(prompts, completion_tokens),
            }

    def _chat_stream_logprobs(self, lp: Any) -> dict[str, Any]:
        """One streamed token's logprobs in the chat shape."""
        logprobs = self.ep.chat_logprobs([lp])
        for item in logprobs["content"]:
            item["token"] = item["token"] or self._token_text(lp.token_id)
        return logprobs


def _text_chunk(
    rid: str,
    created: int,
    name: str,
    index: int,
    text: str,
    logprobs: Any = None,
    finish: str | None = None,
) -> dict[str, Any]:
    """One streamed completions chunk."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": name,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    }


def _wants_usage(body: Any) -> bool:
    """stream_options.include_usage: a last chunk with the usage counts."""
    return body.stream_options is not None and bool(body.stream_options.include_usage)


def _empty_result() -> GenerationResult:
    from ..generation import Timings

    return GenerationResult(
        text="",
        token_ids=[],
        finish_reason="length",
        prompt_tokens=0,
        completion_tokens=0,
        timings=Timings(),
        seed=None,
    )


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

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["ServeOptions", "create_app", "stderr_log", "JSONResponse"]
