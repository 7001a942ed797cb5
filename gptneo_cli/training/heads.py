"""What the three head trainers share (sequence classification, token classification,
question answering): options, a head model on top of a checkpoint, frozen features, and
the loop that keeps the best epoch (batches are padded by tasks.right_pad, as at inference).

A task (classifier.py, tagger.py, qa.py) only says how a batch of its examples becomes a
loss and how its held-out split is scored; `fit_head` does the rest.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..modeling import GPTNeoModel
from ..tasks import right_pad
from .optim import (
    apply_gradients,
    autocast_context,
    autocast_dtype,
    backward,
    build_optimizer,
    check_fraction,
    check_positive_ints,
    check_precision,
    epoch_order,
    grad_scaler,
    lr_factor,
    set_lr,
    trainable_parameters,
)
from .report import EvalStats, RateClock, Reporter, StepStats
from .saving import TRAINING_INFO, export_model, write_json


@dataclass
class HeadConfig:
    """Options of a head run. Invalid values raise ValueError naming the option."""

    train: Literal["head", "all"] = "head"
    """"head" trains only the new layer on frozen features; "all" trains everything."""
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
        check_positive_ints(self, ("epochs", "batch_size", "max_length", "log_every"))
        check_positive_ints(self, ("max_steps",), optional=True)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_fraction("warmup_ratio", self.warmup_ratio)
        check_fraction("val_fraction", self.val_fraction)
        check_precision(self.precision)


@dataclass
class HeadResult:
    output: Path
    labels: list[str]
    steps: int
    val_metric: float | None
    """The task's score on the held-out split (accuracy, or exact span match for QA)."""
    val_loss: float | None
    train_examples: int
    val_examples: int
    history: list[dict[str, Any]]

    @property
    def val_accuracy(self) -> float | None:
        return self.val_metric


