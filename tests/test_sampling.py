"""Each sampling rule against its transformers logits-processor counterpart, and the sampler."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation import logits_process as tlp

from gptneo_cli import sampling
from gptneo_cli.options import GenerationConfig
from gptneo_cli.sampling import DecodeState, build_chooser, build_logits_processor


def rules(**settings):
    """A GenerationConfig with every rule off unless given (greedy unless do_sample)."""
    base = dict(do_sample=False, temperature=1.0, top_k=0)
    return GenerationConfig(**{**base, **settings})


VOCAB = 37  # not a multiple of 8


def same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal within 1e-6, with -inf in exactly the same places."""
    assert ours.shape == theirs.shape
    assert torch.equal(torch.isneginf(ours), torch.isneginf(theirs))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def logit_cases() -> list[torch.Tensor]:
    """Random logits, logits with ties, and logits with -inf entries."""
    g = torch.Generator().manual_seed(1234)
    plain = torch.randn(4, VOCAB, generator=g) * 3
    ties = torch.randint(-3, 4, (4, VOCAB), generator=g).float()
    with_inf = torch.randn(4, VOCAB, generator=g) * 2
    with_inf[:, ::3] = -math.inf
    peaked = torch.randn(4, VOCAB, generator=g)
    peaked[:, 5] = 30.0  # one token holds nearly all the mass
    return [plain, ties, with_inf, peaked]


CASES = logit_cases()
CASE_IDS = ["random", "ties", "neg-inf", "peaked"]
DUMMY_IDS = torch.zeros(4, 1, dtype=torch.long)


@pytest.mark.parametrize("logits", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_temperature_matches_transformers(logits: torch.Tensor, temperature: float) -> None:
    theirs = tlp.TemperatureLogitsWarper(temperature)(DUMMY_IDS, logits.clone())
    same(sampling.apply_temperature(logits, temperature), theirs)


def test_temperature_rejects_zero() -> None:
    with pytest.raises(ValueError, match="temperature"):
        sampling.apply_temperature(torch.zeros(1, 3), 0.0)


@pytest.mark.parametrize("logits", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("k", [1, 2, 5, VOCAB - 1, VOCAB, VOCAB + 50])
def test_top_k_matches_transformers(logits: torch.Tensor, k: int) -> None:
    theirs = tlp.TopKLogitsWarper(k)(DUMMY_IDS, logits.clone())
    same(sampling.top_k_filter(logits, k), theirs)


def test_top_k_larger_than_vocab_keeps_everything() -> None:
    logits = CASES[0]
    assert torch.equal(sampling.top_k_filter(logits, VOCAB + 50), logits)


def test_top_k_keeps_ties_at_the_boundary() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    out = sampling.top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[True, False, True, True, False]]


@pytest.mark.parametrize("logits", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.9, 0.999, 1.0])
def test_top_p_matches_transformers(logits: torch.Tensor, p: float) -> None:
    theirs = tlp.TopPLogitsWarper(p)(DUMMY_IDS, logits.clone())
    same(sampling.top_p_filter(logits, p), theirs)


def test_top_p_one_keeps_everything() -> None:
    assert torch.equal(sampling.top_p_filter(CASES[2], 1.0), CASES[2])


def test_top_p_keeps_at_least_one_token() -> None:
    out = sampling.top_p_filter(CASES[3], 1e-9)
    assert torch.isfinite(out).sum(dim=-1).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("logits", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(logits: torch.Tensor, min_p: float) -> None:
    theirs = tlp.MinPLogitsWarper(min_p)(DUMMY_IDS, logits.clone())
    same(sampling.min_p_filter(logits, min_p), theirs)


@pytest.mark.parametrize("logits", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mass", [0.05, 0.2, 0.5, 0.9, 0.999])
def test_typical_matches_transformers(logits: torch.Tensor, mass: float) -> None:
    theirs = tlp.TypicalLogitsWarper(mass)(DUMMY_IDS, logits.clone())
    same(sampling.typical_filter(logits, mass), theirs)


def histories() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    small_vocab = torch.randint(0, 6, (4, 30), generator=g)  # many repeated n-grams
    wide = torch.randint(0, VOCAB, (4, 25), generator=g)
    looping = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2], [4, 4, 4, 4, 4, 4, 4, 4]] * 2)
    return [small_vocab, wide, looping]


HISTORIES = histories()
HISTORY_IDS = ["small-vocab", "wide", "looping"]


@pytest.mark.parametrize("history", HISTORIES, ids=HISTORY_IDS)
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
@pytest.mark.parametrize("logits", CASES, ids=CASE_IDS)
def test_repetition_penalty_matches_transformers(
    history: torch.Tensor, penalty: float, logits: torch.Tensor
) -> None:
    theirs = tlp.RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    same(sampling.repetition_penalty(logits, history, penalty), theirs)


