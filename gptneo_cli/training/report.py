"""Progress of a run: what a trainer reports, and the clock that measures its speed.

The library never prints; it calls a `Reporter`. The CLI supplies a Rich or a plain one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class StepStats:
    step: int
    total_steps: int
    epoch: int
    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float


@dataclass
class EvalStats:
    step: int
    loss: float
    accuracy: float | None = None
    best: bool = False

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


class Reporter:
    """Receives progress; every method is a no-op here (subclass what you need)."""

    def start(self, total_steps: int, info: dict[str, Any]) -> None: ...

    def step(self, stats: StepStats) -> None: ...

    def evaluated(self, stats: EvalStats) -> None: ...

    def message(self, text: str) -> None: ...

    def end(self) -> None: ...


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_step(stats: StepStats) -> str:
    """The plain progress line (also used by the CLI off a terminal)."""
    return (
        f"step {stats.step}/{stats.total_steps}  loss {stats.loss:.4f}  lr {stats.lr:.2e}  "
        f"{stats.tokens_per_s:,.0f} tok/s  elapsed {format_duration(stats.elapsed_s)}  "
        f"eta {format_duration(stats.eta_s)}"
    )


def format_eval(stats: EvalStats) -> str:
    text = f"eval step {stats.step}: val_loss {stats.loss:.4f} (ppl {stats.perplexity:.2f})"
    if stats.accuracy is not None:
        text = f"eval step {stats.step}: val_loss {stats.loss:.4f}  accuracy {stats.accuracy:.4f}"
    return text + ("  best" if stats.best else "")


class RateClock:
    """Seconds per step measured in this process only.

    A resumed run restores the time spent before the interruption, but its ETA must come
    from the speed since the resume (a 1-minute rest of a run is not 10 minutes away
    because the first part ran on a slower machine or under load).
    """

    #: the clock read at each step's start and end (tests substitute a fake one)
    now = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self._tick = 0.0

    def start(self) -> None:
        self._tick = self.now()

    def stop(self) -> float:
        """End the step started by `start`; returns its duration."""
        elapsed = self.now() - self._tick
        self.steps += 1
        self.seconds += elapsed
        return elapsed

    def eta(self, remaining_steps: int) -> float:
        if not self.steps:
            return 0.0
        return self.seconds / self.steps * max(0, remaining_steps)
