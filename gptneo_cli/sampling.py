"""Sampling rules: small pure functions on a logits tensor, and their composition.

Every rule takes float logits of shape [batch, vocab] and returns a new tensor of the
same shape; filtered tokens become -inf. Keeping each rule alone makes it testable
against its transformers counterpart, and keeps the decode loop free of special cases:
`make_logits_processors` and `make_sampler` (mlx-lm's shape) build, from a
GenerationConfig, only the rules it turns on, in the order transformers applies them, so a
step pays for nothing it does not use.

Token histories are LongTensors [batch, length] where -1 marks "no token" (left padding),
so padded rows of a batch are treated exactly like their unpadded selves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

NEG_INF = float("-inf")

#: History entries with this value are padding and never count as tokens.
PAD = -1


# ---- warpers (applied only when sampling) --------------------------------------------


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide by T: T < 1 sharpens the distribution, T > 1 flattens it."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature}")
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int, min_keep: int = 1) -> torch.Tensor:
    """Keep the k highest logits (and every token tied with the k-th); k >= vocab keeps all."""
    k = min(max(k, min_keep), logits.shape[-1])
    if k <= 0:
        return logits
    kth_value = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_value, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float, min_keep: int = 1) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of top tokens whose probability reaches p.

    Walks the distribution from the least likely token up and drops tokens while the mass
    dropped so far stays within 1 - p; the min_keep most likely tokens always survive.
    """
    if p >= 1.0:
        return logits
    ascending, order = torch.sort(logits, descending=False, dim=-1)
    mass_below = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_below <= (1.0 - p)
    drop_sorted[..., -min_keep:] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float, min_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    drop = probs < threshold
    keep_count = min(min_keep, probs.shape[-1])
    drop.scatter_(-1, torch.topk(probs, keep_count, dim=-1).indices, False)
    return logits.masked_fill(drop, NEG_INF)


def typical_filter(logits: torch.Tensor, mass: float, min_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy.

    Tokens are ranked by |-log p - H|; the most typical ones are kept until their
    probability reaches `mass`.
    """
    if mass >= 1.0:
        return logits
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
    distance = (-logp - entropy).abs()
    distance_sorted, order = torch.sort(distance, descending=False, dim=-1)
    mass_so_far = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    cutoff = (mass_so_far < mass).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
    drop_sorted = distance_sorted > distance_sorted.gather(-1, cutoff)
    drop_sorted[..., :min_keep] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


# ---- processors (applied in greedy decoding too) -------------------------------------


def _token_mask(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, vocab] bool: which tokens occur in each row of ids (PAD and ids >= vocab ignored)."""
    spare = ids.masked_fill((ids < 0) | (ids >= vocab_size), vocab_size)
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, spare, True)
    return mask[:, :vocab_size]


