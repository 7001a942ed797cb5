"""Extractive question answering: a GPTNeoForQuestionAnswering head (`qa_outputs.*`) on
SQuAD-style jsonl, keeping the best epoch by held-out exact-span accuracy. The output folder
is what `gptneo answer --model FOLDER` loads.

Each example is laid out as `gptneo answer` lays out its input: the question and a newline,
then the context's tokens. The start and end scores are trained with a softmax over the
context tokens only, as `answer` reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..modeling import GPTNeoForQuestionAnswering
from ..tasks import best_span, encode_with_offsets, question_prefix
from .data import hold_out, read_jsonl
from .heads import HeadConfig, HeadResult, HeadTask, fit_from_folder
from .report import Reporter

#: the longest span scored on the held-out split, in tokens (as `answer` defaults to)
MAX_ANSWER_TOKENS = 30


@dataclass
class QAExample:
    question: str
    context: str
    answer: str
    start: int
    """Character offset of the answer in the context."""
    source: str


def read_squad(paths: Sequence[str | Path]) -> tuple[list[QAExample], int]:
    """Examples from SQuAD-style jsonl: {"question", "context", "answers": {"text": [...],
    "answer_start": [...]}} per line (the Hugging Face layout), or "answers" as a list of
    {"text", "answer_start"}, or a plain "answer" string. The first answer is used; a
    missing answer_start is found in the context. Returns (examples, unanswerable skipped)."""
    examples: list[QAExample] = []
    skipped = 0
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file() or path.suffix != ".jsonl":
            raise ValueError(f"data: {raw} must be an existing .jsonl file")
        for number, row in read_jsonl(path, ("question", "context")):
            found = _first_answer(row, f"{path}:{number}")
            if found is None:
                skipped += 1
                continue
            examples.append(_example(row, *found, f"{path}:{number}"))
    if not examples:
        raise ValueError("data: no answerable questions in " + ", ".join(map(str, paths)))
    return examples, skipped


def _first_answer(row: dict[str, Any], where: str) -> tuple[str, int | None] | None:
    """(text, start or None) of the row's first answer; None when it has none."""
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        return (answers, row.get("answer_start")) if answers.strip() else None
    if isinstance(answers, dict):
        texts, starts = answers.get("text") or [], answers.get("answer_start") or []
        if not isinstance(texts, list) or not isinstance(starts, list):
            raise ValueError(f"data: {where}: answers.text and answers.answer_start must be lists")
        return (texts[0], starts[0] if starts else None) if texts else None
    if isinstance(answers, list):
        if not answers:
            return None
        first = answers[0]
        if not isinstance(first, dict) or "text" not in first:
            raise ValueError(f"data: {where}: each answer needs a 'text'")
        return first["text"], first.get("answer_start")
    raise ValueError(f"data: {where} has no 'answers' (or 'answer')")


def _example(row: dict[str, Any], text: Any, start: Any, where: str) -> QAExample:
    question, context = row["question"], row["context"]
    if not all(isinstance(v, str) for v in (question, context, text)):
        raise ValueError(f"data: {where}: question, context and answer must be strings")
    if not text.strip() or not question.strip():
        raise ValueError(f"data: {where}: empty question or answer")
    if start is None:
        start = context.find(text)
        if start < 0:
            raise ValueError(f"data: {where}: the answer {text!r} is not in the context")
    if not isinstance(start, int) or context[start : start + len(text)] != text:
        raise ValueError(
            f"data: {where}: answer_start {start!r} does not point at the "
            f"answer {text!r} in the context"
        )
    return QAExample(question, context, text, start, where)


def encode_example(
    tokenizer: Any, example: QAExample, limit: int
) -> tuple[list[int], int, int, int] | None:
    """(ids, question tokens, start, end) with start/end as context-token indices; None when
    the answer lies beyond the `limit` tokens that fit."""
    q_ids = list(tokenizer.encode(question_prefix(example.question)))
    ctx_ids, offsets = encode_with_offsets(tokenizer, example.context)
    ctx_ids, offsets = ctx_ids[: max(0, limit - len(q_ids))], offsets[: max(0, limit - len(q_ids))]
    a, b = example.start, example.start + len(example.answer)
    covering = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
    if not covering:
        return None
    return q_ids + ctx_ids, len(q_ids), covering[0], covering[-1]


