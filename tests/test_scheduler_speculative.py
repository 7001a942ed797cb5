"""Speculative decoding (prompt lookup) in the continuous-batching scheduler.

Greedy: every row's tokens equal the same scheduler's without drafts, with rows joining and
leaving mid-run, rows that draft beside rows that do not, windows smaller than the text
and than the drafts (so a rejected draft written into a local ring would corrupt it), text
that repeats (drafts kept) and text that does not (drafts rejected). Sampling: the accept/
reject rule through the scheduler keeps the model's distribution (chi-square). Stop strings,
length limits, logprobs and streamed updates behave as without drafts.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from oracle import IdTokenizer

from gptneo_cli import speculative
from gptneo_cli.config import GPTNeoConfig
from gptneo_cli.generation import GenerationConfig
from gptneo_cli.modeling import GPTNeoForCausalLM
from gptneo_cli.rowcache import RowCache
from gptneo_cli.scheduler import Request, Scheduler, Update

SHAPES = {
    # a local layer first, then global; window 5 (smaller than most drafts)
    "local_first": dict(
        hidden_size=24,
        num_layers=3,
        num_heads=3,
        intermediate_size=40,
        attention_types=[[["local", "global"], 1], [["local"], 1]],
        window_size=5,
    ),
    # local layers only, window 3: every rejected draft would land in a slot still read
    "local_only": dict(
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        attention_types=[[["local"], 2]],
        window_size=3,
    ),
    "mixed": dict(
        hidden_size=32,
        num_layers=4,
        num_heads=2,
        attention_types=[[["global", "local"], 2]],
        window_size=4,
    ),
}


TOK = IdTokenizer()


def random_model(shape: str, seed: int, vocab: int = 61, std: float = 0.35):
    """Random weights; a large std makes greedy choices clear (no near-ties that float
    rounding between a one-token and a several-token pass could flip)."""
    config = GPTNeoConfig(
        **SHAPES[shape],
        vocab_size=vocab,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" not in name:
                param.normal_(0.0, std)
    return model


def loopy(shape: str, seed: int, scale: float = 0.3):
    """A random model that falls into loops (weak attention, faint positions): prompt
    lookup drafts are mostly kept, yet attention still shapes every choice."""
    model = random_model(shape, seed)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(0.1)
        for name, param in model.named_parameters():
            if "out_proj" in name:
                param.mul_(scale)
    return model


def greedy(**options) -> GenerationConfig:
    return GenerationConfig(do_sample=False, ignore_eos=True, **options)


def repeating(length: int, seed: int) -> list[int]:
    """A short random phrase said again and again: prompt lookup drafts get kept."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(1, 61, (3 + seed % 4,), generator=g).tolist()
    return (phrase * length)[:length]


def random_ids(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 61, (length,), generator=g).tolist()


#: (prompt, new tokens, the step it joins at, whether it drafts, draft_tokens)
ROWS = [
    (repeating(12, 1), 40, 0, True, 7),
    (random_ids(9, 2), 30, 0, True, 3),
    (random_ids(2, 3), 25, 1, False, 0),
    (repeating(30, 4), 20, 2, True, 5),
    (random_ids(17, 5), 45, 4, True, 1),
    (repeating(7, 6), 12, 6, False, 0),
    (random_ids(40, 7), 35, 9, True, 6),
    (repeating(22, 8), 50, 15, True, 4),
]


def lookup(i: int, k: int) -> dict:
    return dict(prompt_lookup=2, draft_tokens=k)


