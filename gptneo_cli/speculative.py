"""Speculative decoding for one sequence: draft k tokens cheaply, check them in one pass.

A drafter proposes up to k next tokens: `PromptLookup` copies them from where the last
n-gram of the context occurred before (free), `ModelDrafter` runs a smaller or quantized
GPT-Neo with the same tokenizer. The target model then reads the last token and the k
drafts in one forward pass (`SpeculativeLoop`), which costs about one decode step while
decoding is bound by reading the weights, and keeps the longest prefix it agrees with.

The output follows the target exactly:
- greedy: a draft is kept while it equals the target's own choice at its position, and the
  first disagreement is replaced by that choice, so the text is token-identical to plain
  decoding (up to float rounding between a k+1-row and a 1-row forward pass);
- sampling: the standard accept/reject rule (Leviathan et al. 2023, Chen et al. 2023): keep
  draft x with probability min(1, p(x)/q(x)), else draw from max(p - q, 0) renormalized
  (`residual`), and after k kept drafts draw one more token from p. The tokens are then
  distributed as the target's p, whatever q is (a prompt-lookup draft has q = one-hot).

Rejected tokens are taken back by `KVCache.truncate`; the cache is created with `spare=k`
so a local layer's ring buffer has room for them beyond the window (see cache.py).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import GPTNeoError
from .sampling import DecodeState, LogitsProcessor, make_logits_processors, warp

if TYPE_CHECKING:
    from .generation import _Engine

#: The draft model name that means "this model's own int8 copy".
SELF_INT8 = "self-int8"
#: Text whose tokens two tokenizers must agree on to share drafts.
_PROBE = "def main(argv):\n    return {'x': 1.5, \"y\": [None]}  # The quick brown fox ÄÖ"


class DraftError(GPTNeoError):
    """The draft model cannot draft for this model (not found, other tokenizer, ...)."""


# ---- drafters ------------------------------------------------------------------------------


class PromptLookup:
    """Drafts copied from the context: find the latest earlier occurrence of the context's
    last n tokens (n = ngram, then shorter) and propose the tokens that followed it.

    An index of every n-gram's latest continuation is kept up to date as tokens come, so a
    lookup costs O(ngram) rather than a scan of the context.
    """

    def __init__(self, ngram: int) -> None:
        self.ngram = ngram
        self.index: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # n-grams ending before this position are in the index

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to k drafted tokens, and None: a copied draft is certain (q is one-hot)."""
        last = len(tokens) - 1
        for end in range(self.indexed, last):  # every n-gram ending before the last token
            for n in range(1, min(self.ngram, end + 1) + 1):
                self.index[tuple(tokens[end - n + 1 : end + 1])] = end + 1
        self.indexed = max(self.indexed, last)
        for n in range(min(self.ngram, len(tokens)), 0, -1):
            start = self.index.get(tuple(tokens[len(tokens) - n :]))
            if start is not None:
                # A match close to the end runs into the draft itself: a loop of period p
                # (start = len - p) goes on repeating, as copying token by token would.
                drafts: list[int] = []
                for j in range(start, start + k):
                    drafts.append(tokens[j] if j < len(tokens) else drafts[j - len(tokens)])
                return drafts, None
        return [], None

    def commit(self, tokens: Sequence[int]) -> None:
        """Nothing to take back: the index only ever holds committed tokens."""


