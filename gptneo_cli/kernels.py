"""Which layout a CPU matrix product runs in, chosen by measuring it on this machine.

The fast path (gptneo_cli/fast.py) can hold a linear layer's matrix these ways on CPU:

- `onednn`: prepacked into oneDNN's blocked layout (`PackedLinear`); for the tied lm_head,
  the plain embedding matrix read in place by oneDNN;
- `linear`: the checkpoint's [out, in] rows through F.linear (MKL for float32);
- `columns`: transposed, [in, out], through torch.mm (`ColumnLinear`; not for the head);
- `native`: the plain rows through our own row kernel (gptneo_cli/native.py) for a
  decode step, oneDNN reading the same rows in place for more rows (float32 and bf16, where
  the kernel could be built);
- `panels`: a copy repacked into column panels, every row count through our panel kernels
  (float32, bf16 and int8; where the kernels could be built).

Which is fastest depends on the CPU, not the vendor's name: float32 oneDNN ran 2.2x MKL's
F.linear on an AMD EPYC, while MKL is fast on Intel. So the first load of a model on a
machine times each candidate for each matrix shape, at 1 row (a decode step) and at
`PREFILL_ROWS` rows (a prompt), on enough copies of the matrix that the reads come from
memory as in decoding, a few ms each (the head at 1 and `HEAD_ROWS` rows: a prompt runs
it for its last token only). Each layout's score is the sum of its two times
relative to the fastest at that row count; the lowest score wins, but another layout than
the incumbent must beat it by `MARGIN` to be chosen, so that noise on a busy machine does
not flip the choice. The incumbent is `onednn` (the layout chosen before measurements
existed), except for float32 layers where our panel kernels are built, and bf16 layers
where the CPU also has their bf16 dot product: they never measured slower than the others,
at any row count. Where the native decode step can run (gptneo_cli/step.py: it needs every
matrix of the blocks as panels, float32, bf16 pairs or int8 quads), a block's matrix keeps
panels unless another layout beats them by `STEP_MARGIN` (30 %): losing the step costs more
than a layout a little ahead saves.

Results are cached in `kernels.json` in the user cache dir ($XDG_CACHE_HOME/gptneo,
~/.cache/gptneo), keyed by CPU model, torch version, thread count, dtype and shape, with the
timings behind each choice: later loads pick from those timings (so the rule above applies
to them as it stands) and measure nothing. A file that cannot be read or parsed is ignored
(measured again and rewritten); one that cannot be written is not kept.
`GPTNEO_KERNEL=onednn|linear|columns|native|panels` skips the measurement and forces a
layout; `auto` (or unset) measures. Delete the file to measure again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .settings import user_cache_dir

LAYOUTS = ("onednn", "linear", "columns", "native", "panels")
CHOICES = ("auto", *LAYOUTS)
ENV = "GPTNEO_KERNEL"
#: The layout kept unless another one is this much better (a share of its score).
DEFAULT = "onednn"
MARGIN = 0.10
#: The margin over `panels` for a block's matrices where the native decode step can run:
#: the step needs every one of them as panels, and it removes about a third of an int8
#: decode token's time on gpt-neo-125M (the small ops and the Python around ~50 products;
#: step.py), so another layout must be faster by more than the step saves. Without it a
#: layout measured 9 % ahead on one small matrix cost the demo model's int8 copy its step
#: (3.5x slower tokens).
STEP_MARGIN = 0.30
#: Rows of the prompt-sized measurement (layers) and of a batched decode step (the head,
#: which a prompt runs for its last token only).
PREFILL_ROWS = 64
HEAD_ROWS = 8
#: Each timing repeats for about this long (at least MIN_ROUNDS passes).
BUDGET_S = 0.02
MIN_ROUNDS = 2
MAX_ROUNDS = 10
#: Bytes of matrix copies cycled through per measurement: more than a CPU's last-level
#: cache, so one-row products stream their weights from memory as decoding does.
STREAM_BYTES = 64 * 2**20
MAX_COPIES = 32
#: Up to this many rows a product is timed on streamed copies (a decode step's regime).
STREAM_ROWS = 8
#: 3: the panel layout is measured too, int8 matrices at 1 and 8 rows (version 2: at 1 and
#: 64 rows, without panels).
FILE_VERSION = 3


#: The row counts each kind of measurement times (default: 1 and PREFILL_ROWS). int8
#: matrices: decode steps, batched or not (their prompts run other products: fast.Int8Linear).
_ROWS = {"head": (1, HEAD_ROWS), "int8 linear": (1, HEAD_ROWS), "int8 head": (1, HEAD_ROWS)}


def forced(environ: Mapping[str, str] = os.environ) -> str | None:
    """The layout GPTNEO_KERNEL forces, or None for `auto` / unset."""
    raw = environ.get(ENV, "").strip().lower()
    if raw in ("", "auto"):
        return None
    if raw not in LAYOUTS:
        choices = ", ".join(LAYOUTS)
        raise ValueError(f"{ENV} must be auto or one of {choices}, got {raw!r}")
    return raw


def cache_path(environ: Mapping[str, str] = os.environ) -> Path:
    return user_cache_dir(environ) / "kernels.json"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo, read once: every matrix of a load asks), else
    what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo's `flags`, read once); empty where unknown."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cache_key(kind: str, shape: tuple[int, int], dtype: torch.dtype) -> str:
    """Machine (CPU model, torch version, threads) + dtype + which matrix and its shape."""
    name = str(dtype).removeprefix("torch.")
    return (
        f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
        f"{name} | {kind} {shape[0]}x{shape[1]}"
    )


class KernelCache:
    """kernels.json: {"version": 1, "choices": {key: {"layout": ..., "seconds": {...}}}}."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.choices: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return  # absent or corrupt: measure again
        if isinstance(data, dict) and data.get("version") == FILE_VERSION:
            choices = data.get("choices")
            if isinstance(choices, dict):
                self.choices = {
                    k: v
                    for k, v in choices.items()
                    if isinstance(v, dict) and v.get("layout") in LAYOUTS
                }

    def seconds(self, key: str) -> dict[str, dict[str, float]] | None:
        """The timings behind a cached choice, or None (absent or not well formed)."""
        entry = self.choices.get(key)
        seconds = entry.get("seconds") if isinstance(entry, dict) else None
        if not isinstance(seconds, dict):
            return None
        rows = [set(times) if isinstance(times, dict) else None for times in seconds.values()]
        if not rows or not rows[0] or any(r != rows[0] for r in rows):
            return None  # none, or not every layout timed at the same row counts
        numbers = [t for times in seconds.values() for t in times.values()]
        if not all(isinstance(t, (int, float)) and t >= 0 for t in numbers):
            return None
        return seconds

    def put(self, key: str, layout: str, seconds: dict[str, dict[str, float]]) -> None:
        """Remember a choice; the file is replaced whole (never left half-written)."""
        self.choices[key] = {"layout": layout, "seconds": seconds}
        data = {"version": FILE_VERSION, "choices": self.choices}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".kernels-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)


