"""Speculative decoding: greedy output token-identical to plain decoding (prompt lookup and
draft models, windows smaller than the drafts and the text), the accept/reject rule keeping
the target's distribution (a chi-square test a wrong rule fails), the ring cache's rollback,
and the options' validation."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from oracle import IdTokenizer

from gptneo_cli import speculative
from gptneo_cli.config import GPTNeoConfig
from gptneo_cli.fast import FastCausalLM
from gptneo_cli.generation import generate, stream
from gptneo_cli.modeling import GPTNeoForCausalLM
from gptneo_cli.options import GenerationConfig, OptionError

SHAPES = {
    # global and local layers, a window far smaller than the text and than some drafts
    "mixed": dict(
        vocab_size=61,
        hidden_size=32,
        num_layers=4,
        num_heads=2,
        attention_types=[[["global", "local"], 2]],
        window_size=8,
    ),
    "local_first": dict(
        vocab_size=61,
        hidden_size=24,
        num_layers=3,
        num_heads=3,
        attention_types=[[["local", "global"], 1], [["local"], 1]],
        window_size=5,
        intermediate_size=40,
    ),
    "local_only": dict(
        vocab_size=61,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        attention_types=[[["local"], 1]],
        window_size=4,
    ),
}


TOK = IdTokenizer()


def random_folder(tmp_path, shape: str, seed: int, std: float = 0.35, **overrides):
    """A random GPT-Neo checkpoint. A large weight std makes the distributions peaked, so
    greedy choices are clear (no near-ties that float rounding could flip)."""
    config = GPTNeoConfig(
        **{**SHAPES[shape], **overrides}, max_position_embeddings=160, bos_token_id=0
    )
    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" not in name:
                param.normal_(0.0, std)
    folder = tmp_path / f"{shape}-{seed}-{std}"
    model.save_pretrained(folder)
    return folder


def fast(folder, quantize=None):
    model = FastCausalLM.from_pretrained(folder, dtype=torch.float32, quantize=quantize)
    model.source_folder = folder
    return model


def greedy(**options) -> GenerationConfig:
    return GenerationConfig(do_sample=False, ignore_eos=True, **options)


PROMPT = [5, 9, 13, 5, 9, 14, 22, 5, 9, 13, 40, 41, 42, 5, 9]


# ---- greedy: token identity ---------------------------------------------------------------


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("k", [1, 3, 7])
def test_prompt_lookup_greedy_is_token_identical(tmp_path, shape, k):
    model = fast(random_folder(tmp_path, shape, seed=1))
    plain = generate(model, TOK, PROMPT, greedy(max_new_tokens=90))[0]
    spec = generate(model, TOK, PROMPT, greedy(max_new_tokens=90, prompt_lookup=3, draft_tokens=k))
    assert spec[0].token_ids == plain.token_ids
    assert spec[0].drafted > 0 and 0 < spec[0].accepted <= spec[0].drafted
    assert len(plain.token_ids) == 90


@pytest.mark.parametrize("shape", ["mixed", "local_first"])
def test_other_draft_model_keeps_greedy_output(tmp_path, shape):
    """A different random model drafts (low acceptance): the text is still the target's."""
    model = fast(random_folder(tmp_path, shape, seed=1))
    speculative.attach_draft(model, "other", fast(random_folder(tmp_path, shape, seed=2)))
    plain = generate(model, TOK, PROMPT, greedy(max_new_tokens=80))[0]
    spec = generate(model, TOK, PROMPT, greedy(max_new_tokens=80, draft_model="other"))[0]
    assert spec.token_ids == plain.token_ids
    assert spec.drafted > 0 and spec.accepted < spec.drafted


@pytest.mark.parametrize("k", [2, 6])
def test_self_int8_draft_keeps_greedy_output_and_is_mostly_accepted(tmp_path, k):
    folder = random_folder(tmp_path, "mixed", seed=3)
    model = fast(folder)
    plain = generate(model, TOK, PROMPT, greedy(max_new_tokens=100))[0]
    config = greedy(max_new_tokens=100, draft_model="self-int8", draft_tokens=k)
    spec = generate(model, TOK, PROMPT, config)[0]
    assert spec.token_ids == plain.token_ids
    assert spec.accepted / spec.drafted > 0.5


def test_reference_model_and_stream_and_penalties(tmp_path):
    """The reference model too; stream() speculates; history rules see the drafts."""
    folder = random_folder(tmp_path, "mixed", seed=4)
    model = GPTNeoForCausalLM.from_pretrained(folder)
    rules = dict(max_new_tokens=70, repetition_penalty=1.3, no_repeat_ngram_size=4)
    plain = generate(model, TOK, PROMPT, greedy(**rules))[0]
    run = stream(model, TOK, PROMPT, greedy(**rules, prompt_lookup=2, draft_tokens=4))
    text = "".join(run)
    assert run.result.token_ids == plain.token_ids
    assert text == plain.text and run.result.drafted > 0


