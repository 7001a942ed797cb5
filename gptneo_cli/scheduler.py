"""Continuous batching: one thread owns the model; requests join a running batch.

The idea is vLLM's (a waiting queue, a running set, a token budget per step); the code is
ours. Each step of the background thread:

1. drops cancelled requests (their rows are freed at once);
2. admits waiting requests while fewer than `max_running` rows are in use;
3. decodes one token for every running row in one forward pass (rows sit at different
   positions: see `rowcache.RowCache`);
4. prefills at most `prefill_chunk` prompt tokens of the requests being admitted. A long
   prompt is cut at fixed multiples of the chunk, so it delays the running rows' next
   token by one chunk's compute, not by its whole prefill, and a prompt's chunks never
   depend on what else is running.

A request's result does not depend on its neighbours: every row has its own sampler and
random generator (seeded per request), its own history, stop strings and budget. Finished
rows leave after the step that finished them. Nothing here knows about HTTP: `submit`
raises `QueueFull` when the queue is full (the server maps it to 429 with Retry-After).

Speculative decoding, per row: a request whose config sets `prompt_lookup` gets up to
`draft_tokens` drafts copied from its own context each step, or with `draft_model` (a draft
loaded beside the model: `speculative.load_draft`) drafts from that model, run one row at a
time through the row's own draft cache (`speculative.ModelDrafter`, which rolls back too).
A step where any row has drafts verifies them all in one forward pass (each row reads its
token and its drafts, padded to the longest; `RowCache.begin_verify`). Each row keeps
what `speculative.verify` accepts (greedy: the longest prefix the model agrees with, then
the model's token; sampling: the accept/reject rule, with the row's own generator) and its
cache keeps just those positions (`RowCache.commit`). A step where no row drafted is the
plain one.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from . import sampling
from .errors import GPTNeoError, is_out_of_memory
from .generation import (
    FinishReason,
    GenerationConfig,
    GenerationResult,
    StopGate,
    Timings,
    TokenizerLike,
    TokenLogprob,
    _budget,
    all_finite,
    finish_text,
    non_finite_scores,
    prompt_ids,
    push_text,
)
from .modeling import AttentionStep
from .rowcache import RowCache
from .speculative import ModelDrafter, PromptLookup, TargetRule, loaded_draft, verify

#: Prompt tokens prefilled per step (across admitted requests): bounds the extra delay a
#: long prompt adds to the running rows' next token.
DEFAULT_PREFILL_CHUNK = 128


class QueueFull(GPTNeoError):
    """The scheduler holds as many requests as it may; try again after `retry_after` s."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SchedulerClosed(GPTNeoError):
    """The scheduler is shutting down and takes no new requests."""


@dataclass
class Update:
    """What one step did for one request: a new token, the text it released (maybe "",
    never part of a stop string), its log-probability when asked, and the finish reason
    on the last update."""

    token_id: int | None
    text: str
    logprob: TokenLogprob | None = None
    finish_reason: FinishReason | None = None


_ids = itertools.count(1)


