"""The decode loop: one engine behind `generate` (batches) and `stream` (live text deltas).

A run is: validate the config, tokenize and budget every prompt (before any compute, so a
prompt that does not fit fails fast), prefill all rows in one forward pass through a
preallocated KV cache, then decode one token per step. After each step the new token of
every row is decoded incrementally, checked for eos, stop strings and length, and finished
rows are dropped from the batch (and from the cache) so they stop costing work.

Per-step Python work is kept to one device->host copy of the chosen tokens plus a little
string handling per row; everything else stays on the device.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol

import torch

from .errors import WeightsError, is_out_of_memory
from .options import DEFAULT_MAX_NEW_TOKENS, GenerationConfig, OptionError
from .sampling import PAD, DecodeState, TokenChooser, build_chooser

FinishReason = Literal["stop", "eos", "length", "cancelled"]


class _StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...
    def finish(self) -> str: ...


class TokenizerLike(Protocol):
    """What the engine needs from a tokenizer (gptneo_cli.tokenizer.Tokenizer has it)."""

    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def stream_decoder(self) -> _StreamDecoder: ...


# ---- results -------------------------------------------------------------------------------


@dataclass
class Timings:
    """Seconds and rates for one result. Load time is not included (the caller owns it).

    ttft_s: from the start of the batch's run to its first new token (prefill + first
      choice; tokenizing is before, loading is the caller's).
    prompt_tok_s: this prompt's tokens / prefill time.
    gen_tok_s: tokens after the first / time after the first (the decode speed).
    """

    ttft_s: float = 0.0
    prompt_tok_s: float = 0.0
    gen_tok_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0


@dataclass
class TokenLogprob:
    """One step's chosen token with its log-probability, and the top alternatives.

    Log-probabilities are the model's own (log_softmax of its logits), before penalties,
    temperature and filtering, so they describe the model rather than the sampler.
    """

    token_id: int
    logprob: float
    token: str = ""
    top: list[TokenLogprob] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token_id": self.token_id, "token": self.token}
        out["logprob"] = self.logprob
        if self.top:
            out["top_logprobs"] = [t.to_dict() for t in self.top]
        return out


@dataclass
class GenerationResult:
    """One generated sequence.

    token_ids are every token the model produced, including an ending eos and the tokens
    that formed a stop string; `text` holds neither the eos nor the stop string. A
    cancelled result's text is what had been released (streamed) when it stopped: text
    held back as a possible stop-string start is dropped.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    timings: Timings
    seed: int | None
    """The sampling seed (None for greedy decoding, which uses none)."""
    truncated_tokens: int = 0
    """Prompt tokens dropped from the left to fit the model's positions."""
    logprobs: list[TokenLogprob] | None = None
    prompt_index: int = 0
    """Which of the prompts this result belongs to (results come in prompt order)."""
    drafted: int = 0
    """Speculative decoding: tokens drafted (prompt lookup or a draft model)."""
    accepted: int = 0
    """Speculative decoding: drafted tokens the model kept."""

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / drafted, or None when nothing was drafted."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the CLI's --format json builds on it)."""
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "timings": {f.name: getattr(self.timings, f.name) for f in fields(Timings)},
            "seed": self.seed,
            "truncated_tokens": self.truncated_tokens,
            "logprobs": None if self.logprobs is None else [t.to_dict() for t in self.logprobs],
            "prompt_index": self.prompt_index,
            "drafted": self.drafted,
            "accepted": self.accepted,
        }


# ---- stop strings --------------------------------------------------------------------------


class StopGate:
    """Holds back text that might be the start of a stop string.

    Text is released only once no stop string can begin inside it. A match found later can
    therefore only start in the held-back part, so searching that short tail is enough.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.longest = max(len(s) for s in self.stops)
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """Add new text; return (text safe to release, whether a stop string was hit)."""
        buf = self.pending + piece
        hit = -1
        for s in self.stops:
            at = buf.find(s)
            if at >= 0 and (hit < 0 or at < hit):
                hit = at
        if hit >= 0:
            self.pending = ""
            return buf[:hit], True
        hold = 0
        for size in range(min(len(buf), self.longest - 1), 0, -1):
            tail = buf[-size:]
            if any(s.startswith(tail) for s in self.stops):
                hold = size
                break
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The generation ended without a stop: the held-back text is real text."""
        out, self.pending = self.pending, ""
        return out