def test_repetition_penalty_ignores_left_padding_like_transformers() -> None:
    """PAD (-1) columns behave as transformers' prompt_ignore_length for padded rows."""
    history = HISTORIES[1].clone()
    pads = torch.tensor([0, 3, 7, 1])
    padded = history.clone()
    for row, n in enumerate(pads.tolist()):
        padded[row, :n] = sampling.PAD
    proc = tlp.RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=pads)
    theirs = proc(history, CASES[0].clone())
    same(sampling.repetition_penalty(CASES[0], padded, 1.5), theirs)


def test_repetition_penalty_window_looks_only_at_recent_tokens() -> None:
    history = HISTORIES[1]
    theirs = tlp.RepetitionPenaltyLogitsProcessor(1.4)(history[:, -5:], CASES[0].clone())
    same(sampling.repetition_penalty(CASES[0], history, 1.4, window=5), theirs)
    # and the window really changes something compared with the full history
    full = sampling.repetition_penalty(CASES[0], history, 1.4)
    assert not torch.equal(full, sampling.repetition_penalty(CASES[0], history, 1.4, window=5))


@pytest.mark.parametrize("history", HISTORIES, ids=HISTORY_IDS)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers(history: torch.Tensor, n: int) -> None:
    logits = CASES[0]
    theirs = tlp.NoRepeatNGramLogitsProcessor(n)(history, logits.clone())
    same(sampling.no_repeat_ngram(logits, history, n), theirs)


def test_no_repeat_ngram_bans_the_repeating_token() -> None:
    history = torch.tensor([[5, 6, 7, 5, 6]])
    out = sampling.no_repeat_ngram(torch.zeros(1, 10), history, 3)
    assert torch.isneginf(out).nonzero()[:, 1].tolist() == [7]


def test_no_repeat_ngram_never_matches_padding() -> None:
    # the padded row must behave exactly like the same row without padding
    history = torch.tensor([[-1, -1, -1, 3, 4, 3], [1, 3, 4, 3, 3, 4]])
    out = sampling.no_repeat_ngram(torch.zeros(2, 10), history, 2)
    alone = sampling.no_repeat_ngram(torch.zeros(1, 10), history[:1, 3:], 2)
    same(out[:1], alone)


def test_presence_and_frequency_penalties() -> None:
    logits = torch.zeros(2, 6)
    generated = torch.tensor([[1, 1, 1, 4], [-1, 2, 5, 5]])
    out = sampling.presence_frequency_penalty(logits, generated, presence=0.5, frequency=0.25)
    expected = torch.tensor(
        [
            [0.0, -(0.5 + 3 * 0.25), 0.0, 0.0, -(0.5 + 0.25), 0.0],
            [0.0, 0.0, -(0.5 + 0.25), 0.0, 0.0, -(0.5 + 2 * 0.25)],
        ]
    )
    same(out, expected)


@pytest.mark.parametrize("generated", [0, 2, 3, 5])
def test_min_new_tokens_matches_transformers(generated: int) -> None:
    prompt = HISTORIES[1][:, :10]
    history = HISTORIES[1][:, : 10 + generated]
    proc = build_logits_processor(rules(min_new_tokens=3), (4, 9))
    assert proc is not None
    theirs = tlp.MinNewTokensLengthLogitsProcessor(prompt.shape[1], 3, [4, 9])(
        history, CASES[0].clone()
    )
    same(proc(CASES[0], DecodeState(history, prompt.shape[1])), theirs)


def test_nothing_active_builds_no_processor() -> None:
    assert build_logits_processor(rules(temperature=0.5, top_k=3)) is None
    assert build_logits_processor(rules(do_sample=True)) is None
    assert build_logits_processor(rules(do_sample=True, temperature=0, top_k=3)) is None


FULL = rules(
    do_sample=True,
    temperature=0.7,
    top_k=20,
    top_p=0.9,
    min_p=0.05,
    typical_p=0.95,
    repetition_penalty=1.3,
    no_repeat_ngram_size=3,
    min_new_tokens=20,
)


@pytest.mark.parametrize("logits", CASES, ids=CASE_IDS)
def test_composition_matches_transformers_order(logits: torch.Tensor) -> None:
    history = HISTORIES[0]
    prompt_len = 20
    ours = build_logits_processor(FULL, (2,))
    theirs = tlp.LogitsProcessorList(
        [
            tlp.RepetitionPenaltyLogitsProcessor(1.3),
            tlp.NoRepeatNGramLogitsProcessor(3),
            tlp.MinNewTokensLengthLogitsProcessor(prompt_len, 20, [2]),
            tlp.TemperatureLogitsWarper(0.7),
            tlp.TopKLogitsWarper(20),
            tlp.TopPLogitsWarper(0.9),
            tlp.MinPLogitsWarper(0.05),
            tlp.TypicalLogitsWarper(0.95),
        ]
    )
    assert ours is not None
    same(ours(logits, DecodeState(history, prompt_len)), theirs(history, logits.clone()))


