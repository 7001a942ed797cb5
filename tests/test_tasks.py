"""classify / zero-shot / tag / answer against transformers on random-weight tiny checkpoints.

Every checkpoint is written by transformers' save_pretrained with a tiny byte-level BPE
tokenizer trained here, then loaded by our loader; transformers' own model on the same
folder is the oracle. `make_checkpoint` is shared with test_cli_tasks.py.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import transformers
from helpers_cli import trained_bpe_json
from tokenizers import Tokenizer

from gptneo_cli import tasks

EOT = "<|endoftext|>"
CORPUS = [
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "The football match ended in a draw after extra time.",
    "Stocks fell sharply as the central bank raised interest rates.",
    "def add(a, b):\n    return a + b\n",
    "Alice met Bob in London on a rainy Tuesday morning.",
    "The new phone has a faster chip and a brighter screen.",
    "Héllo wörld, naïve café: ünïcode text with émojis 🙂 too.",
]
TAG_LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC", 5: "MISC"}
HEADS = {
    "sequence": "GPTNeoForSequenceClassification",
    "token": "GPTNeoForTokenClassification",
    "qa": "GPTNeoForQuestionAnswering",
    "causal": "GPTNeoForCausalLM",
}
TEXTS = [
    "Paris is the capital of France.",
    "The match ended in a draw",
    "Stocks fell.",
    "a",
    "Héllo café 🙂 wörld, rainy Tuesday in London",
]


@functools.cache
def tokenizer_json() -> str:
    """A GPT-2-style byte-level BPE (about 400 tokens), trained once per session."""
    return trained_bpe_json(CORPUS * 20, vocab_size=400)


def raw_tokenizer() -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json())


def make_checkpoint(
    folder: Path, head: str, *, scale: float = 0.0, seed: int = 0, **overrides
) -> torch.nn.Module:
    """Save a random transformers GPT-Neo with `head` plus tokenizer files into `folder`.

    `scale` > 0 redraws the Linear/Embedding weights with that std, so that argmax
    decisions (tags, answer spans) have clear margins and cannot flip on rounding.
    """
    tok = raw_tokenizer()
    eot = tok.token_to_id(EOT)
    settings = dict(
        vocab_size=tok.get_vocab_size() + 3,  # odd, and more rows than the tokenizer uses
        max_position_embeddings=64,
        hidden_size=24,
        num_layers=2,
        num_heads=3,
        intermediate_size=40,
        attention_types=[[["local", "global"], 1]],
        window_size=5,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )
    if head == "token":
        settings.update(id2label=TAG_LABELS, label2id={v: k for k, v in TAG_LABELS.items()})
    if head == "sequence":
        settings.update(
            id2label={0: "negative", 1: "neutral", 2: "positive"},
            label2id={"negative": 0, "neutral": 1, "positive": 2},
        )
    settings.update(overrides)
    config = transformers.GPTNeoConfig(**settings)
    torch.manual_seed(seed)
    model = getattr(transformers, HEADS[head])(config).eval()
    if scale:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                    module.weight.normal_(0.0, scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    tok.model.save(str(folder))  # vocab.json + merges.txt, for loaders that want them
    return model


def load_ours(folder: Path, head: str):
    from gptneo_cli import modeling
    from gptneo_cli.tokenizer import load_tokenizer

    return getattr(modeling, HEADS[head]).from_pretrained(folder), load_tokenizer(folder)


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seq")
    theirs = make_checkpoint(folder, "sequence", scale=0.3)
    return (*load_ours(folder, "sequence"), theirs)


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    theirs = make_checkpoint(folder, "causal", scale=0.3)
    return (*load_ours(folder, "causal"), theirs)


@pytest.fixture(scope="module")
def token(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    theirs = make_checkpoint(folder, "token", scale=0.5, max_position_embeddings=32)
    return (*load_ours(folder, "token"), theirs)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    theirs = make_checkpoint(folder, "qa", scale=0.3)
    return (*load_ours(folder, "qa"), theirs)


# ---- classify ---------------------------------------------------------------------------
def oracle_probs(theirs, ids: list[int]) -> torch.Tensor:
    """transformers on one unpadded input: its pooled logits, softmaxed."""
    with torch.no_grad():
        logits = theirs(torch.tensor([ids])).logits[0]
    return torch.softmax(logits.double(), dim=-1)


def test_classify_matches_transformers_per_input(sequence):
    model, tok, theirs = sequence
    results = tasks.classify(model, tok, TEXTS, batch_size=8)
    labels = ["negative", "neutral", "positive"]
    for text, result in zip(TEXTS, results, strict=True):
        want = oracle_probs(theirs, raw_tokenizer().encode(text).ids)
        got = torch.tensor([result.scores[lab] for lab in labels], dtype=torch.float64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert result.label == labels[int(want.argmax())]
        assert result.score == pytest.approx(float(want.max()), abs=1e-5)
        assert result.truncated_tokens == 0
    # the random head must not give every input the same verdict, or this proves little
    assert len({tuple(round(v, 3) for v in r.scores.values()) for r in results}) == len(TEXTS)


def test_classify_batched_equals_one_by_one(sequence):
    model, tok, _ = sequence
    batched = tasks.classify(model, tok, TEXTS, batch_size=3)
    for text, b in zip(TEXTS, batched, strict=True):
        (alone,) = tasks.classify(model, tok, [text], batch_size=1)
        assert alone.label == b.label
        for label, p in alone.scores.items():
            assert b.scores[label] == pytest.approx(p, abs=1e-6)


def test_classify_pools_last_token_even_when_it_is_the_pad_id(sequence):
    """A text ending in eos (= pad): we pool that eos, like transformers does for an
    unpadded input with no pad id; pad-id detection would pool the token before it."""
    model, tok, theirs = sequence
    text = "Stocks fell." + EOT
    ids = raw_tokenizer().encode(text).ids
    assert ids[-1] == theirs.config.pad_token_id
    (result,) = tasks.classify(model, tok, [text, "a much longer text to force padding"])[:1]
    theirs.config.pad_token_id = None
    try:
        want = oracle_probs(theirs, ids)
    finally:
        theirs.config.pad_token_id = raw_tokenizer().token_to_id(EOT)
    got = torch.tensor(list(result.scores.values()), dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want, oracle_probs(theirs, ids[:-1]), atol=1e-3)


def test_classify_truncates_long_input_to_max_seq_len(sequence):
    model, tok, theirs = sequence
    text = " ".join(CORPUS)
    ids = raw_tokenizer().encode(text).ids
    (result,) = tasks.classify(model, tok, [text], max_seq_len=20)
    assert result.truncated_tokens == len(ids) - 20
    want = oracle_probs(theirs, ids[:20])
    got = torch.tensor(list(result.scores.values()), dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_classify_rejects_empty_text(sequence):
    model, tok, _ = sequence
    with pytest.raises(ValueError, match="empty"):
        tasks.classify(model, tok, [""])


# ---- zero-shot --------------------------------------------------------------------------
def reference_zero_shot(
    theirs, text: str, labels: list[str], template: str, calibrate: bool = True
) -> list[float]:
    """Independent reference: transformers log-likelihoods of each label, one sequence at
    a time, calibrated by the empty-text prompt, softmaxed over labels."""
    raw = raw_tokenizer()
    bos = raw.token_to_id(EOT)

    def loglik(t: str, label: str) -> float:
        prefix = [bos] + raw.encode(template.replace("{text}", t)).ids
        sep = "" if template[-1].isspace() else " "
        cont = raw.encode(sep + label).ids
        with torch.no_grad():
            logits = theirs(torch.tensor([prefix + cont])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        return sum(float(logp[len(prefix) - 1 + k, c]) for k, c in enumerate(cont))

    scores = torch.tensor([loglik(text, lab) for lab in labels], dtype=torch.float64)
    if calibrate:
        scores -= torch.tensor([loglik("", lab) for lab in labels], dtype=torch.float64)
    return torch.softmax(scores, dim=0).tolist()


@pytest.mark.parametrize("template", [tasks.DEFAULT_TEMPLATE, "Text: {text}\nAbout: "])
def test_zero_shot_matches_transformers_loglikelihoods(causal, template):
    model, tok, theirs = causal
    labels = ["capital", "football match", "Stocks", "café 🙂"]  # multi-token labels too
    results = tasks.zero_shot(model, tok, TEXTS, labels, template=template, batch_size=5)
    for text, result in zip(TEXTS, results, strict=True):
        want = reference_zero_shot(theirs, text, labels, template)
        assert list(result.scores) == labels
        assert list(result.scores.values()) == pytest.approx(want, abs=1e-5)
        assert result.label == labels[max(range(len(labels)), key=want.__getitem__)]
    assert sum(results[0].scores.values()) == pytest.approx(1.0, abs=1e-9)


def test_zero_shot_uncalibrated_and_batch_size_one(causal):
    model, tok, theirs = causal
    labels = ["capital", "match"]
    results = tasks.zero_shot(model, tok, TEXTS[:2], labels, calibrate=False, batch_size=1)
    for text, result in zip(TEXTS[:2], results, strict=True):
        want = reference_zero_shot(theirs, text, labels, tasks.DEFAULT_TEMPLATE, calibrate=False)
        assert list(result.scores.values()) == pytest.approx(want, abs=1e-5)
        assert result.calibration is None


def test_zero_shot_calibration_is_content_free_loglik(causal):
    """Calibrating: the empty text's own probabilities come out uniform."""
    model, tok, _ = causal
    labels = ["capital", "match", "Stocks"]
    (result,) = tasks.zero_shot(model, tok, [""], labels)
    assert list(result.scores.values()) == pytest.approx([1 / 3] * 3, abs=1e-9)
    assert result.logprobs == pytest.approx(result.calibration, abs=1e-6)