class ModelDrafter:
    """Drafts from a second GPT-Neo (same vocabulary): k one-token steps of its own, with
    the same sampling rules as the target, through its own cache that rolls back too."""

    def __init__(self, model: Any, rule: TargetRule, spare: int) -> None:
        self.model, self.rule, self.spare = model, rule, spare
        self.cache: Any = None
        self.fed: list[int] = []  # the tokens the draft cache holds, in order

    def start(self, length: int) -> None:
        self.cache = self.model.new_cache(1, length, spare=self.spare)
        self.fed = []

    def propose(self, tokens: Sequence[int], k: int) -> tuple[list[int], torch.Tensor | None]:
        """k drafted tokens; q [k, vocab] the probabilities they were drawn with (None when
        greedy: a greedy draft is certain)."""
        device = self.model.device
        pending = list(tokens[len(self.fed) :])
        drafts: list[int] = []
        rows: list[torch.Tensor] = []
        for i in range(k):
            ids = torch.tensor([pending], dtype=torch.long, device=device)
            logits = self.model(ids, cache=self.cache, logits_to_keep=1).logits[0, -1:]
            self.fed.extend(pending)
            scores = self.rule.scores(logits.float(), list(tokens) + drafts, 1)
            if self.rule.greedy:
                token = int(scores[0].argmax())
            else:
                probs = self.rule.probs(scores)
                token = int(draw(probs, self.rule.generator)[0])
                rows.append(probs[0])
            drafts.append(token)
            if i < k - 1:
                pending = [token]
        return drafts, (torch.stack(rows) if rows else None)

    def commit(self, tokens: Sequence[int]) -> None:
        """Keep the cached tokens that the sequence kept; forget the rejected drafts."""
        keep = 0
        limit = min(len(self.fed), len(tokens) - 1)  # the last token is always fed anew
        while keep < limit and self.fed[keep] == tokens[keep]:
            keep += 1
        if keep < len(self.fed):
            self.cache.truncate(keep)
            del self.fed[keep:]


# ---- the target's rule: what plain decoding would do at each position ---------------------


class TargetRule:
    """The processors (penalties, no-repeat n-gram, min_new_tokens), then greedy or the
    sampling warpers, as plain decoding applies them, for every position of a draft."""

    def __init__(
        self,
        config: Any,
        eos_ids: Sequence[int],
        prompt_len: int,
        generator: torch.Generator | None,
    ) -> None:
        self.config, self.prompt_len, self.generator = config, prompt_len, generator
        self.greedy = bool(config.greedy)
        self.processors: list[LogitsProcessor] = make_logits_processors(config, eos_ids)

    def scores(self, logits: torch.Tensor, context: list[int], rows: int) -> torch.Tensor:
        """Processed logits [rows, vocab]: row i continues context[: len - rows + 1 + i]."""
        if not self.processors:
            return logits
        history = torch.tensor([context], dtype=torch.long, device=logits.device)
        base = len(context) - rows + 1
        out = []
        for i in range(rows):
            row = logits[i : i + 1]
            state = DecodeState(history[:, : base + i], self.prompt_len)
            for rule in self.processors:
                row = rule(row, state)
            out.append(row)
        return torch.cat(out)

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """Sampling probabilities over the whole vocabulary [rows, vocab] (float64)."""
        c = self.config
        warped, ids = warp(
            scores,
            temperature=c.temperature,
            top_k=c.top_k,
            top_p=c.top_p,
            min_p=c.min_p,
            typical_p=c.typical_p,
        )
        probs = warped.double().softmax(dim=-1)
        if ids is None:
            return probs
        return torch.zeros_like(scores, dtype=torch.float64).scatter_(-1, ids, probs)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[rows] one token per row of (unnormalized, non-negative) probabilities."""
    cumulative = probs.double().cumsum(dim=-1)
    u = torch.rand(
        (probs.shape[0], 1), generator=generator, dtype=torch.float64, device=_on(generator)
    )
    u = u.to(probs.device)
    picked = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True)
    return picked.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def _on(generator: torch.Generator | None) -> torch.device:
    """Where random numbers are drawn: on the generator's device (a row's generator lives
    on the model's device in the scheduler and the engine; CPU draws from a CUDA generator
    fail)."""
    return generator.device if generator is not None else torch.device("cpu")


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where to draw from after a rejected draft: max(p - q, 0) (renormalized by `draw`).
    Adding it to the kept drafts' share gives back exactly p."""
    return (p - q).clamp_(min=0)