class QATask(HeadTask):
    """Cross-entropy of the start and end scores over the context tokens."""

    name = "question-answering"

    def __init__(
        self,
        model: GPTNeoForQuestionAnswering,
        tokenizer: Any,
        config: HeadConfig,
        train: Sequence[QAExample],
        val: Sequence[QAExample],
    ) -> None:
        super().__init__(model, tokenizer, config)
        self.labels = []
        limit = min(config.max_length, model.config.max_position_embeddings)
        self.cut = 0
        self.train_rows, self.train_y = self._encode(tokenizer, train, limit)
        self.val_rows, self.val_y = self._encode(tokenizer, val, limit)
        if not self.train_rows:
            raise ValueError(
                f"data: no answer lies within the first {limit} tokens of its "
                "example; raise max_length or shorten the contexts"
            )
        self.train_x: list[torch.Tensor] | None = None
        self.val_x: list[torch.Tensor] | None = None

    def _encode(
        self, tokenizer: Any, examples: Sequence[QAExample], limit: int
    ) -> tuple[list[list[int]], list[tuple[int, int, int]]]:
        rows, targets = [], []
        for example in examples:
            encoded = encode_example(tokenizer, example, limit)
            if encoded is None:
                self.cut += 1
                continue
            rows.append(encoded[0])
            targets.append(encoded[1:])
        return rows, targets

    def info(self) -> dict[str, Any]:
        return {"answers_cut_off": self.cut}

    def prepare(self, reporter: Reporter) -> None:
        super().prepare(reporter)
        if self.cut:
            reporter.message(
                f"skipped {self.cut} example{'s' * (self.cut != 1)} whose answer "
                "lies beyond max_length tokens"
            )
        self.train_x, self.val_x = self.token_features(reporter, "example")

    def scores(
        self,
        rows: list[list[int]],
        x: list[torch.Tensor] | None,
        targets: list[tuple[int, int, int]],
        indices: Sequence[int],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(start, end) log-probabilities over each chosen example's context tokens."""
        if x is not None:
            per_row = [x[i].to(self.device) for i in indices]
        else:
            hidden, _ = self.hidden([rows[i] for i in indices])
            per_row = [hidden[k, : len(rows[i])] for k, i in enumerate(indices)]
        out = []
        for i, features in zip(indices, per_row, strict=True):
            start, end = self.model.qa_outputs(features[targets[i][0] :]).float().unbind(-1)
            out.append((torch.log_softmax(start, -1), torch.log_softmax(end, -1)))
        return out

    def loss(self, indices: Sequence[int]) -> torch.Tensor:
        scored = self.scores(self.train_rows, self.train_x, self.train_y, indices)
        losses = [
            -(s[self.train_y[i][1]] + e[self.train_y[i][2]]) / 2
            for i, (s, e) in zip(indices, scored, strict=True)
        ]
        return torch.stack(losses).mean()

    def score(self) -> tuple[float, float]:
        indices = list(range(len(self.val_rows)))
        total, right = 0.0, 0
        for lo in range(0, len(indices), self.config.batch_size):
            chunk = indices[lo : lo + self.config.batch_size]
            for i, (s, e) in zip(
                chunk, self.scores(self.val_rows, self.val_x, self.val_y, chunk), strict=True
            ):
                _, gold_s, gold_e = self.val_y[i]
                total += float(-(s[gold_s] + e[gold_e]) / 2)
                _, found_s, found_e = best_span(s, e, MAX_ANSWER_TOKENS)
                right += int((found_s, found_e) == (gold_s, gold_e))
        return total / len(indices), right / len(indices)


def split_questions(
    examples: Sequence[QAExample], val_fraction: float, seed: int
) -> tuple[list[QAExample], list[QAExample]]:
    """Hold out a seeded share of the contexts: questions on one context stay together, so
    held-out questions are asked about unseen text."""
    contexts = sorted({e.context for e in examples})
    held = set(hold_out(contexts, val_fraction, seed)[1])
    return (
        [e for e in examples if e.context not in held],
        [e for e in examples if e.context in held],
    )


def fit_qa(
    folder: str | Path,
    data: Sequence[str | Path],
    output: str | Path,
    config: HeadConfig,
    *,
    val_data: Sequence[str | Path] | None = None,
    device: str | torch.device | None = None,
    reporter: Reporter | None = None,
    base_name: str | None = None,
) -> HeadResult:
    """Train a question-answering head on SQuAD-style jsonl."""
    config.validate()
    examples, unanswerable = read_squad(data)
    if val_data:
        train, val = examples, read_squad(val_data)[0]
    else:
        train, val = split_questions(examples, config.val_fraction, config.seed)
    info = {"base_model": base_name or str(folder), "unanswerable_skipped": unanswerable}
    return fit_from_folder(
        folder,
        output,
        config,
        GPTNeoForQuestionAnswering,
        None,
        lambda model, tokenizer: QATask(model, tokenizer, config, train, val),
        device=device,
        reporter=reporter,
        info=info,
    )
