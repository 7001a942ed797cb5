"""Classifier training: a GPTNeoForSequenceClassification head (or the whole model) on
labelled jsonl/CSV, keeping the best epoch by validation accuracy.

The label set and id2label come from the data. The output folder is what `gptneo classify
--model FOLDER` and transformers' GPTNeoForSequenceClassification load. The optimizer,
schedule, precision and reporting are the causal-LM trainer's (gptneo_cli.training).
"""

from __future__ import annotations

import copy
import csv
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .device import resolve_device
from .modeling import GPTNeoForSequenceClassification, GPTNeoModel
from .training import (
    PRECISIONS,
    TRAINING_INFO,
    EvalStats,
    Reporter,
    StepStats,
    autocast_context,
    autocast_dtype,
    build_optimizer,
    epoch_order,
    export_model,
    lr_factor,
    read_jsonl,
    trainable_parameters,
    write_json,
)

# =====================================================================================
# Classifier data
# =====================================================================================


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
    raise ValueError(f"data: {where}: label must be a non-empty string or integer, "
                     f"got {value!r}")


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
                examples.append(LabeledExample(
                    text, _label_text(row[label_column], f"{path}:{number}")))
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
                raise ValueError(f"data: {path} has no {name!r} column (columns: "
                                 f"{', '.join(columns) or 'none'}); name the columns with "
                                 "--text-column / --label-column")
        return [
            LabeledExample(row[text_column] or "",
                           _label_text(row[label_column], f"{path}:{n + 2}"))
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
        if len(idx) >= 2:
            held.update(idx[:max(1, round(len(idx) * val_fraction))])
    train = [e for i, e in enumerate(examples) if i not in held]
    val = [e for i, e in enumerate(examples) if i in held]
    return train, val


# =====================================================================================
# Classifier training
# =====================================================================================


@dataclass
class ClassifierConfig:
    """Options of a classifier run. Invalid values raise ValueError naming the option."""

    train: Literal["head", "all"] = "head"
    """"head" trains only the score layer on frozen features; "all" trains everything."""
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16
    lr: float | None = None
    """None: 1e-3 for the head alone, 2e-5 for the whole model."""
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_length: int = 256
    val_fraction: float = 0.1
    precision: str = "auto"
    seed: int = 0
    log_every: int = 10

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.train == "head" else 2e-5

    def validate(self) -> None:
        if self.train not in ("head", "all"):
            raise ValueError(f"train must be 'head' or 'all', got {self.train!r}")
        for name in ("epochs", "batch_size", "max_length", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, "
                             f"got {self.precision!r}")


@dataclass
class ClassifierResult:
    output: Path
    labels: list[str]
    steps: int
    val_accuracy: float | None
    val_loss: float | None
    train_examples: int
    val_examples: int
    history: list[dict[str, Any]]


def build_classifier(
    name_or_path: str | Path,
    labels: Sequence[str],
    device: str | torch.device | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> GPTNeoForSequenceClassification:
    """A sequence classifier for `labels` on top of any GPT-Neo checkpoint's transformer.

    The base weights come from the checkpoint (whatever head it had); the score layer is new
    and seeded. pad_token_id is set (to eos when the model has none) so that transformers
    can find each row's last token in a padded batch.
    """
    base = GPTNeoModel.from_pretrained(name_or_path, device=device, revision=revision)
    config = copy.deepcopy(base.config)
    config.id2label = {i: label for i, label in enumerate(labels)}
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.num_labels = len(labels)
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id
    config.extra["architectures"] = ["GPTNeoForSequenceClassification"]
    config.extra["problem_type"] = "single_label_classification"
    config.validate()
    with torch.device("meta"):
        model = GPTNeoForSequenceClassification(config)
    model.transformer = base
    model.score.to_empty(device=base.device)
    torch.manual_seed(seed)
    model.init_weights(model.score)
    return model


def _encode_examples(tokenizer: Any, examples: Sequence[LabeledExample], label2id: dict[str, int],
                     max_length: int) -> tuple[list[list[int]], torch.Tensor]:
    fallback = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    ids = [(tokenizer.encode(e.text)[:max_length] or [fallback]) for e in examples]
    labels = torch.tensor([label2id[e.label] for e in examples], dtype=torch.long)
    return ids, labels


def _padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the matching attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def _pooled_features(model: GPTNeoForSequenceClassification, rows: Sequence[Sequence[int]],
                     pad_id: int, batch_size: int, amp: torch.dtype | None) -> torch.Tensor:
    """The hidden state at each row's last token (what the score layer reads), float32."""
    device = model.device
    out = torch.empty(len(rows), model.config.hidden_size)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # less padding per batch
    with torch.no_grad():
        for lo in range(0, len(order), batch_size):
            chunk = order[lo:lo + batch_size]
            ids, mask = _padded([rows[i] for i in chunk], pad_id)
            with autocast_context(device, amp):
                hidden = model.transformer(ids.to(device), mask.to(device)).last_hidden_state
            last = mask.sum(dim=1) - 1
            out[chunk] = hidden[torch.arange(len(chunk)), last.to(device)].float().cpu()
    return out


def _classifier_logits(model: GPTNeoForSequenceClassification, rows: Sequence[Sequence[int]],
                       pad_id: int, amp: torch.dtype | None) -> torch.Tensor:
    ids, mask = _padded(rows, pad_id)
    device = model.device
    with autocast_context(device, amp):
        return model(ids.to(device), mask.to(device)).logits.float()


def train_classifier(
    model: GPTNeoForSequenceClassification,
    tokenizer: Any,
    train_examples: Sequence[LabeledExample],
    val_examples: Sequence[LabeledExample],
    config: ClassifierConfig,
    output: str | Path,
    *,
    tokenizer_source: str | Path | None = None,
    reporter: Reporter | None = None,
    info: dict[str, Any] | None = None,
) -> ClassifierResult:
    """Train the score layer (or the whole model), keep the best by validation accuracy.

    Head-only training computes each example's features once (GPT-Neo has no dropout, so
    they never change) and then fits the linear layer on them: epochs cost almost nothing.
    """
    config.validate()
    reporter = reporter or Reporter()
    output = Path(output)
    device = model.device
    amp = autocast_dtype(config.precision, device)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    label2id = {label: i for i, label in enumerate(labels)}
    unknown = sorted({e.label for e in [*train_examples, *val_examples]} - set(labels))
    if unknown:
        raise ValueError(f"data: labels {unknown} are not among the model's {labels}")
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    max_length = min(config.max_length, model.config.max_position_embeddings)
    train_ids, train_y = _encode_examples(tokenizer, train_examples, label2id, max_length)
    val_ids, val_y = _encode_examples(tokenizer, val_examples, label2id, max_length)
    head_only = config.train == "head"
    for p in model.transformer.parameters():
        p.requires_grad_(not head_only)
    if head_only:
        reporter.message(f"computing features for {len(train_ids) + len(val_ids)} examples")
        train_x = _pooled_features(model, train_ids, pad_id, config.batch_size, amp)
        val_x = _pooled_features(model, val_ids, pad_id, config.batch_size, amp)

    n = len(train_ids)
    per_epoch = math.ceil(n / config.batch_size)
    total_steps = config.max_steps or per_epoch * config.epochs
    warmup = round(config.warmup_ratio * total_steps)
    optimizer = build_optimizer(trainable_parameters(model), config.learning_rate,
                                config.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 and not head_only else None
    run_info = {**(info or {}), "labels": labels, "train_examples": n,
                "val_examples": len(val_ids), "total_steps": total_steps, "train": config.train,
                "device": str(device)}
    reporter.start(total_steps, run_info)

    def evaluate() -> tuple[float, float]:
        if not val_ids:
            return float("nan"), float("nan")
        model.eval()
        with torch.no_grad():
            if head_only:
                logits = model.score(val_x.to(device)).float().cpu()
            else:
                parts = [_classifier_logits(model, val_ids[i:i + config.batch_size], pad_id, amp)
                         for i in range(0, len(val_ids), config.batch_size)]
                logits = torch.cat(parts).cpu()
        model.train()
        loss = float(F.cross_entropy(logits, val_y))
        accuracy = float((logits.argmax(-1) == val_y).float().mean())
        return loss, accuracy

    best: tuple[float, float] | None = None  # (accuracy, -loss)
    best_acc = best_loss = None
    history: list[dict[str, Any]] = []
    step, epoch, tokens = 0, 0, 0
    start = time.perf_counter()
    model.train()
    while step < total_steps:
        order = epoch_order(n, config.seed, epoch).tolist()
        for lo in range(0, n, config.batch_size):
            if step >= total_steps:
                break
            chunk = order[lo:lo + config.batch_size]
            lr = config.learning_rate * lr_factor(step, warmup, total_steps, 0.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            y = train_y[chunk].to(device)
            if head_only:
                logits = model.score(train_x[chunk].to(device)).float()
            else:
                logits = _classifier_logits(model, [train_ids[i] for i in chunk], pad_id, amp)
            loss = F.cross_entropy(logits, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable_parameters(model)], 1.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += sum(len(train_ids[i]) for i in chunk)
            elapsed = time.perf_counter() - start
            if step % config.log_every and step not in (1, total_steps):
                continue
            reporter.step(StepStats(step, total_steps, epoch, float(loss.detach()), lr,
                                    tokens / elapsed if elapsed else 0.0, elapsed,
                                    elapsed / step * (total_steps - step)))
        epoch += 1
        val_loss, val_acc = evaluate()
        history.append({"step": step, "epoch": epoch, "val_loss": val_loss,
                        "val_accuracy": val_acc})
        score = (val_acc, -val_loss) if val_ids else (0.0, 0.0)
        improved = best is None or score > best
        if improved:
            best, best_acc, best_loss = score, val_acc, val_loss
            export_model(model, output, None, Path(tokenizer_source) if tokenizer_source else None,
                         tokenizer)
        if val_ids:
            reporter.evaluated(EvalStats(step, val_loss, accuracy=val_acc, best=improved))
    reporter.end()
    result = ClassifierResult(output, labels, step, best_acc if val_ids else None,
                              best_loss if val_ids else None, n, len(val_ids), history)
    write_json(output / TRAINING_INFO, {
        "task": "sequence-classification",
        "labels": labels,
        "steps": step,
        "val_accuracy": result.val_accuracy,
        "val_loss": result.val_loss,
        "train_examples": n,
        "val_examples": len(val_ids),
        "history": history,
        "config": asdict(config),
        **run_info,
    })
    return result


def fit_classifier(
    model_name: str | Path,
    data: Sequence[str | Path],
    output: str | Path,
    config: ClassifierConfig,
    *,
    val_data: Sequence[str | Path] | None = None,
    text_column: str = "text",
    label_column: str = "label",
    device: str | torch.device | None = None,
    revision: str | None = None,
    reporter: Reporter | None = None,
) -> ClassifierResult:
    """Train a sequence classifier on labelled files; labels and id2label come from the data."""
    from .hub import resolve_model_dir
    from .tokenizer import Tokenizer

    config.validate()
    examples = read_labeled(data, text_column, label_column)
    if val_data:
        train_ex, val_ex = examples, read_labeled(val_data, text_column, label_column)
    else:
        train_ex, val_ex = split_examples(examples, config.val_fraction, config.seed)
    labels = label_names([*train_ex, *val_ex])
    if len(labels) < 2:
        raise ValueError(f"data: a classifier needs at least two labels, found {labels}")
    folder = resolve_model_dir(model_name, revision=revision)
    tokenizer = Tokenizer.from_folder(folder)
    dev = resolve_device(device)
    autocast_dtype(config.precision, dev)
    model = build_classifier(folder, labels, dev, config.seed)
    info = {"base_model": str(model_name)}
    return train_classifier(model, tokenizer, train_ex, val_ex, config, output,
                            tokenizer_source=folder, reporter=reporter, info=info)
