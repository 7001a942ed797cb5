"""Sequence classification: a GPTNeoForSequenceClassification head (or the whole model) on
labelled jsonl/CSV, keeping the best epoch by validation accuracy.

The label set and id2label come from the data. The output folder is what `gptneo classify
--model FOLDER` and transformers' GPTNeoForSequenceClassification load.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..modeling import GPTNeoForSequenceClassification
from .data import read_jsonl
from .heads import (
    HeadConfig,
    HeadResult,
    HeadTask,
    build_head_model,
    fit_from_folder,
    fit_head,
    frozen_features,
)
from .report import Reporter

#: Classifier runs take the options every head trainer takes.
ClassifierConfig = HeadConfig
ClassifierResult = HeadResult


@dataclass
class LabeledExample:
    text: str
    label: str


def _label_text(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int)):
        text = str(value).strip()
        if text:
            return text
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    raise ValueError(f"data: {where}: label must be a non-empty string or integer, got {value!r}")


def read_labeled(
    paths: Sequence[str | Path], text_column: str = "text", label_column: str = "label"
) -> list[LabeledExample]:
    """Labelled examples from .jsonl ({"text", "label"} per line) or .csv/.tsv (with header)."""
    examples: list[LabeledExample] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ValueError(f"data: {raw} does not exist or is not a file")
        if path.suffix == ".jsonl":
            for number, row in read_jsonl(path, (text_column, label_column)):
                text = row[text_column]
                if not isinstance(text, str):
                    raise ValueError(f"data: {path}:{number}: {text_column!r} must be a string")
                examples.append(
                    LabeledExample(text, _label_text(row[label_column], f"{path}:{number}"))
                )
        elif path.suffix in (".csv", ".tsv"):
            examples.extend(_read_table(path, text_column, label_column))
        else:
            raise ValueError(f"data: {path} must be .jsonl, .csv or .tsv")
    if not examples:
        raise ValueError("data: no labelled examples in " + ", ".join(map(str, paths)))
    return examples


def _read_table(path: Path, text_column: str, label_column: str) -> list[LabeledExample]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        columns = reader.fieldnames or []
        for name in (text_column, label_column):
            if name not in columns:
                raise ValueError(
                    f"data: {path} has no {name!r} column (columns: "
                    f"{', '.join(columns) or 'none'}); name the text and label "
                    "columns to use"
                )
        return [
            LabeledExample(
                row[text_column] or "", _label_text(row[label_column], f"{path}:{n + 2}")
            )
            for n, row in enumerate(reader)
        ]


def label_names(examples: Sequence[LabeledExample]) -> list[str]:
    """The label set in a fixed order: numeric order when every label is an integer."""
    labels = {e.label for e in examples}
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def split_examples(
    examples: Sequence[LabeledExample], val_fraction: float, seed: int
) -> tuple[list[LabeledExample], list[LabeledExample]]:
    """A stratified held-out split: each label keeps its share in both parts."""
    if val_fraction <= 0:
        return list(examples), []
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    held: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        rng.shuffle(idx)
        if len(idx) >= 2:  # every label keeps at least one training example
            held.update(idx[: min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))])
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


def build_classifier(
    folder: str | Path,
    labels: Sequence[str],
    device: str | torch.device | None = None,
    seed: int = 0,
) -> GPTNeoForSequenceClassification:
    """A sequence classifier for `labels` on top of the checkpoint in `folder`."""
    return build_head_model(
        folder,
        GPTNeoForSequenceClassification,
        labels,
        device,
        seed,
        {"problem_type": "single_label_classification"},
    )


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """The first `max_length` ids of each text (eos for an empty one: every row has a token)."""
    fallback = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    return [(tokenizer.encode(t)[:max_length] or [fallback]) for t in texts]


class ClassifierTask(HeadTask):
    """Cross-entropy on the score layer's logits at each text's last token."""

    name = "sequence-classification"

    def __init__(
        self,
        model: GPTNeoForSequenceClassification,
        tokenizer: Any,
        config: HeadConfig,
        train: Sequence[LabeledExample],
        val: Sequence[LabeledExample],
    ) -> None:
        super().__init__(model, tokenizer, config)
        unknown = sorted({e.label for e in [*train, *val]} - set(self.labels))
        if unknown:
            raise ValueError(f"data: labels {unknown} are not among the model's {self.labels}")
        label2id = {label: i for i, label in enumerate(self.labels)}
        max_length = min(config.max_length, model.config.max_position_embeddings)
        self.train_rows = encode_texts(tokenizer, [e.text for e in train], max_length)
        self.val_rows = encode_texts(tokenizer, [e.text for e in val], max_length)
        self.train_y = torch.tensor([label2id[e.label] for e in train], dtype=torch.long)
        self.val_y = torch.tensor([label2id[e.label] for e in val], dtype=torch.long)
        self.train_x: torch.Tensor | None = None
        self.val_x: torch.Tensor | None = None

    def prepare(self, reporter: Reporter) -> None:
        super().prepare(reporter)
        if not self.head_only:
            return
        count = len(self.train_rows) + len(self.val_rows)
        reporter.message(f"computing features for {count} example{'s' * (count != 1)}")

        def features(rows: list[list[int]]) -> torch.Tensor:
            found = frozen_features(
                self.model, rows, self.pad_id, self.config.batch_size, self.amp, lambda h: h[-1]
            )
            return torch.stack(found) if found else torch.empty(0, self.model.config.hidden_size)

        self.train_x, self.val_x = features(self.train_rows), features(self.val_rows)

    def logits(
        self, rows: list[list[int]], x: torch.Tensor | None, indices: Sequence[int]
    ) -> torch.Tensor:
        if x is not None:
            return self.model.score(x[list(indices)].to(self.device)).float()
        hidden, mask = self.hidden([rows[i] for i in indices])
        last = mask.sum(dim=1) - 1
        pooled = hidden[torch.arange(len(indices), device=self.device), last]
        return self.model.score(pooled).float()

    def loss(self, indices: Sequence[int]) -> torch.Tensor:
        logits = self.logits(self.train_rows, self.train_x, indices)
        return F.cross_entropy(logits, self.train_y[list(indices)].to(self.device))

    def score(self) -> tuple[float, float]:
        size = self.config.batch_size
        parts = [
            self.logits(
                self.val_rows, self.val_x, range(i, min(i + size, len(self.val_rows)))
            ).cpu()
            for i in range(0, len(self.val_rows), size)
        ]
        logits = torch.cat(parts)
        loss = float(F.cross_entropy(logits, self.val_y))
        return loss, float((logits.argmax(-1) == self.val_y).float().mean())


def train_classifier(
    model: GPTNeoForSequenceClassification,
    tokenizer: Any,
    train_examples: Sequence[LabeledExample],
    val_examples: Sequence[LabeledExample],
    config: HeadConfig,
    output: str | Path,
    *,
    tokenizer_source: str | Path | None = None,
    reporter: Reporter | None = None,
    info: dict[str, Any] | None = None,
) -> HeadResult:
    """Train the score layer (or the whole model), keep the best by validation accuracy."""
    config.validate()
    task = ClassifierTask(model, tokenizer, config, train_examples, val_examples)
    return fit_head(
        task,
        output,
        tokenizer=tokenizer,
        tokenizer_source=tokenizer_source,
        reporter=reporter,
        info=info,
    )


def fit_classifier(
    folder: str | Path,
    data: Sequence[str | Path],
    output: str | Path,
    config: HeadConfig,
    *,
    val_data: Sequence[str | Path] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    device: str | torch.device | None = None,
    reporter: Reporter | None = None,
    base_name: str | None = None,
) -> HeadResult:
    """Train a sequence classifier on labelled files; labels and id2label come from the data."""
    config.validate()
    examples = read_labeled(data, text_column, label_column)
    if val_data:
        train_ex, val_ex = examples, read_labeled(val_data, text_column, label_column)
    else:
        train_ex, val_ex = split_examples(examples, config.val_fraction, config.seed)
    labels = label_names([*train_ex, *val_ex])
    if len(labels) < 2:
        raise ValueError(f"data: a classifier needs at least two labels, found {labels}")
    if not train_ex:
        raise ValueError("data: no training examples are left after holding out val_fraction")
    return fit_from_folder(
        folder,
        output,
        config,
        GPTNeoForSequenceClassification,
        labels,
        lambda model, tokenizer: ClassifierTask(model, tokenizer, config, train_ex, val_ex),
        device=device,
        reporter=reporter,
        info={"base_model": base_name or str(folder)},
        extra={"problem_type": "single_label_classification"},
    )