def test_greedy_ignores_warpers() -> None:
    proc = build_logits_processor(rules(repetition_penalty=2.0, top_k=1))
    history = torch.tensor([[3]])
    logits = torch.tensor([[0.0, 1.0, 0.0, 1.5]])
    assert proc is not None
    out = proc(logits, DecodeState(history, 1))
    assert sampling.greedy(out).tolist() == [1]  # 1.5 / 2 < 1.0
    assert torch.isfinite(out).all()  # no top-k filtering in greedy mode


WARPS = [
    dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.95),
    dict(top_k=5),
    dict(top_k=3, top_p=0.5),
    dict(top_k=1),
    dict(top_k=VOCAB + 3, top_p=0.8),
    dict(top_p=0.8, min_p=0.1),
    dict(temperature=1.3, typical_p=0.5),
]


@pytest.mark.parametrize("logits", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("settings", WARPS)
def test_fast_warp_equals_the_full_vocabulary_rules(logits: torch.Tensor, settings) -> None:
    """warp() may cut to top-k candidates; scattered back it equals the reference rules."""
    reference = build_logits_processor(rules(do_sample=True, **settings))
    assert reference is not None
    expected = reference(logits, DecodeState(DUMMY_IDS, 1))
    warped, ids = sampling.warp(logits, **settings)
    if ids is not None:
        full = torch.full_like(logits, -math.inf)
        warped = full.scatter(-1, ids, warped)
    same(warped, expected)


def test_warp_keeps_every_token_tied_at_the_top_k_cut() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]])
    warped, ids = sampling.warp(logits, top_k=2)
    assert ids is None  # the tie forced the full-vocabulary path
    assert torch.isfinite(warped).tolist() == [[True, False, True, True, False, True]]


def test_chooser_greedy_and_sampling() -> None:
    logits = CASES[0]
    history = HISTORIES[1][:, :10]
    params = rules(repetition_penalty=1.5, no_repeat_ngram_size=2)
    choose, needs_history = build_chooser(params)
    reference = build_logits_processor(params)
    assert needs_history and reference is not None
    state = DecodeState(history, 5)
    assert torch.equal(choose(logits, state, None), reference(logits, state).argmax(-1))
    choose, needs_history = build_chooser(rules(do_sample=True, top_k=1))
    assert not needs_history
    assert torch.equal(choose(logits, state, torch.Generator()), logits.argmax(-1))


def test_seeded_sampling_is_reproducible() -> None:
    logits = CASES[0].repeat(50, 1)
    draws = [sampling.sample(logits, torch.Generator().manual_seed(s)) for s in (11, 11, 12)]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_sampling_never_picks_filtered_tokens() -> None:
    logits = sampling.top_k_filter(CASES[0][:1].expand(2000, VOCAB), 3)
    drawn = sampling.sample(logits, torch.Generator().manual_seed(0))
    allowed = set(torch.topk(CASES[0][0], 3).indices.tolist())
    assert set(drawn.tolist()) <= allowed


# Chi-square critical value for 5 degrees of freedom at significance 0.001 (from the
# chi-square table; scipy.stats.chi2.ppf(0.999, 5) = 20.515).
CHI2_CRITICAL_DF5_P001 = 20.515


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_frequencies_match_softmax_over_temperature() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    temperature = 0.7
    draws = 20_000
    scaled = sampling.apply_temperature(logits.expand(draws, 6), temperature)
    drawn = sampling.sample(scaled, torch.Generator().manual_seed(2024))
    counts = torch.bincount(drawn, minlength=6).double()
    target = torch.softmax(logits.double() / temperature, dim=-1)
    assert chi_square(counts, target) < CHI2_CRITICAL_DF5_P001
    # the test has power: the same counts reject the untempered distribution
    assert chi_square(counts, torch.softmax(logits.double(), dim=-1)) > CHI2_CRITICAL_DF5_P001


# Critical value for 2 degrees of freedom at significance 0.001: 13.816.
CHI2_CRITICAL_DF2_P001 = 13.816


def test_top_k_candidate_sampling_matches_the_filtered_softmax() -> None:
    """The fast path (sampling among top-k candidates) draws from the right distribution."""
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    draws = 20_000
    choose, _ = build_chooser(rules(do_sample=True, temperature=0.8, top_k=3))
    state = DecodeState(torch.zeros(draws, 1, dtype=torch.long), 1)
    drawn = choose(logits.expand(draws, 6), state, torch.Generator().manual_seed(7))
    counts = torch.bincount(drawn, minlength=6).double()
    assert counts[[2, 3, 4]].sum() == 0  # outside the top 3: never drawn
    kept = torch.tensor([5, 0, 1])
    target = torch.softmax(logits[kept].double() / 0.8, dim=-1)
    assert chi_square(counts[kept], target) < CHI2_CRITICAL_DF2_P001
