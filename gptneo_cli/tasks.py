"""Classify, tag and answer on top of the GPT-Neo heads, and zero-shot classify by likelihood.

Every function takes an already loaded model and tokenizer, so the CLI, tests and Python
users share one code path. Batches are right-padded: GPT-Neo is causal, so real tokens
never see the pads to their right, and no row of the attention mask is ever empty. Pooling
and gathering go by the attention mask, never by `pad_token_id` (GPT-Neo's pad is its eos,
so a text that ends in eos would be pooled at the wrong token).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import TokenizerError

#: Zero-shot prompt. Labels are scored as " label" after it (see `label_continuation`).
DEFAULT_TEMPLATE = "{text}\nTopic:"
#: Longest answer `answer` returns, in tokens (as transformers' QA pipeline bounds it).
DEFAULT_MAX_ANSWER_TOKENS = 30
#: Tokens of left context a window repeats from the one before it.
DEFAULT_STRIDE = 128


# ---- results ------------------------------------------------------------------------------
@dataclass
class Classification:
    """One input's verdict: the best label, its probability, and every label's probability."""

    label: str
    score: float
    scores: dict[str, float]
    #: zero-shot only: each label's summed token log-likelihood after the prompt
    logprobs: dict[str, float] | None = None
    #: zero-shot only: the same for the content-free (empty text) prompt
    calibration: dict[str, float] | None = None
    #: how many tokens of the input were cut to fit the model's positions
    truncated_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "score": self.score, "scores": self.scores}
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
            out["calibration"] = self.calibration
        out["truncated_tokens"] = self.truncated_tokens
        return out


@dataclass
class Span:
    """A tagged stretch of text; start/end are character offsets into the original text."""

    label: str
    start: int
    end: int
    text: str
    #: mean probability of the chosen label over the span's tokens
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "score": self.score,
        }


@dataclass
class Answer:
    """The best answer span; start/end are character offsets into the context."""

    text: str
    start: int
    end: int
    #: p(start) * p(end), each a softmax over the context tokens of the winning window
    score: float
    #: which sliding window it came from (0 when the context fits in one)
    window: int = 0
    windows: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "start": self.start,
            "end": self.end,
            "score": self.score,
            "window": self.window,
            "windows": self.windows,
        }


# ---- shared helpers -----------------------------------------------------------------------
def _max_len(model: torch.nn.Module, max_seq_len: int | None) -> int:
    limit = int(model.config.max_position_embeddings)
    if max_seq_len is None:
        return limit
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    return min(max_seq_len, limit)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_id", None)
    return int(pad) if pad is not None else 0


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token rows into ids [B, T] and an attention mask [B, T] of 1/0 (also the
    batches head training runs)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Group row indices by similar length so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def encode_with_offsets(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and each token's (start, end) character span in `text`.

    Reads the offsets from the `tokenizers.Tokenizer` that our Tokenizer wraps (`.backend`).
    Byte-level BPE can split one character over several tokens; each of them then spans
    the whole character.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend", tokenizer)
    if not isinstance(backend, Tokenizer):
        raise TokenizerError("this tokenizer gives no character offsets; tag and answer need them")
    from .tokenizer import _check_utf8, _native

    _check_utf8(text)
    enc = _native(backend.encode, text, add_special_tokens=False)
    return list(enc.ids), [(int(a), int(b)) for a, b in enc.offsets]


def _windows(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) windows of `size` over n tokens; each repeats `stride` tokens of the last.

    The stride is capped at half the window so that every window brings new tokens.
    """
    if size < 1:
        raise ValueError(f"max_seq_len leaves no room for tokens (window size {size})")
    if stride < 0:
        raise ValueError(f"stride must be >= 0, got {stride}")
    stride = min(stride, size // 2)
    spans = [(0, min(n, size))]
    while spans[-1][1] < n:
        start = spans[-1][1] - stride
        spans.append((start, min(n, start + size)))
    return spans


def missing_head(folder: str | Path, model_cls: type) -> list[str]:
    """The head tensors `model_cls` needs that the checkpoint in `folder` lacks.

    The loader initialises a missing head randomly (so a causal LM can be fine-tuned into
    a classifier); a task run on such a head prints noise, so commands check first. Only
    safetensors are inspected (their names cost nothing to read); .bin gives [].
    """
    from .weights import stored_names

    names = stored_names(Path(folder))
    if names is None:
        return []
    return [name for name in model_cls.head_params if name not in names]


#: The model class of a checkpoint whose weights hold a sequence-classification head.
SEQUENCE_HEAD = "GPTNeoForSequenceClassification"
CAUSAL_LM = "GPTNeoForCausalLM"


def checkpoint_head(folder: str | Path) -> str:
    """The class to serve the checkpoint in `folder` as: SEQUENCE_HEAD when its weights hold
    a `score.weight` (or, for .bin files, whose names cost a load, when config.json's
    `architectures` says so), CAUSAL_LM otherwise.

    `gptneo serve` and `gptneo batch` load what the checkpoint is: a classifier answers
    /v1/classify with its head, and has no language-model head to generate with.
    """
    from .config import GPTNeoConfig
    from .weights import stored_names

    names = stored_names(Path(folder))
    if names is not None:
        return SEQUENCE_HEAD if "score.weight" in names else CAUSAL_LM
    architectures = GPTNeoConfig.from_json_file(folder).extra.get("architectures") or []
    return SEQUENCE_HEAD if SEQUENCE_HEAD in architectures else CAUSAL_LM


def is_sequence_classifier(model: Any) -> bool:
    """Whether `model` is a sequence-classification model (it has no language-model head)."""
    from .modeling import GPTNeoForSequenceClassification

    return isinstance(model, GPTNeoForSequenceClassification)


def head_labels(model: Any) -> list[str]:
    """A sequence-classification model's labels, in the order of its outputs (id2label)."""
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def check_labels(model: Any, labels: Sequence[str] | None) -> None:
    """ValueError unless `labels` suit `model`: a classification head answers with its own
    labels (a list given must name the same ones, in any order); zero-shot needs a list."""
    if is_sequence_classifier(model):
        own = head_labels(model)
        if labels is not None and sorted(labels) != sorted(own):
            raise ValueError(
                f"labels {list(labels)} do not match this classifier's labels {own}: "
                "leave them out, or give exactly those"
            )
    elif labels is None:
        raise ValueError("labels are needed to classify zero-shot with a language model")
    else:
        _zero_shot_labels(labels)


def _zero_shot_labels(labels: Sequence[str]) -> list[str]:
    """The candidate labels as strings: a non-empty list of distinct, non-empty names."""
    names = [str(lab) for lab in labels]
    if not names or any(not name.strip() for name in names):
        raise ValueError("labels must be a non-empty list of non-empty names")
    if len(set(names)) != len(names):
        raise ValueError(f"labels must be distinct, got {names}")
    return names


def classify_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[str] | None = None,
    *,
    template: str = DEFAULT_TEMPLATE,
    calibrate: bool = True,
    batch_size: int = 8,
    max_seq_len: int | None = None,
) -> list[Classification]:
    """Classify with the model's classification head when it has one (`labels`, if given,
    must be the head's: see `check_labels`), else zero-shot among `labels`.

    The one entry point of `gptneo classify`, the server's and the batch jobs' /v1/classify.
    """
    check_labels(model, labels)
    if is_sequence_classifier(model):
        return classify(model, tokenizer, texts, batch_size=batch_size, max_seq_len=max_seq_len)
    assert labels is not None
    return zero_shot(
        model,
        tokenizer,
        texts,
        labels,
        template=template,
        calibrate=calibrate,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
    )