# ---- preparing prompts ----------------------------------------------------------------------

Prompt = str | Sequence[int]


def _normalize_prompts(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text or ids) or many, as a list."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        return [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    items = list(prompts)
    if not items:
        raise ValueError("prompts is empty: give at least one prompt")
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return [items]
    for item in items:
        if not isinstance(item, str) and not (
            isinstance(item, Sequence) and all(isinstance(x, int) for x in item)
        ):
            raise ValueError(
                f"each prompt must be text or a list of token ids, got {type(item).__name__}"
            )
    return items


def all_finite(scores: torch.Tensor) -> torch.Tensor:
    """True (a 0-d tensor) when no score is NaN or infinite: their float32 sum is finite
    exactly then (logits are far from float32's range), 20x cheaper than isfinite().all() on
    [8, 50257] (15 vs 308 us), which every decode step checks."""
    return torch.isfinite(scores.sum(dtype=torch.float32))


def non_finite_scores() -> WeightsError:
    """The error for NaN or infinite logits (the engine's and the scheduler's)."""
    problem = (
        "the model produced NaN or infinite scores, so generation stopped: its "
        "checkpoint is likely corrupt (or float16 overflowed: try {})"
    )
    return WeightsError(problem.format("dtype float32"), cli=problem.format("--dtype float32"))


class TextRow(Protocol):
    """What push_text/finish_text need of a row (the engine's and the scheduler's rows)."""

    decoder: _StreamDecoder
    gate: StopGate | None
    pieces: list[str]
    finish_reason: FinishReason | None
    finished_at: float


def push_text(row: TextRow, token: int, now: float, *, at_length: bool) -> str:
    """Decode one accepted (non-EOS) token into a row's text; a stop string or the length
    limit finishes the row. Returns the text it releases (maybe ""). Shared by the engine
    and the scheduler, so both end rows alike."""
    delta = row.decoder.push(token)
    if row.gate is not None and delta:
        delta, hit = row.gate.push(delta)
        if hit:
            return finish_text(row, "stop", now, delta)
    if at_length:
        return finish_text(row, "length", now, delta)
    if delta:
        row.pieces.append(delta)
    return delta


def finish_text(row: TextRow, reason: FinishReason, now: float, delta: str = "") -> str:
    """Mark a row done and return its last text: the delta plus anything held back."""
    row.finish_reason, row.finished_at = reason, now
    if reason != "stop":
        rest = row.decoder.finish()
        if row.gate is not None:
            released, hit = row.gate.push(rest)
            if hit:
                row.finish_reason = "stop"
                delta += released
            else:
                delta += released + row.gate.flush()
        else:
            delta += rest
    if delta:
        row.pieces.append(delta)
    return delta


@dataclass
class _Row:
    """One sequence being generated, and everything it accumulates."""

    prompt_index: int
    prompt_ids: list[int]
    max_new: int
    truncated: int
    decoder: _StreamDecoder
    gate: StopGate | None
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    first_token_at: float = 0.0
    finished_at: float = 0.0


def _budget(ids: list[int], config: GenerationConfig, positions: int) -> tuple[list[int], int, int]:
    """(prompt ids that fit, tokens dropped, new-token budget) for one prompt."""
    length = len(ids)
    if config.max_length is not None:
        room = config.max_length - length
        if room < 1:
            problem = (
                f"{{}} {config.max_length} leaves no room for new tokens after a "
                f"{length}-token prompt: raise {{}} or use {{}}"
            )
            raise OptionError(
                problem.format("max_length", "max_length", "max_new_tokens"),
                option="max_length",
                cli=problem.format("--max-length", "--max-length", "--max-new-tokens"),
            )
        new = room if config.max_new_tokens is None else min(config.max_new_tokens, room)
    else:
        new = config.max_new_tokens if config.max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS
    if new >= positions:
        problem = f"{{}} {new} leaves no room for a prompt: the model has {positions} positions"
        raise OptionError(
            problem.format("max_new_tokens"),
            option="max_new_tokens",
            cli=problem.format("--max-new-tokens"),
        )
    over = length + new - positions
    if over <= 0:
        return ids, 0, new
    if config.truncate == "error":
        problem = (
            f"the prompt ({length} tokens) plus {{}} ({new}) exceeds the model's "
            f"{positions} positions by {over}: shorten the prompt, lower {{}}, or {{}}"
        )
        raise OptionError(
            problem.format("max_new_tokens", "max_new_tokens", "use truncate='left'"),
            option="truncate",
            cli=problem.format("--max-new-tokens", "--max-new-tokens", "pass --truncate left"),
        )
    return ids[over:], over, new