def test_many_prompts_speculate_one_at_a_time(tmp_path):
    model = fast(random_folder(tmp_path, "local_first", seed=5))
    prompts = [PROMPT, PROMPT[:7], [3, 4, 3, 4, 3]]
    plain = generate(model, TOK, prompts, greedy(max_new_tokens=40))
    spec = generate(model, TOK, prompts, greedy(max_new_tokens=40, prompt_lookup=2))
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert all(r.drafted > 0 for r in spec)


def test_logprobs_and_stop_at_the_length_limit(tmp_path):
    model = fast(random_folder(tmp_path, "mixed", seed=6))
    plain = generate(model, TOK, PROMPT, greedy(max_new_tokens=33, logprobs=2))[0]
    spec = generate(model, TOK, PROMPT, greedy(max_new_tokens=33, logprobs=2, prompt_lookup=3))[0]
    assert spec.token_ids == plain.token_ids and len(spec.token_ids) == 33
    assert spec.finish_reason == "length"
    for a, b in zip(spec.logprobs, plain.logprobs, strict=True):
        assert a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t.token_id for t in a.top] == [t.token_id for t in b.top]


# ---- the ring cache rolls back -------------------------------------------------------------


def test_rejected_drafts_never_corrupt_the_ring(tmp_path):
    """Feed junk drafts, take them back, go on: every later logit equals a full forward."""
    folder = random_folder(tmp_path, "local_first", seed=7)
    model = fast(folder)
    ids = torch.randint(1, 61, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids).logits[0]
        k = 6
        cache = model.new_cache(1, 70, spare=k)
        model(ids[:, :10], cache=cache)
        pos = 10
        while pos < 60:
            junk = torch.randint(1, 61, (1, k), generator=torch.Generator().manual_seed(pos))
            step = torch.cat([ids[:, pos : pos + 1], junk], dim=1)
            out = model(step, cache=cache).logits[0]
            torch.testing.assert_close(out[0], full[pos], atol=1e-4, rtol=1e-4)
            cache.truncate(pos + 1)  # keep the real token, reject every junk draft
            pos += 1
            if pos % 3 == 0 and pos < 60:  # a plain one-token step in between
                out = model(ids[:, pos : pos + 1], cache=cache).logits[0, -1]
                torch.testing.assert_close(out, full[pos], atol=1e-4, rtol=1e-4)
                pos += 1


def test_the_compiled_steps_mask_skips_slots_outside_the_window(tmp_path):
    """The compiled one-token step (run eagerly here) over a ring larger than the window,
    after rejected drafts, gives the full forward's logits."""
    model = fast(random_folder(tmp_path, "mixed", seed=10))
    ids = torch.randint(1, 61, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(ids).logits[0]
        cache = model.new_cache(1, 48, spare=5)
        model(ids[:, :12], cache=cache)
        for pos in range(12, 40):
            if pos % 4 == 0:  # five junk drafts after the real token, then taken back
                junk = torch.full((1, 5), 7)
                model(torch.cat([ids[:, pos : pos + 1], junk], dim=1), cache=cache)
                cache.truncate(pos)
            step = torch.tensor([[pos]])
            logits = model._static_step(ids[:, pos : pos + 1], step, cache.keys, cache.values)
            cache.advance(1)
            torch.testing.assert_close(logits[0, -1], full[pos], atol=1e-4, rtol=1e-4)


def test_prompt_lookup_drafts_from_the_latest_match():
    lookup = speculative.PromptLookup(3)
    assert lookup.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3], 4)[0] == [7, 1, 2, 3]
    assert lookup.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3, 4, 4], 2)[0] == [4, 4]
    assert lookup.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 1, 2, 3, 4, 4, 8], 2)[0] == []
    # a match next to the end repeats its loop
    assert speculative.PromptLookup(2).propose([5, 6, 7, 6], 3)[0] == [7, 6, 7]


# ---- sampling keeps the target's distribution ----------------------------------------------

V = 8


