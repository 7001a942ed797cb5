"""Run batch requests through the continuous-batching scheduler, with the same request
code as the server (gptneo_cli.api).

The reader stays just ahead of the model: requests are submitted while the scheduler has
room (max_running rows decoding plus a queue of the same size), so memory holds only the
requests in flight, whatever the input's length. Results are handed out in the order
they finish.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..api import APIError, Endpoints, Row, error_body, make_scheduler, parse_body
from ..scheduler import QueueFull, Scheduler, Update
from ..server.protocol import DRAFTING, SHARED
from .jobs import Item, bad_line_record, result_record

Record = dict[str, Any]


@dataclass
class Progress:
    """Counts so far (this run), for progress bars and the summary."""

    done: int = 0
    failed: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    def count(self, record: dict[str, Any]) -> None:
        """Count one output record: an error, or a success and its generated tokens."""
        if record.get("error") is not None:
            self.failed += 1
            return
        self.done += 1
        body = record["response"]["body"]
        self.tokens += (body.get("usage") or {}).get("completion_tokens", 0)


@dataclass
class _Pending:
    item: Item
    kind: str
    body: Any
    prompts: list[list[int]]
    rows: list[Row]
    remaining: int
    future: Any = None


def body_defaults(generation: dict[str, Any]) -> dict[str, Any]:
    """Generation flags as body fields (OpenAI names): the default of every completion and
    chat request that does not set the field itself."""
    names = {opt: api for api, opt in SHARED.items()}
    names.update({name: name for name in DRAFTING})
    out = {names[k]: v for k, v in generation.items() if k in names and v is not None}
    if generation.get("stop"):
        out["stop"] = list(generation["stop"])
    return out


class Runner:
    """Feeds items to a scheduler and calls `sink(record)` as each request finishes."""

    def __init__(
        self, endpoints: Endpoints, scheduler: Scheduler, *, defaults: dict[str, Any] | None = None
    ) -> None:
        self.ep, self.scheduler = endpoints, scheduler
        self.defaults = dict(defaults or {})
        self.limit = scheduler.max_running + max(scheduler.max_queue, 1)
        self._finished: queue.Queue[int] = queue.Queue()
        self._pending: dict[int, _Pending] = {}
        self._keys = iter(range(1, 1 << 62))

    def run(
        self,
        items: Iterable[Item],
        sink: Callable[[Record], None],
        progress: Progress | None = None,
        on_record: Callable[[Record, Progress], None] | None = None,
    ) -> Progress:
        progress = progress or Progress()
        progress.started = time.perf_counter()  # the model is loaded: rates count from here

        def emit(record: Record) -> None:
            sink(record)
            progress.count(record)
            if on_record is not None:
                on_record(record, progress)

        for item in items:
            while len(self._pending) >= self.limit:
                self._drain(emit, block=True)
            self._start(item, emit)
            self._drain(emit, block=False)
        while self._pending:
            self._drain(emit, block=True)
        return progress

    # ---- starting -----------------------------------------------------------------------
    def _start(self, item: Item, emit: Callable[[Record], None]) -> None:
        if item.error is not None or item.body is None:
            emit(bad_line_record(item))
            return
        key = next(self._keys)
        try:
            pending = self._prepare(key, item)
        except APIError as exc:
            emit(result_record(item.custom_id, exc.status, _error_body(exc)))
            return
        self._pending[key] = pending
        if pending.kind == "classify":
            future = self.scheduler.call(self.ep.classify_call(pending.body))
            pending.future = future
            future.add_done_callback(lambda _f, key=key: self._finished.put(key))
            return
        for row in pending.rows:
            while True:
                try:
                    self.scheduler.submit(row.job)
                    break
                except QueueFull:
                    self._drain(emit, block=True, timeout=0.05)

    def _prepare(self, key: int, item: Item) -> _Pending:
        body = item.body or {}
        if item.url != "/v1/classify":
            body = {**self.defaults, **body}
        parsed: Any = parse_body(item.url, body)
        if item.url == "/v1/classify":
            self.ep.classify_inputs(parsed)  # checks before queueing
            return _Pending(item, "classify", parsed, [], [], 1)

        def hook(index: int) -> Callable[[Update], None]:
            def on_update(update: Update) -> None:
                if update.finish_reason is not None:
                    self._finished.put(key)

            return on_update

        if item.url == "/v1/chat/completions":
            prompts, rows, _ = self.ep.chat_jobs(parsed, hook)
            kind = "chat"
        else:
            prompts, rows = self.ep.completion_jobs(parsed, hook)
            kind = "completion"
        return _Pending(item, kind, parsed, prompts, rows, len(rows))

    # ---- finishing ----------------------------------------------------------------------
    def _drain(
        self, emit: Callable[[Record], None], *, block: bool, timeout: float | None = None
    ) -> None:
        """Emit every request whose last row finished (waiting for one when `block`)."""
        first = True
        while True:
            try:
                if block and first:
                    key = self._finished.get(timeout=timeout)
                else:
                    key = self._finished.get_nowait()
            except queue.Empty:
                return
            first = False
            pending = self._pending.get(key)
            if pending is None:
                continue
            pending.remaining -= 1
            if pending.remaining > 0:
                continue
            del self._pending[key]
            emit(self._record(pending))

    def _record(self, pending: _Pending) -> Record:
        custom_id = pending.item.custom_id
        try:
            if pending.kind == "classify":
                try:
                    results = pending.future.result()
                except ValueError as exc:
                    raise APIError(400, str(exc)) from None  # labels were checked before
                return result_record(custom_id, 200, self.ep.classify_body(results))
            for row in pending.rows:
                row.job.wait(0)  # raises the error that ended a row
            rid = uuid.uuid4().hex[:24]
            if pending.kind == "chat":
                body = self.ep.chat_body(
                    pending.body, pending.prompts, pending.rows, f"chatcmpl-{rid}"
                )
            else:
                body = self.ep.completion_body(
                    pending.body, pending.prompts, pending.rows, f"cmpl-{rid}"
                )
            return result_record(custom_id, 200, body)
        except APIError as exc:
            return result_record(custom_id, exc.status, _error_body(exc))
        except Exception as exc:  # noqa: BLE001 - one failed request must not end the job
            return result_record(
                custom_id, 500, _error_body(APIError(500, f"{type(exc).__name__}: {exc}"))
            )


def _error_body(exc: APIError) -> dict[str, Any]:
    return error_body(exc.status, exc.message, exc.param, exc.code)


#: Prompt tokens a batch job prefills per scheduler step.
BATCH_PREFILL_BUDGET = 1024


def make_runner(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    max_running: int,
    defaults: dict[str, Any] | None = None,
    aliases: Iterable[str] = (),
    chat_template: Any = None,
) -> tuple[Runner, Scheduler]:
    """A scheduler over a loaded model and a runner on it (close the scheduler after).
    `chat_template` (a conversation.ChatTemplate) renders chat lines; None: the default."""
    # Throughput first: up to BATCH_PREFILL_BUDGET prompt tokens prefilled per step (a
    # server keeps one chunk, for its streams' latency), so a batch refills in a few steps.
    scheduler = make_scheduler(
        model,
        tokenizer,
        max_running=max_running,
        max_queue=max_running,
        prefill_budget=BATCH_PREFILL_BUDGET,
    )
    endpoints = Endpoints(
        model, tokenizer, model_name=model_name, aliases=list(aliases), chat_template=chat_template
    )
    return Runner(endpoints, scheduler, defaults=defaults), scheduler