def verify(
    scores: torch.Tensor,
    drafts: list[int],
    q: torch.Tensor | None,
    rule: TargetRule,
) -> tuple[int, int]:
    """(drafts kept, the token after them) from the target's processed logits [k+1, vocab].

    Greedy: keep drafts while they equal the target's argmax. Sampling: keep draft i with
    probability min(1, p_i(x)/q_i(x)); on rejection draw from residual(p_i, q_i); after all
    k draw from p_k. q None means every draft was certain (q_i(x) = 1).
    """
    k = len(drafts)
    if rule.greedy:
        choices = scores.argmax(dim=-1).tolist()
        kept = 0
        while kept < k and drafts[kept] == choices[kept]:
            kept += 1
        return kept, choices[kept]
    p = rule.probs(scores)
    if k:
        index = torch.tensor(drafts, device=p.device)[:, None]
        p_draft = p[:k].gather(-1, index)[:, 0]
        q_draft = torch.ones_like(p_draft) if q is None else q.gather(-1, index)[:, 0]
        u = torch.rand(k, generator=rule.generator, dtype=torch.float64, device=_on(rule.generator))
        u = u.to(p.device)
        rejected = (u * q_draft >= p_draft).tolist()
        for i, no in enumerate(rejected):
            if no:
                q_i = torch.zeros_like(p[i]).index_fill_(0, index[i], 1.0) if q is None else q[i]
                rest = residual(p[i], q_i.to(p.dtype))
                if not bool(rest.sum() > 0):  # rounding: p == q, nothing is left
                    rest = p[i]
                return i, int(draw(rest[None], rule.generator)[0])
    return k, int(draw(p[k : k + 1], rule.generator)[0])


# ---- the loop ------------------------------------------------------------------------------


class SpeculativeLoop:
    """Runs one row of an engine with drafts: draft, verify in one pass, keep, roll back."""

    def __init__(self, engine: _Engine, drafter: PromptLookup | ModelDrafter, k: int) -> None:
        self.engine, self.drafter, self.k = engine, drafter, k
        self.drafted = self.accepted = 0

    def run(self, logits: torch.Tensor) -> Generator[list[tuple[int, str]], None, None]:
        """Yield the deltas of each verify step; `logits` are the prefill's last row."""
        engine = self.engine
        row = engine.rows[0]
        with torch.inference_mode():
            deltas, keep = engine._choose(logits)  # the first token, as plain decoding
        yield deltas
        tokens = list(row.prompt_ids) + list(row.token_ids)
        while keep and not (engine.cancelled is not None and engine.cancelled()):
            with torch.inference_mode():
                deltas, keep = self._step(row, tokens)
            yield deltas

    def _step(self, row: Any, tokens: list[int]) -> tuple[list[tuple[int, str]], bool]:
        """One draft + verify; extends `tokens` with what was kept. Returns (deltas, going)."""
        engine = self.engine
        k = min(self.k, row.max_new - len(row.token_ids) - 1)
        drafts, q = self.drafter.propose(tokens, k) if k > 0 else ([], None)
        ids = torch.tensor([tokens[-1:] + drafts], dtype=torch.long, device=engine.device)
        past = engine.cache.length
        logits = engine.model(ids, cache=engine.cache).logits[0].float()
        from .generation import all_finite, non_finite_scores

        if not bool(all_finite(logits)):
            raise non_finite_scores()
        rule = engine.spec_rule
        kept, after = verify(rule.scores(logits, tokens + drafts, len(drafts) + 1), drafts, q, rule)
        engine.cache.truncate(past + 1 + kept)
        self.drafted += len(drafts)
        self.accepted += kept
        deltas: list[tuple[int, str]] = []
        for i, token in enumerate([*drafts[:kept], after]):
            delta = engine.take(row, token, logits[i : i + 1])
            tokens.append(token)
            if delta:
                deltas.append((0, delta))
            if row.finish_reason is not None:
                return deltas, False
        self.drafter.commit(tokens)
        return deltas, True