def _markov(seed: int, concentration: float) -> torch.Tensor:
    """[V, V] next-token probabilities given the last token (every entry >= 0.02)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(V, V, generator=g, dtype=torch.float64) ** concentration + 0.05
    return table / table.sum(-1, keepdim=True)


P, Q = _markov(11, 3.0), _markov(12, 1.0)


def _sampled_pairs(runs: int, k: int, lookup: bool) -> torch.Tensor:
    """Counts [V, V] of the first two tokens after token 0 under speculative sampling, the
    target being the Markov chain P and the drafts from Q (or copied: a certain draft)."""
    config = GenerationConfig(temperature=1.0, top_k=0)
    counts = torch.zeros(V, V, dtype=torch.long)
    gen = torch.Generator().manual_seed(1234)
    rule = speculative.TargetRule(config, [], 0, gen)
    for _ in range(runs):
        tokens = [0]
        while len(tokens) < 3:
            drafts, rows = [], []
            last = tokens[-1]
            for _ in range(k):
                if lookup:
                    token = (last + 3) % V  # a deterministic guess
                else:
                    token = int(speculative.draw(Q[last][None], gen)[0])
                    rows.append(Q[last])
                drafts.append(token)
                last = token
            q = None if lookup else torch.stack(rows)
            context = tokens + drafts
            scores = P[torch.tensor(context[len(tokens) - 1 :])].log()
            kept, after = speculative.verify(scores, drafts, q, rule)
            tokens += [*drafts[:kept], after]
        counts[tokens[1], tokens[2]] += 1
    return counts


def _chi_square(counts: torch.Tensor) -> float:
    expected = (P[0][:, None] * P) * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


#: 63 degrees of freedom: mean 63, sd 11.2. 150 is ~7.8 sd out (p < 1e-10 by chance).
CHI2_LIMIT = 150.0
RUNS = 3000


@pytest.mark.parametrize("lookup", [False, True])
def test_speculative_sampling_keeps_the_target_distribution(lookup):
    counts = _sampled_pairs(RUNS, 3, lookup)
    assert _chi_square(counts) < CHI2_LIMIT


@pytest.mark.parametrize("wrong", ["p", "q"])
def test_a_wrong_rule_fails_the_distribution_test(monkeypatch, wrong):
    """The test can fail: after a rejection, drawing from p or from q instead of
    max(p - q, 0) skews the output far past the limit (chi-square ~700 and ~7000)."""
    monkeypatch.setattr(speculative, "residual", lambda p, q: (p if wrong == "p" else q).clone())
    assert _chi_square(_sampled_pairs(RUNS, 3, False)) > 2 * CHI2_LIMIT


def test_engine_sampling_with_a_draft_model_matches_the_target(tmp_path):
    """End to end: the engine's second and third tokens (drafted and verified) follow the
    target's exact joint distribution, computed from the model itself."""
    shape = dict(vocab_size=6, window_size=4)
    target = fast(random_folder(tmp_path, "mixed", seed=8, std=0.25, **shape))
    speculative.attach_draft(target, "d", fast(random_folder(tmp_path, "mixed", 9, 0.25, **shape)))
    prompt = [1, 2, 3]
    with torch.inference_mode():  # exact P(t1, t2, t3) by enumeration
        grid = torch.cartesian_prod(*[torch.arange(6)] * 3)
        ids = torch.cat([torch.tensor(prompt).expand(len(grid), 3), grid], dim=1)
        logp = target(ids).logits.double().log_softmax(-1)
        joint = sum(logp[:, 2 + j].gather(-1, grid[:, j : j + 1])[:, 0] for j in range(3)).exp()
    expected = joint.view(6, 6, 6).sum(0).flatten()  # P(t2, t3)
    runs = 400
    counts = torch.zeros(36, dtype=torch.float64)
    config = GenerationConfig(
        temperature=1.0, top_k=0, max_new_tokens=3, ignore_eos=True, draft_model="d"
    )
    accepted = 0
    for seed in range(runs):
        result = generate(target, IdTokenizerSmall(), prompt, config.replace(seed=seed))[0]
        counts[result.token_ids[1] * 6 + result.token_ids[2]] += 1
        accepted += result.accepted
    assert 0 < accepted < 2 * runs  # drafts were both kept and rejected
    expected = expected * runs
    big = expected >= 5
    chi2 = float(((counts[big] - expected[big]) ** 2 / expected[big]).sum())
    chi2 += float((counts[~big].sum() - expected[~big].sum()) ** 2 / max(expected[~big].sum(), 1))
    df = int(big.sum())
    assert chi2 < df + 7 * math.sqrt(2 * df)


class IdTokenizerSmall(IdTokenizer):
    vocab_size = 6


# ---- options and errors --------------------------------------------------------------------


def test_options_are_validated():
    with pytest.raises(OptionError, match="use one"):
        GenerationConfig(prompt_lookup=2, draft_model="x")
    with pytest.raises(OptionError, match="draft_tokens must be"):
        GenerationConfig(draft_tokens=0)
    with pytest.raises(OptionError, match="prompt_lookup must be"):
        GenerationConfig(prompt_lookup=-1)
    assert GenerationConfig(prompt_lookup=3).speculative
    assert not GenerationConfig().speculative


def test_a_draft_with_another_vocabulary_is_refused(tmp_path):
    model = fast(random_folder(tmp_path, "mixed", seed=1))
    other = fast(random_folder(tmp_path, "mixed", seed=2, vocab_size=67))
    with pytest.raises(speculative.DraftError, match="vocabulary has 67 tokens"):
        speculative.attach_draft(model, "other", other)