# ---- classify with a sequence-classification head -----------------------------------------
@torch.inference_mode()
def classify(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_seq_len: int | None = None,
) -> list[Classification]:
    """Label each text with a GPTNeoForSequenceClassification checkpoint.

    The head reads the hidden state of each text's last real token (the model finds it
    from the attention mask), as transformers does for an unpadded input. Texts longer
    than the model's positions keep their first `max_seq_len` tokens.
    """
    _check_batch_size(batch_size)
    limit = _max_len(model, max_seq_len)
    labels = head_labels(model)
    encoded = [_encode_nonempty(tokenizer, t) for t in texts]
    rows = [ids[:limit] for ids in encoded]
    results: list[Classification | None] = [None] * len(rows)
    device = model.device
    for group in _batches([len(r) for r in rows], batch_size):
        ids, mask = right_pad([rows[i] for i in group], _pad_id(tokenizer), device)
        logits = model(ids, attention_mask=mask).logits  # pooled at each last real token
        probs = torch.softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(group):
            results[i] = _verdict(
                labels, probs[row].tolist(), truncated=len(encoded[i]) - len(rows[i])
            )
    return results  # type: ignore[return-value]


def _encode_nonempty(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("text is empty: nothing to classify")
    return list(ids)


def _verdict(
    labels: Sequence[str], probs: Sequence[float], truncated: int, **zero_shot_fields: Any
) -> Classification:
    best = max(range(len(labels)), key=lambda i: probs[i])
    return Classification(
        label=labels[best],
        score=float(probs[best]),
        scores={lab: float(p) for lab, p in zip(labels, probs, strict=True)},
        truncated_tokens=truncated,
        **zero_shot_fields,
    )


# ---- zero-shot classify with a causal LM --------------------------------------------------
def render_template(template: str, text: str) -> str:
    """Put `text` where the template says {text}; other braces stay as they are."""
    if "{text}" not in template:
        raise ValueError("template must contain {text}, e.g. '{text}\\nTopic:'")
    return template.replace("{text}", text)


def label_continuation(template: str, label: str) -> str:
    """The text scored for a label: ' label' unless the template already ends in whitespace.

    GPT-2's BPE glues a leading space to the word (' sports' is one token), so scoring the
    label with its space matches how the word appears in running text.
    """
    return label if template[-1:].isspace() else " " + label


@torch.inference_mode()
def zero_shot(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    template: str = DEFAULT_TEMPLATE,
    calibrate: bool = True,
    batch_size: int = 8,
    max_seq_len: int | None = None,
) -> list[Classification]:
    """Classify texts among `labels` by how likely a causal LM finds each label after them.

    Each label's score is the summed log-likelihood of its tokens after
    `<bos> + template(text)`. With `calibrate`, the same score for the content-free prompt
    (the template with empty text) is subtracted first, which removes the model's prior
    for each label ("Calibrate Before Use", Zhao et al. 2021). The probabilities are the
    softmax of the (calibrated) scores over the labels. All (text, label) pairs run as
    right-padded batches; only the label positions go through the LM head.
    """
    _check_batch_size(batch_size)
    labels = _zero_shot_labels(labels)
    render_template(template, "")  # validate early
    limit = _max_len(model, max_seq_len)
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    label_ids = [tokenizer.encode(label_continuation(template, lab)) for lab in labels]
    room = limit - max(len(ids) for ids in label_ids)

    prompts: list[list[int]] = []
    truncated: list[int] = []
    for text in list(texts) + ([""] if calibrate else []):
        ids, cut = _fit_prompt(tokenizer, template, text, bos, room)
        prompts.append(ids)
        truncated.append(cut)

    pairs = [(p, j) for p in range(len(prompts)) for j in range(len(labels))]
    loglik = _continuation_logliks(
        model, tokenizer, [(prompts[p], label_ids[j]) for p, j in pairs], batch_size
    )
    table = torch.tensor(loglik, dtype=torch.float64).view(len(prompts), len(labels))

    base = table[-1] if calibrate else torch.zeros(len(labels), dtype=torch.float64)
    results = []
    for i in range(len(texts)):
        probs = torch.softmax(table[i] - base, dim=0).tolist()
        results.append(
            _verdict(
                labels,
                probs,
                truncated=truncated[i],
                logprobs=dict(zip(labels, table[i].tolist(), strict=True)),
                calibration=dict(zip(labels, base.tolist(), strict=True)) if calibrate else None,
            )
        )
    return results


def _fit_prompt(
    tokenizer: Any, template: str, text: str, bos: list[int], room: int
) -> tuple[list[int], int]:
    """Encode bos + template(text), cutting the end of `text` until it fits in `room`."""
    ids = bos + tokenizer.encode(render_template(template, text))
    if not ids:
        raise ValueError("the prompt is empty: give the template text around {text}")
    if len(ids) <= room:
        return ids, 0
    overflow = len(ids) - room
    text_ids = tokenizer.encode(text)
    if overflow >= len(text_ids):
        raise ValueError("template is too long for the model's positions with any text")
    kept = text_ids[: len(text_ids) - overflow]
    # Re-encoding decoded text can merge differently at the cut; shrink until it fits.
    while True:
        ids = bos + tokenizer.encode(render_template(template, tokenizer.decode(kept)))
        if len(ids) <= room or not kept:
            return ids, len(text_ids) - len(kept)
        kept = kept[:-1]


def _continuation_logliks(
    model: torch.nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
) -> list[float]:
    """Sum of log p(continuation tokens | prefix) for each (prefix, continuation) pair."""
    rows = [prefix + cont for prefix, cont in pairs]
    out = [0.0] * len(rows)
    device = model.device
    for group in _batches([len(r) for r in rows], batch_size):
        ids, mask = right_pad([rows[i] for i in group], _pad_id(tokenizer), device)
        hidden = model.transformer(ids, attention_mask=mask).last_hidden_state  # [B, T, H]
        # Position t predicts token t+1: gather exactly the positions that predict labels.
        owner, positions, targets = [], [], []
        for row, i in enumerate(group):
            prefix, cont = pairs[i]
            owner += [row] * len(cont)
            positions += range(len(prefix) - 1, len(prefix) - 1 + len(cont))
            targets += cont
        owner_t = torch.tensor(owner, device=device)
        picked = hidden[owner_t, torch.tensor(positions, device=device)]
        logp = torch.log_softmax(model.lm_head(picked).float(), dim=-1)
        tok_lp = logp.gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
        sums = torch.zeros(len(group), dtype=torch.float64)  # float64 on CPU: MPS lacks it
        sums.index_add_(0, owner_t.cpu(), tok_lp.cpu().double())
        for row, i in enumerate(group):
            out[i] = float(sums[row])
    return out


# ---- tag with a token-classification head -------------------------------------------------
@torch.inference_mode()
def tag(
    model: torch.nn.Module,
    tokenizer: Any,
    text: str,
    *,
    max_seq_len: int | None = None,
    stride: int = DEFAULT_STRIDE,
) -> list[Span]:
    """Tag `text` with a GPTNeoForTokenClassification checkpoint and merge tokens into spans.

    Long texts run in windows that repeat `stride` tokens of left context; a token takes
    its label from the first window holding it, where it sees the most context.
    """
    ids, offsets = encode_with_offsets(tokenizer, text)
    if not ids:
        return []
    limit = _max_len(model, max_seq_len)
    id2label = model.config.id2label
    device = model.device
    labels: list[str] = [""] * len(ids)
    probs: list[float] = [0.0] * len(ids)
    done = 0
    for start, end in _windows(len(ids), limit, stride):
        window = torch.tensor([ids[start:end]], dtype=torch.long, device=device)
        logits = model(window).logits[0]
        p, best = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        for k in range(done - start, end - start):
            labels[start + k] = id2label[int(best[k])]
            probs[start + k] = float(p[k])
        done = end
    return merge_spans(text, labels, offsets, probs)


def _split_tag(label: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'PER' -> ('', 'PER'); 'O' -> ('O', '')."""
    if label.upper() == "O" or not label:
        return "O", ""
    if len(label) > 2 and label[1] in "-_" and label[0].upper() in "BIESLU":
        return label[0].upper(), label[2:]
    return "", label


def merge_spans(
    text: str,
    labels: Sequence[str],
    offsets: Sequence[tuple[int, int]],
    probs: Sequence[float] | None = None,
) -> list[Span]:
    """Merge per-token labels into character spans of `text`.

    IOB/BIOES tags: B-X (or S-/U-) opens a span, I-X (or E-/L-) continues an X span right
    before it and opens one otherwise, E-/L-/S-/U- close it. Plain labels merge runs of the
    same label. "O" is dropped. Span edges are trimmed of whitespace (GPT-2 tokens carry
    their leading space).
    """
    probs = probs if probs is not None else [1.0] * len(labels)
    spans: list[tuple[str, int, int, list[float]]] = []
    open_type: str | None = None
    for label, (a, b), p in zip(labels, offsets, probs, strict=True):
        prefix, kind = _split_tag(label)
        if prefix == "O":
            open_type = None
            continue
        if open_type == kind and prefix in ("", "I", "E", "L"):
            name, start, end, ps = spans[-1]
            spans[-1] = (name, start, max(b, end), [*ps, p])
        else:
            spans.append((kind, a, b, [p]))
        open_type = None if prefix in ("E", "L", "S", "U") else kind
    out = []
    for kind, a, b, ps in spans:
        a, b = _trim(text, a, b)
        if a < b:
            out.append(Span(kind, a, b, text[a:b], sum(ps) / len(ps)))
    return out


def _trim(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


# ---- answer with a question-answering head ------------------------------------------------
def question_prefix(question: str) -> str:
    """What precedes the context: the question and a newline (GPT-Neo has no [SEP])."""
    return question.strip() + "\n"


@torch.inference_mode()
def answer(
    model: torch.nn.Module,
    tokenizer: Any,
    question: str,
    context: str,
    *,
    max_answer_tokens: int = DEFAULT_MAX_ANSWER_TOKENS,
    max_seq_len: int | None = None,
    stride: int = DEFAULT_STRIDE,
) -> Answer:
    """Find the best answer span to `question` in `context` with a QA checkpoint.

    Input is `question + "\\n"` then the context's tokens, so every context token sees the
    whole question. A context longer than the positions left runs in windows that repeat
    `stride` tokens; the best span over all windows wins. A span's score is
    p(start) * p(end), each a softmax over the window's context tokens only.
    """
    if not question.strip():
        raise ValueError("question is empty")
    if max_answer_tokens < 1:
        raise ValueError(f"max_answer_tokens must be at least 1, got {max_answer_tokens}")
    ctx_ids, offsets = encode_with_offsets(tokenizer, context)
    if not ctx_ids or not context.strip():
        raise ValueError("context is empty: nothing to search for an answer")
    q_ids = list(tokenizer.encode(question_prefix(question)))
    limit = _max_len(model, max_seq_len)
    if len(q_ids) >= limit:
        raise ValueError(f"question is {len(q_ids)} tokens; it must be shorter than {limit}")
    spans = _windows(len(ctx_ids), limit - len(q_ids), stride)
    device = model.device
    best: tuple[float, int, int, int] | None = None
    for w, (start, end) in enumerate(spans):
        ids = torch.tensor([q_ids + ctx_ids[start:end]], dtype=torch.long, device=device)
        out = model(ids)
        q = len(q_ids)
        s_lp = torch.log_softmax(out.start_logits[0, q:].float(), dim=-1)
        e_lp = torch.log_softmax(out.end_logits[0, q:].float(), dim=-1)
        logp, s, e = best_span(s_lp, e_lp, max_answer_tokens)
        if best is None or logp > best[0]:
            best = (logp, w, start + s, start + e)
    assert best is not None
    logp, w, s, e = best
    a, b = _trim(context, offsets[s][0], offsets[e][1])
    if a >= b:  # a whitespace-only span: report its raw extent rather than nothing
        a, b = offsets[s][0], offsets[e][1]
    return Answer(context[a:b], a, b, math.exp(logp), window=w, windows=len(spans))


def best_span(
    start_scores: torch.Tensor, end_scores: torch.Tensor, max_tokens: int
) -> tuple[float, int, int]:
    """(score, s, e) maximising start[s] + end[e] with s <= e < s + max_tokens."""
    n = start_scores.shape[0]
    total = start_scores[:, None] + end_scores[None, :]
    i = torch.arange(n, device=total.device)
    allowed = (i[None, :] >= i[:, None]) & (i[None, :] - i[:, None] < max_tokens)
    total = total.masked_fill(~allowed, float("-inf"))
    flat = int(total.argmax())
    s, e = divmod(flat, n)
    return float(total[s, e]), s, e