class Request:
    """One sequence to generate. Build it, `Scheduler.submit` it, then read updates from
    `on_update` (called on the scheduler's thread: keep it quick) or `wait()` for the result.

    prompt_logprobs: also compute each prompt token's log-probability (the first is None),
    with config.logprobs alternatives: `echo` with `logprobs` in the OpenAI API.
    """

    def __init__(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        max_new: int,
        *,
        on_update: Callable[[Update], None] | None = None,
        prompt_logprobs: bool = False,
        seed: int | None = None,
        truncated: int = 0,
    ) -> None:
        if not prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if max_new < 1:
            raise ValueError(f"max_new must be at least 1, got {max_new}")
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.config = config
        self.max_new = max_new
        self.on_update = on_update
        self.want_prompt_logprobs = prompt_logprobs
        self.truncated = truncated
        if config.greedy:
            self.seed = None
        elif seed is not None:
            self.seed = seed
        elif config.seed is not None:
            self.seed = config.seed
        else:
            self.seed = random.SystemRandom().randrange(2**32)
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.submitted_at = 0.0
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop generating: the row is freed within one step (finish_reason "cancelled")."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until finished; raise the error that ended it, if any."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass
class _Seq:
    """The scheduler thread's state of one request."""

    req: Request
    decoder: Any
    gate: StopGate | None
    choose: Any
    needs_history: bool
    generator: torch.Generator | None
    length: int = 0  # positions whose keys are cached
    prefilled: int = 0
    slot: int = -1  # row in the decode cache (running) or the prefill cache (prefilling)
    last: int = 0  # the token to feed next
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    started_at: float = 0.0
    prefill_s: float = 0.0
    first_token_at: float = 0.0
    finished_at: float = 0.0
    # Speculative decoding: the drafter, tokens per step, the target's rule.
    drafter: PromptLookup | ModelDrafter | None = None
    draft_tokens: int = 0
    rule: TargetRule | None = None
    drafted: int = 0
    accepted: int = 0


def _make_chooser(config: GenerationConfig, eos_ids: Sequence[int]) -> tuple[Any, bool]:
    """The sampler of one request: the processors and sampler its config turns on."""
    return sampling.build_chooser(config, tuple(eos_ids))


def model_body(model: Any) -> Callable[..., torch.Tensor]:
    """forward(ids [B, T], positions [B, T], cache, keep) -> logits, with the masks the row
    cache gives. keep: 0 for every position, 1 for the last, or a LongTensor [B] of each
    row's last real position (right-padded new prompts): then logits are [B, 1, V]. Runs the
    model's own modules: the embeddings, its blocks and the (tied) head; a decode call of a
    fast model with a native step (step.py) runs its blocks in that one C call instead."""
    base = model.base()
    native_step = getattr(model, "_native_step", None)
    if getattr(model, "_step", None) is not None:  # a compiled step: torch's path throughout
        native_step = None

    def forward(
        ids: torch.Tensor, positions: torch.Tensor, cache: RowCache, keep: int | torch.Tensor
    ) -> torch.Tensor:
        step = native_step() if native_step is not None else None
        if step and step.ready_rows(ids, cache):
            if step.runs_head(ids.shape[1]):
                return step(ids, cache, cache.decode_positions(), logits=True).float()
            hidden = step(ids, cache, cache.decode_positions())
            return model.lm_head(hidden.to(model.dtype)).float()
        setting = getattr(base, "attn_backend", None) or getattr(base, "_attn", "auto")
        backend = "eager" if setting == "eager" else "sdpa"
        plans = cache.plans(ids.shape[1])
        x = base.run(ids, positions, AttentionStep(plans=plans, backend=backend, cache=cache))
        if isinstance(keep, torch.Tensor):
            x = x[torch.arange(x.shape[0], device=x.device), keep][:, None]
        elif keep:
            x = x[:, -keep:]
        return model.lm_head(x).float()

    return forward