def test_zero_shot_truncates_text_that_overflows(causal):
    model, tok, _ = causal
    (result,) = tasks.zero_shot(model, tok, [" ".join(CORPUS)], ["capital", "match"])
    assert result.truncated_tokens > 0
    assert sum(result.scores.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labels": []}, "labels"),
        ({"labels": ["a", "a"]}, "distinct"),
        ({"labels": ["a"], "template": "no slot"}, "template"),
        ({"labels": ["a", " "]}, "labels"),
    ],
)
def test_zero_shot_rejects_bad_values(causal, kwargs, match):
    model, tok, _ = causal
    with pytest.raises(ValueError, match=match):
        tasks.zero_shot(model, tok, ["x"], **kwargs)


# ---- tag --------------------------------------------------------------------------------
def test_merge_spans_iob_bioes_and_plain_labels():
    text = "Alice Smith met Bob in New York City today"
    words = [(0, 5), (5, 11), (11, 15), (15, 19), (19, 22), (22, 26), (26, 31), (31, 36), (36, 42)]
    labels = ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC", "I-LOC", "I-PER", "MISC"]
    spans = tasks.merge_spans(text, labels, words, [0.9, 0.7, 1, 0.8, 1, 0.6, 0.4, 0.5, 0.3])
    got = [(s.label, s.start, s.end, s.text) for s in spans]
    assert got == [
        ("PER", 0, 11, "Alice Smith"),
        ("PER", 16, 19, "Bob"),
        ("LOC", 23, 31, "New York"),
        ("PER", 32, 36, "City"),  # I-PER after LOC opens a new span
        ("MISC", 37, 42, "today"),
    ]
    assert spans[0].score == pytest.approx(0.8)
    # B-X right after X starts a new span; plain labels merge runs; S-/E- close spans
    labels = ["B-PER", "B-PER", "MISC", "MISC", "S-LOC", "I-LOC", "B-LOC", "E-LOC", "I-LOC"]
    got = [(s.label, s.text) for s in tasks.merge_spans(text, labels, words)]
    assert got == [
        ("PER", "Alice"),
        ("PER", "Smith"),
        ("MISC", "met Bob"),
        ("LOC", "in"),
        ("LOC", "New"),
        ("LOC", "York City"),
        ("LOC", "today"),
    ]