def _token_counts(ids: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[batch, vocab]: how often each token occurs in each row of ids (PAD ignored)."""
    spare = ids.masked_fill((ids < 0) | (ids >= vocab_size), vocab_size)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=dtype, device=ids.device)
    counts.scatter_add_(1, spare, torch.ones_like(spare, dtype=dtype))
    return counts[:, :vocab_size]


def repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: float, window: int = 0
) -> torch.Tensor:
    """CTRL's penalty: each token already seen is made less likely, once however often seen.

    A positive logit is divided by `penalty`, a negative one multiplied, so the token always
    loses ground for penalty > 1. `window` > 0 looks only at the last `window` tokens.
    """
    if window > 0:
        history = history[:, -window:]
    seen = _token_mask(history, logits.shape[-1])
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def presence_frequency_penalty(
    logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI-style additive penalties: subtract `presence` once for every token already
    generated and `frequency` per occurrence, so loops get steadily less likely."""
    counts = _token_counts(generated, logits.shape[-1], logits.dtype)
    penalty = counts * frequency
    if presence:
        penalty = penalty + (counts > 0).to(logits.dtype) * presence
    return logits - penalty


def no_repeat_ngram(logits: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid any token that would complete an n-gram already present in the history.

    The last n-1 tokens are compared with the first n-1 tokens of every n-token window;
    each matching window bans its last token.
    """
    length = history.shape[1]
    if n <= 0 or length < n:
        return logits
    vocab_size = logits.shape[-1]
    if n == 1:
        return logits.masked_fill(_token_mask(history, vocab_size), NEG_INF)
    tail = history[:, length - n + 1 :]
    windows = history.unfold(1, n, 1)  # [batch, length - n + 1, n]
    hits = (windows[..., :-1] == tail.unsqueeze(1)).all(dim=-1)
    hits &= (tail >= 0).all(dim=-1, keepdim=True)
    banned_ids = torch.where(hits, windows[..., -1], torch.full_like(windows[..., -1], PAD))
    return logits.masked_fill(_token_mask(banned_ids, vocab_size), NEG_INF)


def suppress_tokens(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Make the given token ids impossible (used to hold back eos before min_new_tokens)."""
    out = logits.clone()
    out[:, token_ids] = NEG_INF
    return out


# ---- choosing a token ------------------------------------------------------------------


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[batch] the most likely token per row."""
    return logits.argmax(dim=-1)


def sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch] one token per row drawn from softmax(logits); `generator` makes it repeatable.

    Inverse-CDF sampling: one uniform number per row against the cumulative probabilities
    (in float64, so a 50k vocabulary adds no visible rounding). On CPU this is over ten
    times faster than torch.multinomial over a full vocabulary.
    """
    # MPS has no float64; float32 there still rounds far below any probability that matters.
    dtype = torch.float32 if logits.device.type == "mps" else torch.float64
    cumulative = logits.softmax(dim=-1).to(dtype).cumsum(dim=-1)
    u = torch.rand((logits.shape[0], 1), generator=generator, dtype=dtype, device=logits.device)
    picked = torch.searchsorted(cumulative, u * cumulative[:, -1:], right=True)
    # u * total < total, so the index is always valid; clamp guards rounding at the very end
    return picked.clamp_(max=logits.shape[-1] - 1).squeeze(-1)


def warp(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    typical_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling warpers in transformers' order: temperature, top-k, top-p, min-p, typical.

    Returns (logits, ids). When ids is None the logits cover the whole vocabulary. Otherwise
    top-k has cut the vocabulary to k candidates: logits are theirs and ids their token ids
    (every other token is filtered). The later rules then sort k values instead of the
    vocabulary, with the same outcome: filtered tokens have zero probability either way.
    """
    if temperature != 1.0:
        logits = apply_temperature(logits, temperature)
    ids = None
    if 0 < top_k < logits.shape[-1]:
        values, indices = torch.topk(logits, top_k + 1, dim=-1)
        if bool((values[:, top_k] == values[:, top_k - 1]).any()):
            logits = top_k_filter(logits, top_k)  # a tie spans the cut: keep all tied tokens
        else:
            logits, ids = values[:, :top_k], indices[:, :top_k]
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    if min_p > 0.0:
        logits = min_p_filter(logits, min_p)
    if typical_p < 1.0:
        logits = typical_filter(logits, typical_p)
    return logits, ids


# ---- composition -----------------------------------------------------------------------


@dataclass
class DecodeState:
    """What the history-dependent rules need to know at one decode step.

    history: [batch, prompt_len + generated] token ids, PAD (-1) at left padding.
    prompt_len: the column where generated tokens start (the same for every row).
    """

    history: torch.Tensor
    prompt_len: int

    @property
    def generated(self) -> torch.Tensor:
        return self.history[:, self.prompt_len :]

    @property
    def num_generated(self) -> int:
        return self.history.shape[1] - self.prompt_len


LogitsProcessor = Callable[[torch.Tensor, DecodeState], torch.Tensor]
TokenChooser = Callable[[torch.Tensor, DecodeState, "torch.Generator | None"], torch.Tensor]
Sampler = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


class SamplingConfig(Protocol):
    """What the builders read: gptneo_cli.options.GenerationConfig has all of it."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    typical_p: float
    repetition_penalty: float
    repetition_window: int
    presence_penalty: float
    frequency_penalty: float
    no_repeat_ngram_size: int
    min_new_tokens: int


def make_logits_processors(
    config: SamplingConfig, eos_token_ids: Sequence[int] = ()
) -> list[LogitsProcessor]:
    """The rules applied in greedy decoding too, in transformers' order: repetition
    penalty, presence/frequency penalty (not in transformers; placed with the other
    penalties), no-repeat n-gram, eos suppression before min_new_tokens. Only the rules the
    config turns on, so a step pays for nothing it does not use."""
    rules: list[LogitsProcessor] = []
    if config.repetition_penalty != 1.0:
        penalty, window = config.repetition_penalty, config.repetition_window
        rules.append(lambda x, s: repetition_penalty(x, s.history, penalty, window))
    if config.presence_penalty or config.frequency_penalty:
        presence, frequency = config.presence_penalty, config.frequency_penalty

        def _presence(x: torch.Tensor, s: DecodeState) -> torch.Tensor:
            if s.num_generated == 0:
                return x
            return presence_frequency_penalty(x, s.generated, presence, frequency)

        rules.append(_presence)
    if config.no_repeat_ngram_size > 0:
        n = config.no_repeat_ngram_size
        rules.append(lambda x, s: no_repeat_ngram(x, s.history, n))
    if config.min_new_tokens > 0 and eos_token_ids:
        eos = torch.tensor(tuple(eos_token_ids), dtype=torch.long)
        minimum = config.min_new_tokens

        def _min_new(x: torch.Tensor, s: DecodeState) -> torch.Tensor:
            if s.num_generated >= minimum:
                return x
            return suppress_tokens(x, eos.to(x.device))

        rules.append(_min_new)
    return rules


def make_sampler(config: SamplingConfig) -> Sampler:
    """Choose one token per row from processed logits: argmax when greedy; else `warp`
    (temperature, top-k, top-p, min-p, typical-p) then `sample`, restricted to the top-k
    candidates when top-k is on, which is what makes it fast."""
    if config.greedy:
        return lambda logits, gen: greedy(logits)
    temperature, top_k, top_p = config.temperature, config.top_k, config.top_p
    min_p, typical_p = config.min_p, config.typical_p

    def choose(logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        logits, ids = warp(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
        )
        picked = sample(logits, gen)
        return picked if ids is None else ids.gather(-1, picked[:, None])[:, 0]

    return choose


def _compose(rules: list[LogitsProcessor]) -> LogitsProcessor | None:
    if not rules:
        return None
    if len(rules) == 1:
        return rules[0]

    def process(logits: torch.Tensor, state: DecodeState) -> torch.Tensor:
        for rule in rules:
            logits = rule(logits, state)
        return logits

    return process


def build_logits_processor(
    config: SamplingConfig, eos_token_ids: Sequence[int] = ()
) -> LogitsProcessor | None:
    """Every active rule as one full-vocabulary function: the processors, then, only when
    sampling, the warpers one by one. None when no rule is active. This is the reference
    composition the tests compare with transformers; `build_chooser` is its fast equivalent."""
    rules = make_logits_processors(config, eos_token_ids)
    if not config.greedy:
        c = config
        if c.temperature != 1.0:
            rules.append(lambda x, s: apply_temperature(x, c.temperature))
        if c.top_k > 0:
            rules.append(lambda x, s: top_k_filter(x, c.top_k))
        if c.top_p < 1.0:
            rules.append(lambda x, s: top_p_filter(x, c.top_p))
        if c.min_p > 0.0:
            rules.append(lambda x, s: min_p_filter(x, c.min_p))
        if c.typical_p < 1.0:
            rules.append(lambda x, s: typical_filter(x, c.typical_p))
    return _compose(rules)


def build_chooser(
    config: SamplingConfig, eos_token_ids: Sequence[int] = ()
) -> tuple[TokenChooser, bool]:
    """The engine's step: the processors, then the sampler; and whether it reads the
    token history (only the processors do)."""
    process = _compose(make_logits_processors(config, eos_token_ids))
    sampler = make_sampler(config)
    if process is None:
        return (lambda x, s, g: sampler(x, g)), False
    return (lambda x, s, g: sampler(process(x, s), g)), True
