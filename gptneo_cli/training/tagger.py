"""Token classification: a GPTNeoForTokenClassification head (`classifier.*`) on words
labelled one by one (CoNLL-style columns or jsonl), keeping the best epoch by held-out token
accuracy. The output folder is what `gptneo tag --model FOLDER` loads.

Words are joined with spaces and tokenized as `gptneo tag` tokenizes a text, so training and
tagging see the same tokens. Every token of a word is trained on the word's label; the
tokens after the first of a `B-X` word learn `I-X`, so `tag` merges them into one span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..modeling import GPTNeoForTokenClassification
from ..tasks import encode_with_offsets
from .data import hold_out, read_jsonl
from .heads import HeadConfig, HeadResult, HeadTask, fit_from_folder
from .report import Reporter

#: jsonl keys accepted for the labels, in order of preference
LABEL_KEYS = ("labels", "tags", "ner_tags")


@dataclass
class TaggedSentence:
    words: list[str]
    labels: list[str]
    source: str


def read_tagged(paths: Sequence[str | Path]) -> list[TaggedSentence]:
    """Sentences from .jsonl ({"tokens": [...], "labels": [...]} per line) or CoNLL-style
    text (one `word ... label` line per word, first and last columns; a blank line ends a
    sentence; `-DOCSTART-` lines are skipped)."""
    sentences: list[TaggedSentence] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ValueError(f"data: {raw} does not exist or is not a file")
        if path.suffix == ".jsonl":
            sentences.extend(_read_jsonl(path))
        else:
            sentences.extend(_read_conll(path))
    if not sentences:
        raise ValueError("data: no tagged sentences in " + ", ".join(map(str, paths)))
    return sentences


def _read_jsonl(path: Path) -> list[TaggedSentence]:
    out = []
    for number, row in read_jsonl(path, ("tokens",)):
        where = f"{path}:{number}"
        key = next((k for k in LABEL_KEYS if k in row), None)
        if key is None:
            raise ValueError(f"data: {where} has no labels (one of {', '.join(LABEL_KEYS)})")
        words, labels = row["tokens"], row[key]
        if not isinstance(words, list) or not isinstance(labels, list):
            raise ValueError(f"data: {where}: 'tokens' and {key!r} must be lists")
        out.append(_sentence(words, labels, where))
    return out


def _read_conll(path: Path) -> list[TaggedSentence]:
    out: list[TaggedSentence] = []
    words: list[str] = []
    labels: list[str] = []
    start = 1
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"data: {path} is not a UTF-8 text file") from exc
    for number, line in enumerate([*lines, ""], 1):
        columns = line.split()
        if columns and columns[0] == "-DOCSTART-":
            continue
        if not columns:
            if words:
                out.append(_sentence(words, labels, f"{path}:{start}"))
            words, labels, start = [], [], number + 1
            continue
        if len(columns) < 2:
            raise ValueError(f"data: {path}:{number}: expected a word and its label")
        words.append(columns[0])
        labels.append(columns[-1])
    return out


def _sentence(words: list[Any], labels: list[Any], where: str) -> TaggedSentence:
    if len(words) != len(labels):
        raise ValueError(
            f"data: {where}: {len(words)} word{'s' * (len(words) != 1)} and "
            f"{len(labels)} label{'s' * (len(labels) != 1)}; give one label "
            "per word"
        )
    if not words:
        raise ValueError(f"data: {where}: a sentence without words")
    texts = [str(w).strip() for w in words]
    if not all(texts):
        raise ValueError(f"data: {where}: words must be non-empty")
    return TaggedSentence(texts, [str(label).strip() for label in labels], where)


def tag_names(sentences: Sequence[TaggedSentence]) -> list[str]:
    """The label set: "O" first, then sorted, with I-X added for every B-X (the label of a
    B-X word's later tokens)."""
    labels = {label for s in sentences for label in s.labels}
    labels |= {"I-" + label[2:] for label in labels if label.startswith("B-")}
    rest = sorted(labels - {"O"})
    return (["O"] if "O" in labels else []) + rest


def encode_sentence(
    tokenizer: Any, sentence: TaggedSentence, label2id: dict[str, int]
) -> tuple[list[int], list[int]]:
    """Token ids of the words joined by spaces, and a label id for every token."""
    text = " ".join(sentence.words)
    ids, offsets = encode_with_offsets(tokenizer, text)
    owner = []  # the word index of every character (spaces belong to the next word)
    for w, word in enumerate(sentence.words):
        owner.extend([w] * (len(word) + (1 if w else 0)))
    labels, seen = [], set()
    for _, end in offsets:
        w = owner[max(0, min(end, len(owner)) - 1)]
        label = sentence.labels[w]
        if w in seen and label.startswith("B-"):
            label = "I-" + label[2:]
        seen.add(w)
        labels.append(label2id[label])
    return ids, labels


class TaggerTask(HeadTask):
    """Cross-entropy of the `classifier` layer's logits at every token."""

    name = "token-classification"

    def __init__(
        self,
        model: GPTNeoForTokenClassification,
        tokenizer: Any,
        config: HeadConfig,
        train: Sequence[TaggedSentence],
        val: Sequence[TaggedSentence],
    ) -> None:
        super().__init__(model, tokenizer, config)
        label2id = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted({x for s in [*train, *val] for x in s.labels} - set(label2id))
        if unknown:
            raise ValueError(f"data: labels {unknown} are not among the model's {self.labels}")
        limit = min(config.max_length, model.config.max_position_embeddings)

        def encode(sentences: Sequence[TaggedSentence]) -> tuple[list, list]:
            pairs = [encode_sentence(tokenizer, s, label2id) for s in sentences]
            return [p[0][:limit] for p in pairs], [torch.tensor(p[1][:limit]) for p in pairs]

        self.train_rows, self.train_y = encode(train)
        self.val_rows, self.val_y = encode(val)
        self.train_x: list[torch.Tensor] | None = None
        self.val_x: list[torch.Tensor] | None = None

    def prepare(self, reporter: Reporter) -> None:
        super().prepare(reporter)
        self.train_x, self.val_x = self.token_features(reporter, "sentence")

    def logits(
        self, rows: list[list[int]], x: list[torch.Tensor] | None, indices: Sequence[int]
    ) -> torch.Tensor:
        """Logits of every real token of the chosen rows, concatenated: [tokens, labels]."""
        if x is not None:
            features = torch.cat([x[i] for i in indices]).to(self.device)
        else:
            hidden, mask = self.hidden([rows[i] for i in indices])
            features = hidden[mask.bool()]
        return self.model.classifier(features).float()

    def loss(self, indices: Sequence[int]) -> torch.Tensor:
        logits = self.logits(self.train_rows, self.train_x, indices)
        target = torch.cat([self.train_y[i] for i in indices]).to(self.device)
        return F.cross_entropy(logits, target)

    def score(self) -> tuple[float, float]:
        size = self.config.batch_size
        chunks = [
            list(range(i, min(i + size, len(self.val_rows))))
            for i in range(0, len(self.val_rows), size)
        ]
        logits = torch.cat([self.logits(self.val_rows, self.val_x, c).cpu() for c in chunks])
        target = torch.cat(self.val_y)
        loss = float(F.cross_entropy(logits, target))
        return loss, float((logits.argmax(-1) == target).float().mean())


def fit_tagger(
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
    """Train a token classifier on tagged sentences; the label set comes from the data."""
    config.validate()
    sentences = read_tagged(data)
    if val_data:
        train, val = sentences, read_tagged(val_data)
    else:
        train, val = hold_out(sentences, config.val_fraction, config.seed)
    labels = tag_names([*train, *val])
    if len(labels) < 2:
        raise ValueError(f"data: a tagger needs at least two labels, found {labels}")
    return fit_from_folder(
        folder,
        output,
        config,
        GPTNeoForTokenClassification,
        labels,
        lambda model, tokenizer: TaggerTask(model, tokenizer, config, train, val),
        device=device,
        reporter=reporter,
        info={"base_model": base_name or str(folder)},
    )