def drive(model, rows, speculate: bool, *, small_caches: bool = True, options=lookup) -> list:
    """Run `rows` by hand, joining at their steps; return the requests. options(i, k): the
    drafting options of row i."""
    sched = Scheduler(model, TOK, max_running=5, max_queue=16, prefill_chunk=8)
    sched._ensure_thread = lambda: None  # no thread: step() by hand
    if small_caches:  # rows and positions grow while rows run
        sched._cache = RowCache(model.config, 5, capacity=8, initial_rows=1)
        sched._pcache = RowCache(model.config, 5, capacity=4, initial_rows=1)
    reqs: list[Request] = []
    step = 0
    with torch.inference_mode():
        while step < 500:
            for i, (ids, new, at, drafts, k) in enumerate(rows):
                if at == step:
                    extra = options(i, k) if drafts and speculate else {}
                    reqs.append(sched.submit(Request(ids, greedy(**extra), new)))
            if len(reqs) == len(rows) and all(r.done for r in reqs):
                break
            sched.step()
            step += 1
    assert all(r.done for r in reqs)
    return reqs, sched


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["chaotic", "loopy"])
def test_greedy_prompt_lookup_is_token_identical_with_joins_and_leaves(shape, kind):
    """Chaotic models reject most drafts, loopy ones keep most."""
    model = random_model(shape, seed=11) if kind == "chaotic" else loopy(shape, seed=0)
    plain, _ = drive(model, ROWS, speculate=False)
    spec, sched = drive(model, ROWS, speculate=True)
    for i, (a, b) in enumerate(zip(plain, spec, strict=True)):
        assert b.result.token_ids == a.result.token_ids, f"row {i}"
        assert b.result.text == a.result.text
        assert b.result.finish_reason == "length"
    drafted = sum(r.result.drafted for r in spec)
    accepted = sum(r.result.accepted for r in spec)
    assert 0 < accepted < drafted  # some drafts kept, some rejected
    assert (sched.drafted_tokens_total, sched.accepted_tokens_total) == (drafted, accepted)
    assert all(r.result.drafted == 0 for r, row in zip(spec, ROWS, strict=True) if not row[3])


class Recording(Scheduler):
    """Records each verified run of tokens: (request id, the tokens kept in one step)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.runs: list[tuple[int, list[int]]] = []

    def _take_runs(self, seqs, runs, logits) -> None:
        self.runs += [(s.req.id, list(r)) for s, r in zip(seqs, runs, strict=True)]
        super()._take_runs(seqs, runs, logits)


def _run_all(model, configs, ids, max_new, cls=Scheduler, on_update=None):
    sched = cls(model, TOK, max_running=4, max_queue=64, background=False)
    reqs = [
        Request(ids, c, max_new, on_update=on_update(i) if on_update else None)
        for i, c in enumerate(configs)
    ]
    for r in reqs:
        sched.submit(r)
    sched.drive(reqs)
    sched.requests = reqs
    return [r.result for r in reqs], sched


def _cut_inside_a_run(sched: Recording, req_id: int, length: int) -> bool:
    """Whether the request's last token (of `length`) was kept in the middle of a run."""
    seen = 0
    for rid, run in sched.runs:
        if rid != req_id:
            continue
        if seen < length <= seen + len(run):
            return length < seen + len(run)
        seen += len(run)
    return False


def test_stop_strings_and_length_cut_inside_accepted_runs():
    model = loopy("local_first", seed=0)
    ids = repeating(14, 1)
    plain_all = _run_all(model, [greedy()], ids, 40)[0][0]
    assert plain_all.finish_reason == "length"
    words = plain_all.text.split(" ")[1:]
    # A stop string ending at each token: the text up to it is what both runs must give.
    stops = [" " + " ".join(words[i : i + 2]) + " " for i in range(1, 30)]
    plain = _run_all(model, [greedy(stop=[s]) for s in stops], ids, 40)[0]
    spec_configs = [greedy(stop=[s], prompt_lookup=2, draft_tokens=6) for s in stops]
    spec, sched = _run_all(model, spec_configs, ids, 40, cls=Recording)
    inside = 0
    for a, b in zip(plain, spec, strict=True):
        assert (b.text, b.token_ids, b.finish_reason) == (a.text, a.token_ids, a.finish_reason)
    # the stop strings' last token was kept from the middle of a verified run, sometimes
    for req, result in zip(sched.requests, spec, strict=True):
        inside += result.finish_reason == "stop" and _cut_inside_a_run(
            sched, req.id, len(result.token_ids)
        )
    assert inside >= 5
    assert sum(r.accepted for r in spec) > 0
    # length limits: every budget gives the plain tokens, never one more
    budgets = list(range(1, 25))
    for n in budgets:
        a = _run_all(model, [greedy()], ids, n)[0][0]
        b = _run_all(model, [greedy(prompt_lookup=2, draft_tokens=6)], ids, n)[0][0]
        assert (b.token_ids, b.finish_reason) == (a.token_ids, "length")
        assert len(b.token_ids) == n