# ---- draft models --------------------------------------------------------------------------


def attach_draft(target: Any, name: str, draft: Any) -> None:
    """Make `draft` the model that `draft_model=name` means for `target` (checked first)."""
    check_draft(target, draft, name)
    target.__dict__.setdefault("_gptneo_drafts", {})[name] = draft


def load_draft(
    target: Any,
    name: str,
    *,
    tokenizer: Any = None,
    folder: str | Path | None = None,
    revision: str | None = None,
) -> Any:
    """The draft model `name` for `target`, loaded on first use (on target's device and
    dtype) and kept with it. `self-int8`: target's own checkpoint (`folder`, default the
    folder it was loaded from) quantized to int8. With `tokenizer` (target's), the draft's
    tokenizer must agree with it."""
    drafts = target.__dict__.setdefault("_gptneo_drafts", {})
    if name in drafts:
        return drafts[name]
    from .loader import load_folder, resolve

    draft_tokenizer = None
    try:
        if name == SELF_INT8:
            from .fast import FastCausalLM

            folder = folder or getattr(target, "source_folder", None)
            if folder is None:
                raise DraftError(
                    "self-int8 drafts with this model's own int8 copy, but the folder it was "
                    "loaded from is unknown: load it with gptneo_cli.load"
                )
            draft = FastCausalLM.from_pretrained(
                folder, dtype=target.dtype, device=target.device, quantize="int8"
            )
        else:
            draft, draft_tokenizer = load_folder(
                resolve(name, revision), dtype=target.dtype, device=target.device
            )
    except DraftError:
        raise
    except GPTNeoError as exc:
        raise DraftError(
            f"draft model {name}: {exc}", cli=f"--draft-model {name}: {exc.cli or exc}"
        ) from None
    check_draft(target, draft, name)
    if draft_tokenizer is not None and tokenizer is not None:
        if not _same_tokenizer(tokenizer, draft_tokenizer):
            raise _mismatch(name, "its tokenizer differs from the model's")
    attach_draft(target, name, draft)
    return draft


def loaded_draft(target: Any, name: str | None) -> Any:
    """The draft model `name` already loaded (or attached) for `target`, or None."""
    if name is None:
        return None
    return getattr(target, "__dict__", {}).get("_gptneo_drafts", {}).get(name)


def check_draft(target: Any, draft: Any, name: str) -> None:
    """Refuse a draft whose vocabulary differs from the target's."""
    mine, theirs = target.config.vocab_size, draft.config.vocab_size
    if mine != theirs:
        raise _mismatch(name, f"its vocabulary has {theirs} tokens, the model's {mine}")


def _mismatch(name: str, why: str) -> DraftError:
    problem = f"{{}} {name} cannot draft for this model: {why} (it needs the same tokenizer)"
    return DraftError(problem.format("draft model"), cli=problem.format("--draft-model"))


def _same_tokenizer(a: Any, b: Any) -> bool:
    return a.vocab_size == b.vocab_size and a.encode(_PROBE) == b.encode(_PROBE)


def drafter_for(engine: _Engine, length: int) -> PromptLookup | ModelDrafter:
    """The drafter the engine's config asks for, ready for a sequence of `length` steps."""
    config = engine.config
    if config.prompt_lookup:
        return PromptLookup(config.prompt_lookup)
    draft = load_draft(engine.model, config.draft_model)
    positions = draft.config.max_position_embeddings
    if length > positions:
        raise DraftError(
            f"draft model {config.draft_model} has {positions} positions, this generation "
            f"needs {length}: generate fewer tokens or use another draft model",
            cli=f"--draft-model {config.draft_model} has {positions} positions, this "
            f"generation needs {length}: lower --max-new-tokens or use another draft model",
        )
    drafter = ModelDrafter(draft, engine.spec_rule, config.draft_tokens)
    drafter.start(length)
    return drafter