def same_spans(got: list[tasks.Span], want: list[tasks.Span]) -> None:
    assert [(s.label, s.start, s.end, s.text) for s in got] == [
        (s.label, s.start, s.end, s.text) for s in want
    ]
    assert [s.score for s in got] == pytest.approx([s.score for s in want], abs=1e-5)


def oracle_token_labels(theirs, ids: list[int]) -> tuple[list[str], list[float]]:
    with torch.no_grad():
        probs = torch.softmax(theirs(torch.tensor([ids])).logits[0].double(), dim=-1)
    p, best = probs.max(dim=-1)
    return [TAG_LABELS[int(i)] for i in best], p.tolist()


def test_tag_spans_follow_transformers_argmax(token):
    model, tok, theirs = token
    text = "Alice met Bob in London 🙂"
    enc = raw_tokenizer().encode(text)
    labels, probs = oracle_token_labels(theirs, enc.ids)
    assert len(set(labels)) > 2, "random head too uniform to test merging"
    spans = tasks.tag(model, tok, text)
    same_spans(spans, tasks.merge_spans(text, labels, enc.offsets, probs))
    assert spans, "expected at least one non-O span"
    for span in spans:
        assert text[span.start : span.end] == span.text


def test_tag_long_text_uses_windows_with_left_context(token):
    """Past max positions (32 here) each token is labelled from the first window holding
    it, which runs on the `stride` tokens before the window's new part."""
    model, tok, theirs = token
    text = " ".join(CORPUS[:5])
    enc = raw_tokenizer().encode(text)
    n, size, stride = len(enc.ids), 32, 6
    assert n > 2 * size
    labels, probs = [], []
    start, end = 0, size
    done = 0
    while done < n:
        window_labels, window_probs = oracle_token_labels(theirs, enc.ids[start:end])
        labels += window_labels[done - start :]
        probs += window_probs[done - start :]
        done = end
        start, end = end - stride, min(n, end - stride + size)
    spans = tasks.tag(model, tok, text, stride=stride)
    same_spans(spans, tasks.merge_spans(text, labels, enc.offsets, probs))
    assert len(spans) > 3