#: layout -> a module (or function) computing x @ W.T for a given [out, in] matrix.
Builders = Mapping[str, Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]]


def measure(
    builders: Builders, shape: tuple[int, int], dtype: torch.dtype, rows: tuple[int, ...]
) -> dict[str, dict[str, float]]:
    """Seconds per product of each layout at each row count: the best of a few passes. Up to
    STREAM_ROWS rows cycle through enough copies of the [out, in] matrix to stream it from
    memory (as a decode step, batched or verifying drafts, does); more rows are
    compute-bound and use one copy."""
    out_features, in_features = shape
    size = out_features * in_features * torch.finfo(dtype).bits // 8
    copies = max(1, min(MAX_COPIES, math.ceil(STREAM_BYTES / max(size, 1))))
    weight = torch.full(shape, 0.01, dtype=dtype)
    seconds: dict[str, dict[str, float]] = {}
    from . import native  # throwaway candidates: not in a loading model's shared chunks

    with torch.inference_mode(), native.huge_arena(None):
        for layout, build in builders.items():
            modules = [build(weight if i == 0 else weight.clone()) for i in range(copies)]
            seconds[layout] = {}
            for count in rows:
                x = torch.full((count, in_features), 0.5, dtype=dtype)
                streamed = modules if count <= STREAM_ROWS else modules[:1]
                seconds[layout][str(count)] = _best_time(streamed, x)
            del modules
    return seconds


def _best_time(modules: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> float:
    """Seconds per call: the best pass over `modules`, after a warm-up call."""
    modules[0](x)  # first-call allocations, oneDNN primitive caches
    best, rounds, began = float("inf"), 0, time.perf_counter()
    while rounds < MIN_ROUNDS or (time.perf_counter() - began < BUDGET_S and rounds < MAX_ROUNDS):
        start = time.perf_counter()
        for module in modules:
            module(x)
        best = min(best, (time.perf_counter() - start) / len(modules))
        rounds += 1
    return best


def pick(
    seconds: Mapping[str, Mapping[str, float]], incumbent: str = DEFAULT, margin: float = MARGIN
) -> str:
    """The layout with the lowest score (module docstring); `incumbent` unless beaten by
    `margin`."""
    rows = {r for times in seconds.values() for r in times}
    fastest = {r: min(t[r] for t in seconds.values()) for r in rows}
    scores = {
        layout: sum(times[r] / fastest[r] for r in rows if fastest[r] > 0)
        for layout, times in seconds.items()
    }
    best = min(scores, key=lambda layout: scores[layout])
    if incumbent in scores and scores[best] > (1 - margin) * scores[incumbent]:
        return incumbent
    return best


class KernelChooser:
    """The layout for each matrix shape of one load: forced, cached, or measured (once)."""

    def __init__(self, dtype: torch.dtype, environ: Mapping[str, str] = os.environ) -> None:
        self.dtype = dtype
        self.forced = forced(environ)
        self.cache = KernelCache(cache_path(environ)) if self.forced is None else None
        self.chosen: dict[str, str] = {}

    def _forced(self, builders: Builders) -> str:
        """The forced layout, or the nearest one this matrix has: the head has no `columns`
        (its own products then); without a built native kernel, `native` and `panels` mean
        the default (fp16 has neither)."""
        if self.forced in builders:
            return str(self.forced)
        ours = ("native", "panels")
        order = ("native", DEFAULT, "linear") if self.forced in ours else ("linear", DEFAULT)
        return next((name for name in order if name in builders), next(iter(builders)))

    def layout(
        self,
        kind: str,
        shape: tuple[int, int],
        builders: Builders,
        incumbent: str = DEFAULT,
        margin: float = MARGIN,
    ) -> str:
        """The layout of one matrix; `incumbent` is kept unless another measures `margin`
        better. Cached timings are picked from again, so a rule's change applies to them."""
        if self.forced is not None:
            return self._forced(builders)
        key = cache_key(kind, shape, self.dtype)
        if key not in self.chosen:
            assert self.cache is not None
            cached = self.cache.seconds(key)
            fresh = cached is None or not set(builders) <= set(cached)
            if fresh:
                seconds = measure(builders, shape, self.dtype, _ROWS.get(kind, (1, PREFILL_ROWS)))
            else:
                seconds = {name: cached[name] for name in builders}
            self.chosen[key] = pick(seconds, incumbent, margin)
            if fresh:
                self.cache.put(key, self.chosen[key], seconds)
        return self.chosen[key]