def prompt_ids(tokenizer: TokenizerLike, prompt: str | Sequence[int], vocab: int) -> list[int]:
    """A prompt's token ids, checked against the vocabulary. An empty prompt starts from
    bos (else eos), as unconditional generation does: <|endoftext|> for GPT-Neo. Raises
    ValueError (the one rule for generate, the scheduler, the server and batch jobs)."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise ValueError("the prompt is empty and the tokenizer has no bos token")
        ids = [start]
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise ValueError(
            f"the prompt has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}"
        )
    return ids


def _prepare_rows(
    model: Any,
    tokenizer: TokenizerLike,
    prompts: Prompt | Sequence[Prompt],
    config: GenerationConfig,
) -> list[_Row]:
    """Tokenize, check and budget every prompt; raises before any model compute."""
    vocab = model.config.vocab_size
    positions = model.config.max_position_embeddings
    rows: list[_Row] = []
    normalized = _normalize_prompts(prompts)
    _check_batch_memory(model, len(normalized) * config.num_return_sequences)
    for index, prompt in enumerate(normalized):
        try:
            ids = prompt_ids(tokenizer, prompt, vocab)
        except ValueError as exc:
            if len(normalized) == 1:
                raise
            raise ValueError(f"prompt {index}: {exc}") from None
        kept, dropped, new = _budget(ids, config, positions)
        for _ in range(config.num_return_sequences):
            rows.append(
                _Row(
                    prompt_index=index,
                    prompt_ids=kept,
                    max_new=new,
                    truncated=dropped,
                    decoder=tokenizer.stream_decoder(),
                    gate=StopGate(config.stop) if config.stop else None,
                    logprobs=[] if config.logprobs is not None else None,
                )
            )
    return rows


def _check_batch_memory(model: Any, sequences: int) -> None:
    """Refuse, before a row is built, more sequences at once than the device can hold: each
    needs at least its scores over the vocabulary (float32) and a key/value cache entry
    per layer and position (a lower bound: only one position is counted per layer)."""
    from .preflight import OutOfMemoryError, device_memory

    config = model.config  # any model with a config: sizes it lacks count as zero
    itemsize = getattr(getattr(model, "dtype", None), "itemsize", 4)
    layers, hidden = getattr(config, "num_layers", 0), getattr(config, "hidden_size", 0)
    per_row = 4 * getattr(config, "vocab_size", 0) + 2 * layers * hidden * itemsize
    needed = sequences * per_row
    try:
        total = device_memory(_model_device(model))
    except (AttributeError, StopIteration, TypeError):  # a stand-in without parameters
        return
    if total is not None and needed > total:
        raise OutOfMemoryError(
            f"out of memory: {sequences} sequences at once need more than "
            f"{needed / 1e9:.1f} GB but the device has {total / 1e9:.1f} GB; generate fewer "
            "at once (num_return_sequences, prompts per batch)"
        )


def _fit_groups(rows: list[_Row], positions: int) -> list[list[_Row]]:
    """Split rows into consecutive batches whose padded length fits the model's positions.

    Every row fits alone (checked by _budget); a batch needs max(prompt) + max(new).
    """
    groups: list[list[_Row]] = []
    current: list[_Row] = []
    longest = most_new = 0
    for row in rows:
        p, n = max(longest, len(row.prompt_ids)), max(most_new, row.max_new)
        if current and p + n > positions:
            groups.append(current)
            current, p, n = [], len(row.prompt_ids), row.max_new
        current.append(row)
        longest, most_new = p, n
    if current:
        groups.append(current)
    return groups


# ---- the engine ----------------------------------------------------------------------------


CancelCheck = Callable[[], bool]
Deltas = list[tuple[int, str]]


def _cancel_check(cancel: Any) -> CancelCheck | None:
    """Accept a threading.Event (or anything with is_set) or a callable returning bool."""
    if cancel is None:
        return None
    if hasattr(cancel, "is_set"):
        return cancel.is_set
    if callable(cancel):
        return cancel
    raise TypeError("cancel must be a threading.Event or a callable returning bool")


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _new_seed() -> int:
    return random.SystemRandom().randrange(2**32)


class _Engine:
    """Runs one batch of rows to completion; `run()` yields deltas and returns the rows."""

    def __init__(
        self,
        model: Any,
        tokenizer: TokenizerLike,
        rows: list[_Row],
        config: GenerationConfig,
        seed: int | None,
        cancelled: CancelCheck | None,
    ) -> None:
        self.model, self.tokenizer, self.rows, self.config = model, tokenizer, rows, config
        self.seed, self.cancelled = seed, cancelled
        self.started = 0.0
        eos = {tokenizer.eos_id, getattr(model.config, "eos_token_id", None)}
        self.eos_ids = sorted(t for t in eos if t is not None)
        self.stop_at_eos = set() if config.ignore_eos else set(self.eos_ids)
        self.interrupted = False
        # Batch state, set up by _prefill and updated per step.
        self.active = list(range(len(rows)))  # active[j]: index in self.rows of batch row j
        self.step = 0
        self.prompt_len = 0
        self.prefill_s = self.prefill_start = 0.0
        self.device = torch.device("cpu")
        self.choose: TokenChooser | None = None
        self.history: torch.Tensor | None = None
        self.no_history = torch.empty(0, 0, dtype=torch.long)
        self.next_pos: torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self.cache: Any = None
        self.chosen = torch.empty(0, dtype=torch.long)
        # Speculative decoding (one row only): the loop and the target's rule.
        self.spec: Any = None
        self.spec_rule: Any = None

    def run(self) -> Generator[Deltas, None, list[_Row]]:
        """Yield each step's deltas; return the rows once all are finished or cancelled."""
        self.started = time.perf_counter()
        if self.cancelled is not None and self.cancelled():
            return self._finish_all("cancelled")
        try:
            yield from self._loop()
        except KeyboardInterrupt:
            self.interrupted = True
        except RuntimeError as exc:  # an allocation that failed mid-way (a huge batch)
            if is_out_of_memory(exc):
                raise MemoryError(
                    f"out of memory while generating ({len(self.rows)} sequences at once)"
                ) from exc
            raise
        return self._finish_all("cancelled")

    def _loop(self) -> Generator[Deltas, None, None]:
        # Compute runs inside inference_mode blocks that never span a yield, so the
        # caller's code between steps never runs with autograd silently switched off.
        with torch.inference_mode():
            logits = self._prefill()
        if self.spec is not None:
            yield from self.spec.run(logits)
            return
        while True:
            with torch.inference_mode():
                deltas, keep = self._choose(logits)
            yield deltas
            if not keep or (self.cancelled is not None and self.cancelled()):
                return
            with torch.inference_mode():
                logits = self._decode(keep)

    def _prefill(self) -> torch.Tensor:
        """Set up the batch state and run the prompt through the model in one pass."""
        config, model, rows = self.config, self.model, self.rows
        device = self.device = _model_device(model)
        batch = len(rows)
        prompt_len = self.prompt_len = max(len(r.prompt_ids) for r in rows)
        total = prompt_len + max(r.max_new for r in rows)
        pad_id = self.eos_ids[0] if self.eos_ids else 0

        ids = torch.full((batch, prompt_len), pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, prompt_len - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
        ids = ids.to(device)
        mask = None
        if any(len(r.prompt_ids) != prompt_len for r in rows):
            lengths = torch.tensor([len(r.prompt_ids) for r in rows], device=device)
            mask = torch.arange(prompt_len, device=device)[None] >= (prompt_len - lengths)[:, None]
            # Left padding: each row's next position is its own length, not the batch's.
            self.next_pos = lengths[:, None].clone()

        self.choose, needs_history = build_chooser(config, self.eos_ids)
        if needs_history:
            self.history = torch.full((batch, total), PAD, dtype=torch.long, device=device)
            self.history[:, :prompt_len] = ids if mask is None else ids.masked_fill(~mask, PAD)
        if not config.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed)

        # The last token is never fed back, so the cache needs one position less.
        if config.speculative and batch == 1:
            self._start_speculation(total - 1)
        else:
            self.cache = model.new_cache(batch, total - 1)
        self.prefill_start = time.perf_counter()
        out = model(ids, attention_mask=mask, cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _start_speculation(self, length: int) -> None:
        """A cache with ring room for rejected drafts, the drafter and the verify loop."""
        from . import speculative

        k = self.config.draft_tokens
        self.cache = self.model.new_cache(1, length, spare=k)
        self.spec_rule = speculative.TargetRule(
            self.config, self.eos_ids, self.prompt_len, self.generator
        )
        drafter = speculative.drafter_for(self, length)
        self.spec = speculative.SpeculativeLoop(self, drafter, k)

    def take(self, row: _Row, token: int, logits: torch.Tensor) -> str:
        """Take one verified token into a (speculating) row: what `_choose` does for one."""
        if self.config.logprobs is not None:
            chosen = torch.tensor([token], device=logits.device)
            self._record_logprobs(logits, chosen, [token])
        self.step += 1
        return self._accept(row, token, self.step, time.perf_counter())

    def _choose(self, logits: torch.Tensor) -> tuple[Deltas, list[int]]:
        """Pick each active row's next token and take it in; return (deltas, rows to keep)."""
        history = self.history
        state = DecodeState(
            history[:, : self.prompt_len + self.step] if history is not None else self.no_history,
            self.prompt_len,
        )
        finite = all_finite(logits)  # read after the sync below, at no extra wait
        try:
            chosen = self.choose(logits, state, self.generator)
            tokens = chosen.tolist()  # the one device->host sync per step
        except RuntimeError:  # sampling from NaN probabilities: say why, below
            if bool(finite):
                raise
            tokens = []
        if not bool(finite):
            raise non_finite_scores()
        now = time.perf_counter()
        if self.step == 0:
            self.prefill_s = now - self.prefill_start
        if self.config.logprobs is not None:
            self._record_logprobs(logits, chosen, tokens)
        if self.history is not None:
            self.history[:, self.prompt_len + self.step] = chosen
        self.step += 1
        self.chosen = chosen

        deltas: Deltas = []
        keep: list[int] = []
        rows = self.rows
        for j, token in enumerate(tokens):
            index = self.active[j]
            delta = self._accept(rows[index], token, self.step, now)
            if delta:
                deltas.append((index, delta))
            if rows[index].finish_reason is None:
                keep.append(j)
        return deltas, keep

    def _decode(self, keep: list[int]) -> torch.Tensor:
        """Drop finished rows, then feed the chosen tokens back for one step."""
        step_ids = self.chosen[:, None]
        if len(keep) < len(self.active):
            index = torch.tensor(keep, device=self.device)
            self.cache.keep_rows(index)
            step_ids = step_ids.index_select(0, index)
            if self.history is not None:
                self.history = self.history.index_select(0, index)
            if self.next_pos is not None:
                self.next_pos = self.next_pos.index_select(0, index)
            self.active = [self.active[j] for j in keep]
        out = self.model(step_ids, position_ids=self.next_pos, cache=self.cache)
        if self.next_pos is not None:
            self.next_pos += 1
        return out.logits[:, -1].float()

    def _accept(self, row: _Row, token: int, step: int, now: float) -> str:
        """Take one new token into a row; return the text it releases (maybe "")."""
        if step == 1:
            row.first_token_at = now
        row.token_ids.append(token)
        if token in self.stop_at_eos:
            return self._finish(row, "eos", now)
        return push_text(row, token, now, at_length=step >= row.max_new)

    def _finish(self, row: _Row, reason: FinishReason, now: float, delta: str = "") -> str:
        return finish_text(row, reason, now, delta)

    def _finish_all(self, reason: FinishReason) -> list[_Row]:
        """Cancellation: unfinished rows end here, with the text released so far."""
        now = time.perf_counter()
        for row in self.rows:
            if row.finish_reason is None:
                row.finish_reason, row.finished_at = reason, now
        return self.rows

    def _record_logprobs(
        self, logits: torch.Tensor, chosen: torch.Tensor, tokens: list[int]
    ) -> None:
        logp = logits.log_softmax(dim=-1)
        picked = logp.gather(-1, chosen[:, None])[:, 0].tolist()
        top_n = self.config.logprobs or 0
        top_values: list[list[float]] = []
        top_ids: list[list[int]] = []
        if top_n:
            top = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for j, index in enumerate(self.active):
            row_logprobs = self.rows[index].logprobs
            if row_logprobs is None:
                continue
            alternatives = (
                [TokenLogprob(t, v) for t, v in zip(top_ids[j], top_values[j], strict=True)]
                if top_n
                else []
            )
            row_logprobs.append(TokenLogprob(tokens[j], picked[j], top=alternatives))

    def results(self) -> list[GenerationResult]:
        return [self._result(row) for row in self.rows]

    def _result(self, row: _Row) -> GenerationResult:
        n = len(row.token_ids)
        first = row.first_token_at
        decode_s = max(row.finished_at - first, 0.0) if n else 0.0
        prefill_s = self.prefill_s
        timings = Timings(
            ttft_s=first - self.started if n else 0.0,
            prompt_tok_s=len(row.prompt_ids) / prefill_s if prefill_s > 0 else 0.0,
            gen_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            prefill_s=prefill_s,
            decode_s=decode_s,
            total_s=max(row.finished_at - self.started, 0.0),
        )
        if row.logprobs:
            decode = self.tokenizer.decode
            for item in row.logprobs:
                item.token = decode([item.token_id])
                for alt in item.top:
                    alt.token = decode([alt.token_id])
        return GenerationResult(
            text="".join(row.pieces),
            token_ids=row.token_ids,
            finish_reason=row.finish_reason or "cancelled",
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=n,
            timings=timings,
            seed=self.seed,
            truncated_tokens=row.truncated,
            logprobs=row.logprobs,
            prompt_index=row.prompt_index,
            drafted=self.spec.drafted if self.spec is not None else 0,
            accepted=self.spec.accepted if self.spec is not None else 0,
        )


def _engines(
    model: Any,
    tokenizer: TokenizerLike,
    prompts: Prompt | Sequence[Prompt],
    config: GenerationConfig | None,
    cancel: Any,
) -> list[_Engine]:
    config = config if config is not None else GenerationConfig()
    config.validate()
    check = _cancel_check(cancel)
    rows = _prepare_rows(model, tokenizer, prompts, config)
    seed = None if config.greedy else (config.seed if config.seed is not None else _new_seed())
    if config.speculative:
        # Drafts are verified one sequence at a time: each row is its own batch of one. The
        # draft model loads here, so a bad one fails before any compute.
        if config.draft_model is not None:
            from .speculative import load_draft

            load_draft(model, config.draft_model, tokenizer=tokenizer)
        return [_Engine(model, tokenizer, [row], config, seed, check) for row in rows]
    groups = _fit_groups(rows, model.config.max_position_embeddings)
    return [_Engine(model, tokenizer, g, config, seed, check) for g in groups]


# ---- public API ------------------------------------------------------------------------------


def generate(
    model: Any,
    tokenizer: TokenizerLike,
    prompts: Prompt | Sequence[Prompt],
    config: GenerationConfig | None = None,
    *,
    cancel: Any = None,
) -> list[GenerationResult]:
    """Generate for one prompt or many (text or token ids), as one left-padded batch.

    Returns one result per prompt (num_return_sequences per prompt, consecutive), in prompt
    order. Prompts are checked and budgeted before any compute. `cancel` (a threading.Event
    or a callable) is checked between tokens; Ctrl-C is caught too. Either way the partial
    results come back with finish_reason "cancelled": callers should check for it.
    """
    config = config if config is not None else GenerationConfig()
    config.validate()
    rows = _prepare_rows(model, tokenizer, prompts, config)
    if len(rows) > 1 and _schedulable(model) and not config.speculative:
        seed = None if config.greedy else (config.seed if config.seed is not None else _new_seed())
        return _generate_scheduled(model, tokenizer, rows, config, seed, _cancel_check(cancel))
    results: list[GenerationResult] = []
    interrupted = False
    for engine in _engines(model, tokenizer, prompts, config, cancel):
        if interrupted:  # Ctrl-C ended an earlier batch: the rest end unstarted
            engine.cancelled = lambda: True
        run = engine.run()
        try:
            while True:
                next(run)
        except StopIteration:
            pass
        interrupted = interrupted or engine.interrupted
        results.extend(engine.results())
    return results


def _schedulable(model: Any) -> bool:
    """Whether the continuous-batching scheduler can run this model (a GPTNeo causal LM
    whose body runs with an attention step: the reference and the fast layout)."""
    base = getattr(model, "base", None)
    return callable(base) and hasattr(base(), "run") and hasattr(model, "lm_head")


def _generate_scheduled(
    model: Any,
    tokenizer: TokenizerLike,
    rows: list[_Row],
    config: GenerationConfig,
    seed: int | None,
    cancelled: CancelCheck | None,
) -> list[GenerationResult]:
    """Many sequences through the scheduler (gptneo_cli.scheduler): each row leaves the
    batch as soon as it is done, and its result does not depend on the others. Sample j of
    a prompt draws from seed + j, so a prompt gives the same text alone or among others."""
    from .scheduler import Request, Scheduler

    scheduler = Scheduler(
        model,
        tokenizer,
        max_running=len(rows),
        max_queue=len(rows),
        prefill_chunk=max(len(r.prompt_ids) for r in rows),
        prefill_rows=len(rows),
        prefill_budget=sum(len(r.prompt_ids) for r in rows),
        background=False,
        positions=max(len(r.prompt_ids) + r.max_new for r in rows),
    )
    sample: dict[int, int] = {}
    requests: list[Request] = []
    for row in rows:
        j = sample[row.prompt_index] = sample.get(row.prompt_index, -1) + 1
        requests.append(
            Request(
                row.prompt_ids,
                config,
                row.max_new,
                truncated=row.truncated,
                seed=None if seed is None else seed + j,
            )
        )
    for request in requests:
        scheduler.submit(request)
    scheduler.drive(requests, cancelled)  # on this thread; Ctrl-C ends every row
    results = []
    for row, request in zip(rows, requests, strict=True):
        result = request.wait(0)
        result.prompt_index = row.prompt_index
        result.seed = seed
        results.append(result)
    return results


class Stream:
    """Text deltas of one generation, as they are produced; then the final result.

    Iterate it for str deltas (never empty, never containing a stop string or its start);
    joined they equal `result.text`. `result` is set once iteration has ended. `close()`
    stops early (finish_reason "cancelled") and returns the result; leaving a `with` block
    does the same. Ctrl-C during generation ends the iteration with a "cancelled" result.
    """

    def __init__(self, engine: _Engine, extra_cancel: list[bool]) -> None:
        self._engine = engine
        self._run = engine.run()
        self._stop_requested = extra_cancel
        self._result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while self._result is None:
            try:
                deltas = next(self._run)
            except StopIteration:
                self._result = self._engine.results()[0]
                break
            text = "".join(d for _, d in deltas)
            if text:
                return text
        raise StopIteration

    @property
    def done(self) -> bool:
        return self._result is not None

    @property
    def result(self) -> GenerationResult:
        if self._result is None:
            raise RuntimeError("the stream is still running: iterate it to the end or close() it")
        return self._result

    def close(self) -> GenerationResult:
        """Stop generating (if still running) and return the result so far."""
        if self._result is None:
            self._stop_requested[0] = True
            for _ in self:
                pass
        return self.result

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stream(
    model: Any,
    tokenizer: TokenizerLike,
    prompt: Prompt,
    config: GenerationConfig | None = None,
    *,
    cancel: Any = None,
) -> Stream:
    """Start generating for one prompt and return a `Stream` of text deltas.

    Validation, tokenizing and the context budget happen here, before any compute, so
    errors raise from this call; the model runs as the stream is iterated.
    """
    config = config if config is not None else GenerationConfig()
    if config.num_return_sequences != 1:
        raise ValueError("num_return_sequences must be 1 when streaming (use generate())")
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if not isinstance(prompt, str) and not (
        isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt)
    ):
        raise ValueError("stream() takes one prompt: text or a list of token ids")
    requested = [False]
    user_check = _cancel_check(cancel)

    def stop_requested() -> bool:
        return requested[0] or (user_check is not None and bool(user_check()))

    (engine,) = _engines(model, tokenizer, prompt, config, stop_requested)
    return Stream(engine, requested)