def test_updates_logprobs_and_eos_match_plain_decoding():
    """Several tokens kept in one step are streamed one update each, in order, with their
    log-probabilities; an eos kept inside a run ends the row there."""
    model = random_model("mixed", seed=5)
    ids = repeating(20, 3)

    def collect(store):
        return lambda i: store.setdefault(i, []).append

    got: dict[int, list[Update]] = {}
    want: dict[int, list[Update]] = {}
    base = dict(logprobs=2, stop=[" 7 7"])
    plain, _ = _run_all(model, [greedy(**base)], ids, 30, on_update=collect(want))
    spec, _ = _run_all(
        model,
        [greedy(**base, prompt_lookup=3, draft_tokens=4)],
        ids,
        30,
        on_update=collect(got),
    )
    assert spec[0].accepted > 0
    assert [(u.token_id, u.text, u.finish_reason) for u in got[0]] == [
        (u.token_id, u.text, u.finish_reason) for u in want[0]
    ]
    assert "".join(u.text for u in got[0]) == spec[0].text == plain[0].text
    for a, b in zip(plain[0].logprobs, spec[0].logprobs, strict=True):
        assert a.token_id == b.token_id and a.token == b.token
        assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
        assert [t.token_id for t in b.top] == [t.token_id for t in a.top]
    # eos: not ignored, the row ends at the first eos the model picks
    eos_model = random_model("mixed", seed=5)
    with torch.no_grad():
        eos_model.lm_head.weight[0] = eos_model.lm_head.weight[plain[0].token_ids[9]]
    configs = [GenerationConfig(do_sample=False, **extra) for extra in ({}, {"prompt_lookup": 3})]
    a, b = (_run_all(eos_model, [c], ids, 30)[0][0] for c in configs)
    assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
    assert b.finish_reason == "eos" and len(b.token_ids) < 30


# ---- sampling: the model's distribution ------------------------------------------------------

SMALL = 6


def _exact_pairs(model, prompt: list[int]) -> torch.Tensor:
    """P(t2, t3) [36] of plain sampling at temperature 1, by enumeration."""
    with torch.inference_mode():
        grid = torch.cartesian_prod(*[torch.arange(SMALL)] * 3)
        ids = torch.cat([torch.tensor(prompt).expand(len(grid), len(prompt)), grid], dim=1)
        logp = model(ids).logits.double().log_softmax(-1)
        at = len(prompt) - 1
        joint = sum(logp[:, at + j].gather(-1, grid[:, j : j + 1])[:, 0] for j in range(3)).exp()
    return joint.view(SMALL, SMALL, SMALL).sum(0).flatten()


#: Sampling from the model's distribution, drafting by prompt lookup.
LOOKUP = GenerationConfig(temperature=1.0, top_k=0, ignore_eos=True, prompt_lookup=2)


def _chi2(
    model, prompt: list[int], runs: int, config: GenerationConfig = LOOKUP
) -> tuple[float, int, int]:
    """(chi-square, degrees of freedom, drafts kept) of the scheduler's sampled (t2, t3),
    drafting as `config` says, 1 or 2 tokens per step."""
    configs = [config.replace(seed=seed, draft_tokens=1 + seed % 2) for seed in range(runs)]
    sched = Scheduler(model, TOK, max_running=16, max_queue=runs, background=False)
    reqs = [Request(prompt, c, 3) for c in configs]
    for r in reqs:
        sched.submit(r)
    sched.drive(reqs)
    counts = torch.zeros(SMALL * SMALL, dtype=torch.float64)
    for r in reqs:
        counts[r.result.token_ids[1] * SMALL + r.result.token_ids[2]] += 1
    expected = _exact_pairs(model, prompt) * runs
    big = expected >= 5
    chi2 = float(((counts[big] - expected[big]) ** 2 / expected[big]).sum())
    rest = expected[~big].sum()
    chi2 += float((counts[~big].sum() - rest) ** 2 / max(rest, 1))
    return chi2, int(big.sum()), sched.accepted_tokens_total