def build_head_model(
    folder: str | Path,
    model_cls: type,
    labels: Sequence[str] | None,
    device: str | torch.device | None = None,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> Any:
    """`model_cls` (a head model) for `labels` on top of the transformer in `folder`.

    The base weights come from the checkpoint (whatever head it had); the head is new and
    seeded. pad_token_id is set (to eos when the model has none) so that transformers can
    find each row's last token in a padded batch.
    """
    base = GPTNeoModel.from_pretrained(folder, device=device)
    config = copy.deepcopy(base.config)
    if labels is not None:
        config.id2label = {i: label for i, label in enumerate(labels)}
        config.label2id = {label: i for i, label in enumerate(labels)}
        config.num_labels = len(labels)
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id
    config.extra["architectures"] = [model_cls.__name__]
    config.extra.update(extra or {})
    config.validate()
    with torch.device("meta"):
        model = model_cls(config)
    model.transformer = base
    head = getattr(model, model_cls.head_params[0].split(".")[0])
    head.to_empty(device=base.device)
    torch.manual_seed(seed)
    model.init_weights(head)
    return model


def frozen_features(
    model: Any,
    rows: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    amp: torch.dtype | None,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> list[torch.Tensor]:
    """`reduce(hidden states of one row)` for every row, float32 on the CPU.

    GPT-Neo has no dropout, so with a frozen transformer these never change: head-only
    training computes them once and fits the head on them (epochs then cost almost nothing).
    """
    device = model.device
    out: list[torch.Tensor] = [torch.empty(0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # less padding per batch
    with torch.no_grad():
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            ids, mask = right_pad([rows[i] for i in chunk], pad_id)
            with autocast_context(device, amp):
                hidden = model.transformer(ids.to(device), mask.to(device)).last_hidden_state
            for k, i in enumerate(chunk):
                out[i] = reduce(hidden[k, : len(rows[i])].float().cpu())
    return out


class HeadTask:
    """One task's examples and losses. Subclasses fill in `loss` and `score`."""

    #: the name of what `score` measures, for training.json and the CLI summary
    metric = "accuracy"
    #: training.json's "task"
    name = "head"

    def __init__(self, model: Any, tokenizer: Any, config: HeadConfig) -> None:
        self.model = model
        self.config = config
        self.device = model.device
        self.amp = autocast_dtype(config.precision, self.device)
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        self.head_only = config.train == "head"
        self.train_rows: list[list[int]] = []
        self.val_rows: list[list[int]] = []
        config_labels = model.config.id2label or {}
        self.labels: list[str] = [config_labels[i] for i in range(len(config_labels))]

    def prepare(self, reporter: Reporter) -> None:
        """Freeze the transformer for head-only training (and compute features then)."""
        for p in self.model.transformer.parameters():
            p.requires_grad_(not self.head_only)

    def token_features(
        self, reporter: Reporter, noun: str
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        """Every token's frozen features, train and held-out (None unless head-only)."""
        if not self.head_only:
            return None, None
        count = len(self.train_rows) + len(self.val_rows)
        reporter.message(f"computing features for {count} {noun}{'s' * (count != 1)}")
        return tuple(  # type: ignore[return-value]
            frozen_features(
                self.model, rows, self.pad_id, self.config.batch_size, self.amp, lambda h: h
            )
            for rows in (self.train_rows, self.val_rows)
        )

    def hidden(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, T, H] of padded `rows` (float32) and their mask [B, T]."""
        ids, mask = right_pad(rows, self.pad_id)
        with autocast_context(self.device, self.amp):
            hidden = self.model.transformer(
                ids.to(self.device), mask.to(self.device)
            ).last_hidden_state
        return hidden.float(), mask.to(self.device)

    def loss(self, indices: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def score(self) -> tuple[float, float]:
        """(loss, metric) on the held-out split; called only when it is not empty."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {}


def fit_head(
    task: HeadTask,
    output: str | Path,
    *,
    tokenizer: Any = None,
    tokenizer_source: str | Path | None = None,
    reporter: Reporter | None = None,
    info: dict[str, Any] | None = None,
) -> HeadResult:
    """Train `task`'s head (or whole model), keep the best epoch by its held-out metric."""
    config, model = task.config, task.model
    config.validate()
    reporter = reporter or Reporter()
    output = Path(output)
    task.prepare(reporter)
    run = _HeadRun(task, reporter)
    labels = task.labels
    run_info = {
        **(info or {}),
        "labels": labels,
        "train_examples": len(task.train_rows),
        "val_examples": len(task.val_rows),
        "total_steps": run.total_steps,
        "train": config.train,
        "device": str(task.device),
        **task.info(),
    }
    source = Path(tokenizer_source) if tokenizer_source else None
    reporter.start(run.total_steps, run_info)
    while run.step < run.total_steps:
        run.epoch_steps()
        if run.end_epoch():
            export_model(model, output, None, source, tokenizer)
    reporter.end()
    has_val = bool(task.val_rows)
    result = HeadResult(
        output,
        labels,
        run.step,
        run.best_metric if has_val else None,
        run.best_loss if has_val else None,
        len(task.train_rows),
        len(task.val_rows),
        run.history,
    )
    write_json(
        output / TRAINING_INFO,
        {
            "task": task.name,
            "labels": labels,
            "steps": run.step,
            f"val_{task.metric}": result.val_metric,
            "val_loss": result.val_loss,
            "history": run.history,
            "config": asdict(config),
            **run_info,
        },
    )
    return result


def fit_from_folder(
    folder: str | Path,
    output: str | Path,
    config: HeadConfig,
    model_cls: type,
    labels: Sequence[str] | None,
    make_task: Callable[[Any, Any], HeadTask],
    *,
    device: str | torch.device | None = None,
    reporter: Reporter | None = None,
    info: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> HeadResult:
    """A whole head run from a model folder: its tokenizer, a new `model_cls` head for
    `labels` on its transformer, the task `make_task(model, tokenizer)` builds, the loop."""
    from ..device import resolve_device
    from ..tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(folder)
    dev = resolve_device(device)
    autocast_dtype(config.precision, dev)  # reject e.g. float16 on CPU before loading
    model = build_head_model(folder, model_cls, labels, dev, config.seed, extra)
    return fit_head(
        make_task(model, tokenizer),
        output,
        tokenizer=tokenizer,
        tokenizer_source=Path(folder),
        reporter=reporter,
        info=info,
    )


class _HeadRun:
    """The loop's position, optimizer and the best epoch so far."""

    def __init__(self, task: HeadTask, reporter: Reporter) -> None:
        config = task.config
        self.task, self.config, self.reporter = task, config, reporter
        self.n = len(task.train_rows)
        per_epoch = math.ceil(self.n / config.batch_size)
        self.total_steps = config.max_steps or per_epoch * config.epochs
        self.warmup = round(config.warmup_ratio * self.total_steps)
        self.params = [p for _, p in trainable_parameters(task.model)]
        self.optimizer = build_optimizer(
            trainable_parameters(task.model), config.learning_rate, config.weight_decay
        )
        self.scaler = None if task.head_only else grad_scaler(task.device, task.amp)
        self.step = self.epoch = self.tokens = 0
        self.clock = RateClock()
        self.best: tuple[float, float] | None = None
        self.best_metric: float | None = None
        self.best_loss: float | None = None
        self.history: list[dict[str, Any]] = []

    def epoch_steps(self) -> None:
        """One pass over the shuffled training rows (or what is left of max_steps)."""
        order = epoch_order(self.n, self.config.seed, self.epoch).tolist()
        self.task.model.train()
        for lo in range(0, self.n, self.config.batch_size):
            if self.step >= self.total_steps:
                break
            self.train_step(order[lo : lo + self.config.batch_size])

    def train_step(self, chunk: list[int]) -> None:
        config = self.config
        self.clock.start()
        lr = config.learning_rate * lr_factor(self.step, self.warmup, self.total_steps, 0.0)
        set_lr(self.optimizer, lr)
        loss = self.task.loss(chunk)
        backward(loss, self.scaler)
        apply_gradients(self.params, self.optimizer, self.scaler, 1.0)
        self.clock.stop()
        self.step += 1
        self.tokens += sum(len(self.task.train_rows[i]) for i in chunk)
        if self.step % config.log_every and self.step not in (1, self.total_steps):
            return
        elapsed = self.clock.seconds
        self.reporter.step(
            StepStats(
                self.step,
                self.total_steps,
                self.epoch,
                float(loss.detach()),
                lr,
                self.tokens / elapsed if elapsed else 0.0,
                elapsed,
                self.clock.eta(self.total_steps - self.step),
            )
        )

    def end_epoch(self) -> bool:
        """Score the held-out split; True when this epoch is the best so far."""
        self.epoch += 1
        if not self.task.val_rows:
            self.history.append({"step": self.step, "epoch": self.epoch})
            self.best = (0.0, 0.0)
            return True
        self.task.model.eval()
        with torch.no_grad():
            val_loss, metric = self.task.score()
        self.task.model.train()
        self.history.append(
            {
                "step": self.step,
                "epoch": self.epoch,
                "val_loss": val_loss,
                f"val_{self.task.metric}": metric,
            }
        )
        improved = self.best is None or (metric, -val_loss) > self.best
        if improved:
            self.best, self.best_metric, self.best_loss = (metric, -val_loss), metric, val_loss
        self.reporter.evaluated(EvalStats(self.step, val_loss, accuracy=metric, best=improved))
        return improved