class Scheduler:
    """Owns `model` on one background thread and runs every submitted request.

    max_running: rows decoded together (the KV cache holds that many sequences).
    max_queue: requests waiting for a row; beyond it `submit` raises QueueFull.
    prefill_chunk: prompt tokens per prefill forward pass (see the module's docstring).
    positions: the most positions any request needs, when known: the KV caches start at
    that size and all rows (generate), instead of growing as rows arrive.
    prefill_rows: requests prefilled side by side (default max_running: new prompts' first
    chunks run as one batch); prefill_budget: prompt tokens per step (default one chunk:
    what bounds the running rows' extra delay; batch jobs raise it for throughput).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: TokenizerLike,
        *,
        max_running: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefill_rows: int | None = None,
        prefill_budget: int | None = None,
        background: bool = True,
        positions: int | None = None,
    ) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be at least 0, got {max_queue}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model, self.tokenizer = model, tokenizer
        self.config = model.config
        self.max_running, self.max_queue = max_running, max_queue
        self.prefill_chunk = prefill_chunk
        #: Prompt tokens prefilled per step (whole chunks; the last one may overshoot).
        self.prefill_budget = prefill_budget or prefill_chunk
        eos = {tokenizer.eos_id, getattr(model.config, "eos_token_id", None)}
        self.eos_ids = sorted(t for t in eos if t is not None)
        # The compute dtype and device (an int8 model's weights are int8, its activations not).
        param = next(model.parameters())
        self.device = torch.device(getattr(model, "device", param.device))
        self.dtype = getattr(model, "dtype", param.dtype)
        self._forward = model_body(model)
        self._prefill_rows = max(1, min(prefill_rows or max_running, max_running))
        # Known needs (generate: every row and its length) size the caches once.
        size = {"capacity": positions, "initial_rows": max_running} if positions else {}
        cached = {"dtype": getattr(model, "cache_dtype", self.dtype), "device": self.device}
        self._cache = RowCache(self.config, max_running, **cached, **size)
        self._pcache = RowCache(self.config, self._prefill_rows, **cached, **size)
        self._lock = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[_Seq] = []
        self._running: list[_Seq] = []
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._closing = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        #: False: no thread of its own; the caller runs the steps with `drive` (generate()).
        self.background = background
        #: Counters for metrics: totals since start.
        self.prompt_tokens_total = 0
        self.generated_tokens_total = 0
        #: Speculative decoding: tokens drafted, and the drafts that were kept.
        self.drafted_tokens_total = 0
        self.accepted_tokens_total = 0
        self.steps = 0

    # ---- the caller's side --------------------------------------------------------------
    def prepare(
        self, prompt: str | Sequence[int], config: GenerationConfig
    ) -> tuple[list[int], int, int]:
        """(prompt ids, new-token budget, tokens truncated) for one prompt; raises
        ValueError before any compute when it does not fit or has bad ids."""
        ids = prompt_ids(self.tokenizer, prompt, self.config.vocab_size)
        kept, dropped, new = _budget(ids, config, self.config.max_position_embeddings)
        return kept, new, dropped

    def submit(self, request: Request) -> Request:
        """Queue a request; raises QueueFull or SchedulerClosed instead of queueing, and
        ValueError for a draft model that was not loaded beside the model."""
        name = request.config.draft_model
        if name is not None and loaded_draft(self.model, name) is None:
            raise ValueError(
                f"draft_model {name} is not loaded: load it first "
                "(gptneo_cli.speculative.load_draft or attach_draft)"
            )
        with self._lock:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            busy = len(self._running) + len(self._prefilling)
            if busy + len(self._waiting) >= self.max_running + self.max_queue:
                raise QueueFull(
                    f"{busy} requests are running and {len(self._waiting)} are queued "
                    "(the most allowed): try again shortly",
                    retry_after=1.0,
                )
            request.submitted_at = time.perf_counter()
            self._waiting.append(request)
            self._ensure_thread()
            self._lock.notify_all()
        return request

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the scheduler's thread between two steps (the model is used by one
        thread only): other model work, such as zero-shot classification, goes here."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            self._calls.append((fn, future))
            self._ensure_thread()
            self._lock.notify_all()
        return future

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "running": len(self._running) + len(self._prefilling),
                "waiting": len(self._waiting),
                "prompt_tokens_total": self.prompt_tokens_total,
                "generated_tokens_total": self.generated_tokens_total,
                "drafted_tokens_total": self.drafted_tokens_total,
                "accepted_tokens_total": self.accepted_tokens_total,
            }

    def idle(self) -> bool:
        with self._lock:
            return not (self._waiting or self._prefilling or self._running)

    def close(self, grace: float = 0.0) -> None:
        """Stop taking requests, let running ones finish for up to `grace` seconds, cancel
        the rest and stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        deadline = time.monotonic() + grace
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            for req in list(self._waiting):
                req.cancel()
            for seq in self._prefilling + self._running:
                seq.req.cancel()
            for _, future in self._calls:
                future.cancel()
            self._calls.clear()
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drive(
        self, requests: Sequence[Request], cancelled: Callable[[], bool] | None = None
    ) -> None:
        """Run steps on the calling thread until `requests` are done (a scheduler built with
        background=False). Why not the thread: torch's OpenMP workers on a second thread
        made batch decoding ~25 % slower on a 2-core CPU (docs/PERFORMANCE.md). `cancelled`
        is checked between steps and cancels them all; so does Ctrl-C. A failed forward
        pass ends every request with its error (`wait` raises it)."""
        try:
            with torch.inference_mode():
                while not all(r.done for r in requests):
                    if cancelled is not None and cancelled():
                        for r in requests:
                            r.cancel()
                    self._step_or_fail()
        except KeyboardInterrupt:  # every row ends with what it has
            for r in requests:
                r.cancel()
            with torch.inference_mode():
                while not all(r.done for r in requests):
                    self._step_or_fail()

    def _step_or_fail(self) -> None:
        try:
            self.step()
        except Exception as exc:  # noqa: BLE001 - handed to the requests' callers
            self._fail_all(exc)
            with self._lock:
                waiting, self._waiting = list(self._waiting), deque()
            for req in waiting:
                req.error = exc
                req._done.set()

    # ---- the scheduler thread -----------------------------------------------------------
    def _ensure_thread(self) -> None:
        if not self.background:
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._main, name="gptneo-scheduler", daemon=True)
            self._thread.start()

    def _main(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._prefilling or self._running or self._calls):
                    if self._stopped:
                        return
                    self._lock.wait(timeout=0.5)
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        future.set_exception(exc)
            if not (self._waiting or self._prefilling or self._running):
                continue
            try:
                with torch.inference_mode():
                    self.step()
            except BaseException as exc:  # noqa: BLE001 - fail the requests, keep serving
                self._fail_all(exc)
            with self._lock:
                if self._stopped and not (self._waiting or self._prefilling or self._running):
                    return

    def step(self) -> None:
        """One scheduling step (public for tests that drive the scheduler by hand)."""
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._decode()
        if self._prefilling:
            self._prefill()
        self.steps += 1

    def _drop_cancelled(self) -> None:
        with self._lock:
            for req in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(req)
                self._finish_unstarted(req)
        for seq in [s for s in self._prefilling if s.req.cancelled]:
            self._end(seq, "cancelled")
        for seq in [s for s in self._running if s.req.cancelled]:
            self._end(seq, "cancelled")

    def _admit(self) -> None:
        with self._lock:
            while (
                self._waiting
                and len(self._prefilling) < self._prefill_rows
                and len(self._running) + len(self._prefilling) < self.max_running
            ):
                req = self._waiting.popleft()
                used = {s.slot for s in self._prefilling}
                slot = next(i for i in range(self._prefill_rows) if i not in used)
                self._prefilling.append(self._new_seq(req, slot))

    def _new_seq(self, req: Request, slot: int) -> _Seq:
        cfg = req.config
        choose, needs_history = _make_chooser(cfg, self.eos_ids)
        generator = None
        if not cfg.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(req.seed)
        seq = _Seq(
            req=req,
            decoder=self.tokenizer.stream_decoder(),
            gate=StopGate(cfg.stop) if cfg.stop else None,
            choose=choose,
            needs_history=needs_history,
            generator=generator,
            slot=slot,
            logprobs=[] if cfg.logprobs is not None else None,
            started_at=time.perf_counter(),
        )
        if cfg.speculative:
            seq.draft_tokens = cfg.draft_tokens
            seq.rule = TargetRule(cfg, self.eos_ids, len(req.prompt_ids), generator)
            seq.drafter = self._drafter(req, seq.rule)
        return seq

    def _drafter(self, req: Request, rule: TargetRule) -> PromptLookup | ModelDrafter | None:
        """The row's drafter: prompt lookup, or the draft model with a cache of its own
        (None when the draft model has fewer positions than the row needs: it decodes
        without drafts)."""
        cfg = req.config
        if cfg.prompt_lookup:
            return PromptLookup(cfg.prompt_lookup)
        draft = loaded_draft(self.model, cfg.draft_model)
        length = len(req.prompt_ids) + req.max_new - 1  # the last token is never fed
        if draft is None or length > draft.config.max_position_embeddings:
            return None
        drafter = ModelDrafter(draft, rule, cfg.draft_tokens)
        drafter.start(length)
        return drafter

    def _prefill(self) -> None:
        """Up to prefill_budget prompt tokens, chunk by chunk, oldest request first. New
        prompts' first chunks run together in one forward pass; a long prompt's later
        chunks run one request at a time."""
        self._pcache.live = 1 + max(s.slot for s in self._prefilling)
        budget = self.prefill_budget
        first: list[tuple[_Seq, int]] = []
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            start = seq.prefilled
            end = min(
                len(seq.req.prompt_ids), (start // self.prefill_chunk + 1) * self.prefill_chunk
            )
            budget -= end - start
            if start == 0:
                first.append((seq, end))
            else:
                self._prefill_rest(seq, start, end)
        if first:
            self._prefill_first(first)

    def _prefill_first(self, chunks: list[tuple[_Seq, int]]) -> None:
        """The first chunk of new prompts, right-padded to the longest, in one pass."""
        lengths = [end for _, end in chunks]
        width = max(lengths)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        for b, (seq, end) in enumerate(chunks):
            ids[b, :end] = torch.tensor(seq.req.prompt_ids[:end])
        ids = ids.to(self.device)
        positions = torch.arange(width, device=self.device)[None].expand(len(chunks), width)
        self._pcache.begin_chunk([seq.slot for seq, _ in chunks], 0, lengths)
        want_all = any(seq.req.want_prompt_logprobs for seq, _ in chunks)
        last = torch.tensor([end - 1 for end in lengths], device=self.device)
        logits = self._forward(ids, positions, self._pcache, 0 if want_all else last)
        done: list[_Seq] = []
        for b, (seq, end) in enumerate(chunks):
            if seq.req.want_prompt_logprobs:
                self._record_prompt_logprobs(seq, logits[b, :end], 0, end)
            seq.prefilled = seq.length = end
            if end == len(seq.req.prompt_ids):
                done.append(seq)
        if done:
            rows = [b for b, (seq, _) in enumerate(chunks) if seq in done]
            at = torch.tensor(rows, device=self.device)
            picked = logits[at, last[at]] if want_all else logits[at, -1]
            self._start_decoding(done, picked)

    def _prefill_rest(self, seq: _Seq, start: int, end: int) -> None:
        """A later chunk of one long prompt (its keys so far are in the prefill cache)."""
        prompt = seq.req.prompt_ids
        ids = torch.tensor([prompt[start:end]], device=self.device)
        positions = torch.arange(start, end, device=self.device)[None]
        self._pcache.begin_chunk(seq.slot, start)
        want_all = seq.req.want_prompt_logprobs
        logits = self._forward(ids, positions, self._pcache, 0 if want_all else 1)
        if want_all:
            self._record_prompt_logprobs(seq, logits[0], start, end)
        seq.prefilled = seq.length = end
        if end == len(prompt):
            self._start_decoding([seq], logits[:, -1])

    def _start_decoding(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Prompts are in: move their rows to the decode cache and choose the first tokens."""
        now = time.perf_counter()
        for seq in seqs:
            self._prefilling.remove(seq)
            seq.prefill_s = now - seq.started_at
            slot = self._cache.live = len(self._running)
            self._cache.copy_row(slot, self._pcache, seq.slot, seq.length)
            seq.slot = slot
            self._running.append(seq)
            self.prompt_tokens_total += len(seq.req.prompt_ids)
        self._take(seqs, logits)

    def _record_prompt_logprobs(
        self, seq: _Seq, logits: torch.Tensor, start: int, end: int
    ) -> None:
        req = seq.req
        if req.prompt_logprobs is None:
            req.prompt_logprobs = [None]
        prompt = req.prompt_ids
        targets = prompt[start + 1 : end + 1]  # position i predicts token i + 1
        if not targets:
            return
        logp = logits[: len(targets)].log_softmax(dim=-1)
        index = torch.tensor(targets, device=logp.device)[:, None]
        picked = logp.gather(-1, index)[:, 0].tolist()
        top_n = req.config.logprobs or 0
        tops: list[list[TokenLogprob]] = [[] for _ in targets]
        if top_n:
            top = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
            tops = [
                [TokenLogprob(t, v) for t, v in zip(ids, vals, strict=True)]
                for ids, vals in zip(top.indices.tolist(), top.values.tolist(), strict=True)
            ]
        for token, value, alts in zip(targets, picked, tops, strict=True):
            req.prompt_logprobs.append(TokenLogprob(token, value, top=alts))

    def _decode(self) -> None:
        seqs = self._running
        if any(s.drafter is not None for s in seqs):
            drafts = self._drafts(seqs)
            if drafts is not None:
                self._verify(seqs, drafts)
                return
        ids = torch.tensor([[s.last] for s in seqs], device=self.device)
        self._cache.live = len(seqs)
        positions = self._cache.begin_decode([s.length for s in seqs])
        logits = self._forward(ids, positions[:, None], self._cache, 1)[:, -1]
        for s in seqs:
            s.length += 1
        self._take(list(seqs), logits)

    def _drafts(self, seqs: list[_Seq]) -> list[tuple[list[int], torch.Tensor | None]] | None:
        """Each row's drafts for this step and the probabilities they were drawn with (None:
        certain), none past its token budget (the last token is never a draft); None when
        no row has any."""
        out: list[tuple[list[int], torch.Tensor | None]] = []
        for seq in seqs:
            k = min(seq.draft_tokens, seq.req.max_new - len(seq.token_ids) - 1)
            if seq.drafter is None or k <= 0:
                out.append(([], None))
                continue
            out.append(seq.drafter.propose(seq.req.prompt_ids + seq.token_ids, k))
        return out if any(d for d, _ in out) else None

    def _verify(
        self, seqs: list[_Seq], proposed: list[tuple[list[int], torch.Tensor | None]]
    ) -> None:
        """One forward pass over every row's last token and its drafts; each row keeps what
        the target accepts, and its cache only those positions."""
        drafts = [d for d, _ in proposed]
        counts = [1 + len(d) for d in drafts]
        width = max(counts)
        rows = [
            [s.last, *d] + [0] * (width - 1 - len(d)) for s, d in zip(seqs, drafts, strict=True)
        ]
        ids = torch.tensor(rows, device=self.device)
        self._cache.live = len(seqs)
        positions = self._cache.begin_verify([s.length for s in seqs], counts)
        logits = self._forward(ids, positions, self._cache, 0)
        if not all_finite(logits):
            raise non_finite_scores()
        plain = [b for b, d in enumerate(drafts) if not d]
        chosen = self._choose([seqs[b] for b in plain], logits[plain, 0]) if plain else []
        runs: list[list[int]] = []
        for b, (seq, (drafted, q)) in enumerate(zip(seqs, proposed, strict=True)):
            if not drafted:
                runs.append([chosen.pop(0)])
                continue
            assert seq.rule is not None
            context = seq.req.prompt_ids + seq.token_ids + drafted
            scores = seq.rule.scores(logits[b, : len(drafted) + 1], context, len(drafted) + 1)
            kept, after = verify(scores, drafted, q, seq.rule)
            seq.drafted += len(drafted)
            seq.accepted += kept
            self.drafted_tokens_total += len(drafted)
            self.accepted_tokens_total += kept
            runs.append([*drafted[:kept], after])
        self._cache.commit([len(run) for run in runs])
        for seq, run in zip(seqs, runs, strict=True):
            seq.length += len(run)
        seqs = list(seqs)
        self._take_runs(seqs, runs, logits)
        for seq, drafted in zip(seqs, drafts, strict=True):
            if drafted and seq.finish_reason is None:  # a draft model forgets the rejected
                assert seq.drafter is not None
                seq.drafter.commit(seq.req.prompt_ids + seq.token_ids)

    def _take_runs(self, seqs: list[_Seq], runs: list[list[int]], logits: torch.Tensor) -> None:
        """Hand over each row's verified tokens in order (logits [n, T, V]: token i's are
        row i); a row that finishes inside its run (eos, stop string, length) ends there."""
        now = time.perf_counter()
        updates: list[tuple[Request, Update]] = []
        for b, (seq, run) in enumerate(zip(seqs, runs, strict=True)):
            for i, token in enumerate(run):
                logprob = (
                    self._logprob(seq, logits[b, i], token) if seq.logprobs is not None else None
                )
                text = self._accept(seq, token, now)
                seq.last = token
                self.generated_tokens_total += 1
                updates.append((seq.req, Update(token, text, logprob, seq.finish_reason)))
                if seq.finish_reason is not None:
                    break
        for seq in [s for s in seqs if s.finish_reason is not None]:
            self._retire(seq)  # the result is complete before its last update is sent
        for req, update in updates:
            self._emit(req, update)

    def _take(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Choose each row's next token from its logits row, hand it over, retire finished
        rows. Plain greedy rows share one argmax (and one device->host copy)."""
        if not all_finite(logits):
            raise non_finite_scores()
        tokens = self._choose(seqs, logits)
        self._take_runs(seqs, [[token] for token in tokens], logits[:, None])

    def _choose(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """Each row's next token from its logits row [n, V], as plain decoding picks it."""
        plain = logits.argmax(dim=-1).tolist()
        tokens: list[int] = []
        for j, seq in enumerate(seqs):
            if seq.generator is None and not seq.needs_history:
                tokens.append(plain[j])
                continue
            history = (
                torch.tensor([seq.req.prompt_ids + seq.token_ids], device=self.device)
                if seq.needs_history
                else torch.empty(1, 0, dtype=torch.long)
            )
            state = sampling.DecodeState(history, len(seq.req.prompt_ids))
            tokens.append(int(seq.choose(logits[j : j + 1], state, seq.generator)[0]))
        return tokens

    def _logprob(self, seq: _Seq, logits: torch.Tensor, token: int) -> TokenLogprob:
        logp = logits.log_softmax(dim=-1)
        top_n = seq.req.config.logprobs or 0
        alts: list[TokenLogprob] = []
        if top_n:
            top = logp.topk(min(top_n, logp.shape[-1]))
            alts = [
                TokenLogprob(t, v)
                for t, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
            ]
        item = TokenLogprob(token, float(logp[token]), top=alts)
        assert seq.logprobs is not None
        seq.logprobs.append(item)
        return item

    def _accept(self, seq: _Seq, token: int, now: float) -> str:
        """Take one new token into a row; return the text it releases (maybe "")."""
        if not seq.token_ids:
            seq.first_token_at = now
        seq.token_ids.append(token)
        cfg = seq.req.config
        if token in self.eos_ids and not cfg.ignore_eos:
            return self._finish(seq, "eos", now)
        return push_text(seq, token, now, at_length=len(seq.token_ids) >= seq.req.max_new)

    def _finish(self, seq: _Seq, reason: FinishReason, now: float, delta: str = "") -> str:
        return finish_text(seq, reason, now, delta)

    def _retire(self, seq: _Seq) -> None:
        """Free a decode row: the last running row moves into its place."""
        running = self._running
        index = running.index(seq)
        last = running[-1]
        if last is not seq:
            self._cache.move_row(index, last.slot, last.length)
            last.slot = index
            running[index] = last
        running.pop()
        self._complete(seq)

    def _end(self, seq: _Seq, reason: FinishReason) -> None:
        """A row ended outside a step's choices (cancelled): free it and report."""
        seq.finish_reason, seq.finished_at = reason, time.perf_counter()
        if seq in self._prefilling:
            self._prefilling.remove(seq)
            self._complete(seq)
        else:
            self._retire(seq)
        self._emit(seq.req, Update(None, "", None, reason))

    def _complete(self, seq: _Seq) -> None:
        req = seq.req
        n = len(seq.token_ids)
        if seq.logprobs:
            for item in seq.logprobs:
                self._name(item)
        if req.prompt_logprobs:
            for item in req.prompt_logprobs:
                if item is not None:
                    self._name(item)
        first = seq.first_token_at
        decode_s = max(seq.finished_at - first, 0.0) if n else 0.0
        req.result = GenerationResult(
            text="".join(seq.pieces),
            token_ids=list(seq.token_ids),
            finish_reason=seq.finish_reason or "cancelled",
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=n,
            timings=Timings(
                ttft_s=first - req.submitted_at if n else 0.0,
                prompt_tok_s=len(req.prompt_ids) / seq.prefill_s if seq.prefill_s > 0 else 0.0,
                gen_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
                prefill_s=seq.prefill_s,
                decode_s=decode_s,
                total_s=max(seq.finished_at - req.submitted_at, 0.0),
            ),
            seed=req.seed,
            truncated_tokens=req.truncated,
            logprobs=seq.logprobs,
            drafted=seq.drafted,
            accepted=seq.accepted,
        )
        req._done.set()

    def _name(self, item: TokenLogprob) -> None:
        decode = self.tokenizer.decode
        if not item.token:
            item.token = decode([item.token_id])
        for alt in item.top:
            if not alt.token:
                alt.token = decode([alt.token_id])

    def _finish_unstarted(self, req: Request) -> None:
        now = time.perf_counter()
        req.result = GenerationResult(
            text="",
            token_ids=[],
            finish_reason="cancelled",
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=0,
            timings=Timings(total_s=max(now - req.submitted_at, 0.0)),
            seed=req.seed,
            truncated_tokens=req.truncated,
            logprobs=[] if req.config.logprobs is not None else None,
        )
        req._done.set()
        self._emit(req, Update(None, "", None, "cancelled"))

    def _emit(self, req: Request, update: Update) -> None:
        if req.on_update is not None:
            try:
                req.on_update(update)
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop the others
                req.cancel()

    def _fail_all(self, exc: BaseException) -> None:
        """A forward pass failed: every request in flight ends with that error."""
        if isinstance(exc, RuntimeError) and is_out_of_memory(exc):
            exc = MemoryError("out of memory while generating")
        seqs = self._prefilling + self._running
        self._prefilling, self._running = [], []
        for seq in seqs:
            seq.req.error = exc
            seq.finish_reason = "cancelled"
            seq.req._done.set()
            self._emit(seq.req, Update(None, "", None, "cancelled"))


def run_all(scheduler: Scheduler, requests: Sequence[Request]) -> list[GenerationResult]:
    """Submit requests (waiting while the queue is full) and return their results in order."""
    pending = deque(requests)
    submitted: list[Request] = []
    while pending:
        try:
            submitted.append(scheduler.submit(pending[0]))
            pending.popleft()
        except QueueFull:
            submitted[-1].wait() if submitted else time.sleep(0.01)
    return [r.wait() for r in submitted]