# ---- answer -----------------------------------------------------------------------------
def brute_force(start_logits, end_logits, q: int, max_tokens: int) -> tuple[float, int, int]:
    """Every (s, e) pair of context tokens, scored p(start) * p(end) over the context."""
    s_lp = torch.log_softmax(start_logits[q:].double(), dim=-1)
    e_lp = torch.log_softmax(end_logits[q:].double(), dim=-1)
    n = len(s_lp)
    return max(
        (math.exp(s_lp[s] + e_lp[e]), s, e)
        for s in range(n)
        for e in range(s, min(n, s + max_tokens))
    )


def test_answer_equals_brute_force_over_transformers_logits(qa):
    model, tok, theirs = qa
    question, context = "Where did Alice meet Bob?", "Alice met Bob in London on a Tuesday."
    raw = raw_tokenizer()
    q_ids = raw.encode(question + "\n").ids
    enc = raw.encode(context)
    for max_tokens in (1, 3, 30):
        with torch.no_grad():
            out = theirs(torch.tensor([q_ids + enc.ids]))
        score, s, e = brute_force(out.start_logits[0], out.end_logits[0], len(q_ids), max_tokens)
        got = tasks.answer(model, tok, question, context, max_answer_tokens=max_tokens)
        start, end = enc.offsets[s][0], enc.offsets[e][1]
        assert got.text == context[start:end].strip()
        assert context[got.start : got.end] == got.text
        assert got.score == pytest.approx(score, rel=1e-4)
        assert got.windows == 1


def test_answer_stride_finds_answer_past_first_window(tmp_path):
    """Plant a word whose first token wins the start logits and last token the end
    logits, far past the first window: only the sliding windows can find it."""
    folder = tmp_path / "qa-planted"
    theirs = make_checkpoint(folder, "qa", seed=3)
    raw = raw_tokenizer()
    question = "Where is it?"
    context = " ".join(CORPUS[1:4]) + " Germany " + " ".join(CORPUS[4:7])
    q_ids, enc = raw.encode(question + "\n").ids, raw.encode(context)
    where = context.index(" Germany") + 1
    first = next(i for i, (a, _) in enumerate(enc.offsets) if a == where - 1)
    last = next(i for i, (_, b) in enumerate(enc.offsets) if b == where + len("Germany"))
    pair = (enc.ids[first], enc.ids[last])
    assert first < last and all((q_ids + enc.ids).count(t) == 1 for t in pair)
    window = 64 - len(q_ids)
    assert first >= window, "the planted answer must lie past the first window"
    with torch.no_grad():  # huge, zero-mean, orthogonal embeddings that the QA head reads
        directions = torch.linalg.qr(torch.randn(theirs.config.hidden_size, 3))[0].T
        directions = directions[1:] - directions[1:].mean(dim=1, keepdim=True)
        directions /= directions.norm(dim=1, keepdim=True)
        for token, direction in zip(pair, directions, strict=True):
            theirs.transformer.wte.weight[token] = 50 * direction
        theirs.qa_outputs.weight[:] = 5 * directions
    theirs.save_pretrained(folder)
    model, tok = load_ours(folder, "qa")

    got = tasks.answer(model, tok, question, context, stride=16)
    assert (got.text, got.start, got.end) == ("Germany", where, where + len("Germany"))
    assert got.window >= 1 and got.windows >= 2
    # and it is exactly the best over transformers' windows, brute-forced
    best = None
    for w, (a, b) in enumerate(tasks._windows(len(enc.ids), window, 16)):
        with torch.no_grad():
            out = theirs(torch.tensor([q_ids + enc.ids[a:b]]))
        score, s, e = brute_force(out.start_logits[0], out.end_logits[0], len(q_ids), 30)
        if best is None or score > best[0]:
            best = (score, w, a + s, a + e)
    assert (got.window, best[2], best[3]) == (best[1], first, last)
    assert got.score == pytest.approx(best[0], rel=1e-4)
    assert got.score > 0.5


def test_windows_cover_everything_with_overlap():
    assert tasks._windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert tasks._windows(3, 4, 2) == [(0, 3)]
    assert tasks._windows(10, 4, 9) == [(0, 4), (2, 6), (4, 8), (6, 10)]  # stride capped
    with pytest.raises(ValueError, match="stride"):
        tasks._windows(10, 4, -1)


def test_answer_rejects_bad_values(qa):
    model, tok, _ = qa
    with pytest.raises(ValueError, match="question"):
        tasks.answer(model, tok, "  ", "context")
    with pytest.raises(ValueError, match="context"):
        tasks.answer(model, tok, "q?", "   ")
    with pytest.raises(ValueError, match="max_answer_tokens"):
        tasks.answer(model, tok, "q?", "context", max_answer_tokens=0)
    with pytest.raises(ValueError, match="question is"):
        tasks.answer(model, tok, "why " * 80, "context")