def _small_model():
    return random_model("mixed", seed=8, vocab=SMALL, std=0.25)


PROMPT = [1, 2, 3, 1, 2, 3, 4, 1, 2]


def test_sampling_through_the_scheduler_keeps_the_models_distribution():
    chi2, df, accepted = _chi2(_small_model(), PROMPT, 600)
    assert accepted > 50  # drafts were kept (and, below the maximum, rejected)
    assert chi2 < df + 7 * math.sqrt(2 * df)


def test_a_wrong_accept_rule_fails_the_sampling_test(monkeypatch):
    """The test can fail: keeping every draft skews the distribution far past the limit."""
    from gptneo_cli import scheduler

    monkeypatch.setattr(scheduler, "verify", lambda s, d, q, rule: (len(d), int(s[-1].argmax())))
    chi2, df, _ = _chi2(_small_model(), PROMPT, 600)
    assert chi2 > 3 * (df + 7 * math.sqrt(2 * df))


# ---- draft models -----------------------------------------------------------------------------


def near_copy(model, seed: int, noise: float):
    """A draft that mostly agrees with `model`: its weights plus a little noise."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=g) * noise)
    return draft


@pytest.mark.parametrize("shape", ["local_first", "mixed"])
def test_greedy_draft_models_are_token_identical_beside_lookup_and_plain_rows(shape):
    model = random_model(shape, seed=11)
    speculative.attach_draft(model, "near", near_copy(model, 1, 0.003))
    speculative.attach_draft(model, "other", random_model(shape, seed=12))
    plain, _ = drive(model, ROWS, speculate=False)

    def options(i: int, k: int) -> dict:
        if i % 3 == 0:
            return dict(draft_model="near", draft_tokens=k)
        if i % 3 == 1:
            return dict(draft_model="other", draft_tokens=k)
        return lookup(i, k)

    spec, sched = drive(model, ROWS, speculate=True, options=options)
    for i, (a, b) in enumerate(zip(plain, spec, strict=True)):
        assert b.result.token_ids == a.result.token_ids, f"row {i}"
    near = [r.result for i, r in enumerate(spec) if ROWS[i][3] and i % 3 == 0]
    other = [r.result for i, r in enumerate(spec) if ROWS[i][3] and i % 3 == 1]
    assert sum(r.accepted for r in near) > 0.5 * sum(r.drafted for r in near)
    assert sum(r.accepted for r in other) < sum(r.drafted for r in other)


def test_a_draft_model_that_is_not_loaded_is_refused():
    sched = Scheduler(random_model("mixed", 1), TOK, background=False)
    with pytest.raises(ValueError, match="draft_model missing is not loaded"):
        sched.submit(Request([1, 2], greedy(draft_model="missing"), 4))


def _chi2_draft(runs: int) -> tuple[float, int, int]:
    """The same chi-square as above, with a draft model's sampled drafts (q not one-hot)."""
    model = _small_model()
    # a peaked draft, far from the model: many rejections, a residual far from p and q
    speculative.attach_draft(model, "d", random_model("mixed", seed=9, vocab=SMALL, std=0.8))
    return _chi2(model, PROMPT, runs, LOOKUP.replace(prompt_lookup=0, draft_model="d"))


def test_sampling_with_a_draft_model_keeps_the_models_distribution():
    chi2, df, accepted = _chi2_draft(600)
    assert 50 < accepted < 900  # drafts were kept and rejected
    assert chi2 < df + 7 * math.sqrt(2 * df)


def test_a_wrong_residual_fails_the_draft_model_sampling_test(monkeypatch):
    """After a rejection, drawing from q instead of max(p - q, 0) skews the output (the
    chi-square comes out ~300)."""
    monkeypatch.setattr(speculative, "residual", lambda p, q: q.clone())
    chi2, df, _ = _chi2_draft(600)
    assert chi2 > 2 * (df + 7 * math.sqrt(2 * df))