def test_a_missing_draft_model_is_a_clear_error(tmp_path):
    model = fast(random_folder(tmp_path, "mixed", seed=1))
    with pytest.raises(speculative.DraftError, match="draft model .*nowhere"):
        generate(model, TOK, PROMPT, greedy(draft_model=str(tmp_path / "nowhere")))


# ---- the CLI -------------------------------------------------------------------------------

SOURCE = str(Path(speculative.__file__).with_name("cache.py"))


def _cli(tmp_path, *args: str):
    from helpers_cli import run_cli

    return run_cli("generate", "--model", "tiny", "--device", "cpu", *args, home=tmp_path)


def test_cli_prompt_lookup_on_the_demo_model(tmp_path):
    """The demo model continuing Python source: same text, drafts reported by --stats."""
    common = ("--file", SOURCE, "--truncate", "left", "--greedy", "-n", "48", "--stats")
    plain = _cli(tmp_path, *common)
    spec = _cli(tmp_path, *common, "--prompt-lookup", "3")
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr.decode()
    assert spec.stdout == plain.stdout
    stats = spec.stderr.decode()
    line = next(x for x in stats.splitlines() if "speculative" in x)
    drafted, accepted = (int(w) for w in re.findall(r"(\d+) (?:drafted|accepted)", line))
    assert 0 < accepted <= drafted
    assert "speculative" not in plain.stderr.decode()


def test_cli_self_int8_draft_in_json(tmp_path):
    done = _cli(
        tmp_path, "def add(a, b):", "--greedy", "-n", "12", "--format", "json",
        "--draft-model", "self-int8", "--draft-tokens", "4",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    record = json.loads(done.stdout)
    assert record["speculative"]["drafted"] >= record["speculative"]["accepted"] > 0
    assert record["settings"]["draft_model"] == "self-int8"


def test_cli_bad_draft_models_are_one_line_errors(tmp_path, tmp_path_factory):
    from helpers_cli import causal_checkpoint

    other_vocab = causal_checkpoint(tmp_path_factory)
    cases = {
        str(tmp_path / "nowhere"): "--draft-model",
        str(other_vocab): "vocabulary has",
    }
    for name, expected in cases.items():
        done = _cli(tmp_path, "x = 1", "-n", "4", "--draft-model", name)
        err = done.stderr.decode()
        assert done.returncode != 0 and expected in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    both = _cli(tmp_path, "x", "--draft-model", "self-int8", "--prompt-lookup", "2")
    assert both.returncode == 2 and "use one" in both.stderr.decode()


def test_chat_speculates_and_reports_drafts(tmp_path):
    from helpers_cli import run_cli

    args = ("chat", "-m", "tiny", "--device", "cpu", "--format", "jsonl", "--greedy", "-n", "16")
    plain = run_cli(*args, home=tmp_path, input="def add(a, b):\n")
    spec = run_cli(*args, "--prompt-lookup", "2", home=tmp_path, input="def add(a, b):\n")
    assert spec.returncode == 0, spec.stderr.decode()
    record, before = json.loads(spec.stdout), json.loads(plain.stdout)
    assert record["reply"] == before["reply"] and record["tokens"] == 16
    assert record["speculative"]["drafted"] >= record["speculative"]["accepted"] > 0


def test_batch_has_prompt_lookup_flags_but_no_draft_model(tmp_path):
    """Batch runs the scheduler, which drafts by prompt lookup only (flag values checked
    as generate checks them); its output is the same as without drafts."""
    from helpers_cli import run_cli

    src = tmp_path / "p.txt"
    src.write_text("def add(a, b):\n    return a + b\n\ndef sub(a, b):\n")
    base = ("batch", str(src), "-m", "tiny", "-n", "24", "--temperature", "0")
    texts = []
    for extra in ((), ("--prompt-lookup", "3", "--draft-tokens", "6")):
        out = tmp_path / f"out{len(extra)}.jsonl"
        assert run_cli(*base, "-o", str(out), *extra, home=tmp_path).returncode == 0
        records = [json.loads(line) for line in out.open()]
        texts.append({r["custom_id"]: r["response"]["body"]["choices"][0]["text"] for r in records})
    assert len(texts[0]) == 3 and texts[0] == texts[1]  # three prompts (lines)
    bad = run_cli(*base, "-o", str(tmp_path / "x.jsonl"), "--draft-tokens", "0", home=tmp_path)
    assert bad.returncode == 2 and b"--draft-tokens" in bad.stderr
    done = run_cli(*base, "-o", str(tmp_path / "y.jsonl"), "--draft-model", "x", home=tmp_path)
    assert done.returncode == 2 and b"--draft-model" in done.stderr
