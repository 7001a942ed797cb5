"""Training progress for `finetune` and `train-classifier`: a Rich bar on a terminal,
plain lines otherwise. Both go to stderr; stdout keeps only the final summary.

`make_reporter` returns an object with the interface of gptneo_cli.training.Reporter (duck
typed, so this module imports neither torch nor the training code).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from .output import inert, is_tty, make_console


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainReporter:
    """One line per logged step and per evaluation: easy to grep, safe in CI logs."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr

    def _line(self, text: str) -> None:
        self.stream.write(inert(text) + "\n")
        self.stream.flush()

    def start(self, total_steps: int, info: dict[str, Any]) -> None:
        self._line(_describe(total_steps, info))

    def step(self, stats: Any) -> None:
        self._line(
            f"step {stats.step}/{stats.total_steps}  loss {stats.loss:.4f}  lr {stats.lr:.2e}  "
            f"{stats.tokens_per_s:,.0f} tok/s  eta {_duration(stats.eta_s)}"
        )

    def evaluated(self, stats: Any) -> None:
        self._line(_eval_text(stats))

    def message(self, text: str) -> None:
        self._line(text)

    def end(self) -> None:
        pass


class RichReporter:
    """A live bar with loss, tokens/s and ETA; evaluations print above it."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = make_console(stream or sys.stderr, soft_wrap=False)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: Any = None

    def start(self, total_steps: int, info: dict[str, Any]) -> None:
        self.console.print(_describe(total_steps, info), style="dim", markup=False)
        self.progress.start()
        done = info.get("resumed_from_step") or 0
        self.task = self.progress.add_task(
            "training", total=total_steps, completed=done, loss="-", rate="-"
        )

    def step(self, stats: Any) -> None:
        self.progress.update(
            self.task,
            completed=stats.step,
            loss=f"{stats.loss:.4f}",
            rate=f"{stats.tokens_per_s:,.0f}",
        )

    def evaluated(self, stats: Any) -> None:
        self.progress.console.print(
            _eval_text(stats), markup=False, style="green" if stats.best else None
        )

    def message(self, text: str) -> None:
        self.progress.console.print(text, style="dim", markup=False)

    def end(self) -> None:
        self.progress.stop()


def plural(count: int, noun: str, many: str | None = None) -> str:
    """'1 document', '0 documents', '1,200 tokens': a count with its noun agreeing."""
    return f"{count:,} {noun if count == 1 else many or noun + 's'}"


def _describe(total_steps: int, info: dict[str, Any]) -> str:
    steps = plural(total_steps, "step")
    if "train_tokens" in info:
        return (
            f"{plural(info['train_tokens'], 'training token')} in "
            f"{plural(info['train_blocks'], 'block')} "
            f"({plural(info['train_documents'], 'document')}), "
            f"{plural(info['val_tokens'], 'held-out token')} "
            f"({plural(info['val_documents'], 'document')}); {steps} on {info['device']}, "
            f"{info['autocast']}"
        )
    labels = info.get("labels") or []
    what = f", labels {', '.join(labels)}" if labels else ""
    return (
        f"{plural(info.get('train_examples', 0), 'training example')} and "
        f"{plural(info.get('val_examples', 0), 'validation example')}{what}; "
        f"{steps} ({info.get('train')}) on {info.get('device')}"
    )


def _eval_text(stats: Any) -> str:
    if stats.accuracy is not None:
        text = f"eval step {stats.step}: val_loss {stats.loss:.4f}  accuracy {stats.accuracy:.4f}"
    else:
        text = f"eval step {stats.step}: val_loss {stats.loss:.4f}  ppl {stats.perplexity:.2f}"
    if stats.step == 0:
        return text + "  (before training)"
    return text + ("  (best so far, saved)" if stats.best else "")


def make_reporter(stream: TextIO | None = None) -> PlainReporter | RichReporter:
    stream = stream or sys.stderr
    return RichReporter(stream) if is_tty(stream) else PlainReporter(stream)
