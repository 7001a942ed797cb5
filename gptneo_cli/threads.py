"""How many CPU threads torch uses: the user's number, or one that fits the free cores.

torch's default is one thread per core whether or not another process holds the core.
Its threads meet at a barrier after every operation, so when one of them shares a core
with a CPU-bound process, every step waits for the time slice that thread gets: measured
on a 2-core machine next to one busy process, decoding with torch's 2 threads ran 10-75x
slower than with 1 thread.

The default ("auto") therefore looks at how busy the CPUs are before choosing:

1. `cores` is what torch would use (its default thread count at first use, which already
   follows OMP_NUM_THREADS and physical cores), capped by the process's CPU affinity and
   its cgroup CPU quota (containers).
2. `busy` is how many of the CPUs this process may run on were used by *other* processes
   during a short sample (~80 ms of /proc/stat, minus this process's own CPU time). The
   CLI takes the sample while torch imports, so it costs nothing there.
3. threads = floor(cores x (1 - busy / cpus) + 0.3), between 1 and `cores`.

A core counts as free when it is at least ~70 % idle: giving up a thread costs at most
its share of the speed, while a thread on a contended core stalls all the others. On a
quiet machine this is torch's own default; next to one CPU-bound process on 2 cores it
is 1. Where /proc/stat does not exist (macOS, Windows) the default is `cores`.

Nothing here imports torch at module load: the CLI validates --threads before torch loads.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: A setting of more threads than this many per CPU is surely a typo.
MAX_PER_CPU = 4
#: How long the CPU-usage sample runs.
SAMPLE_S = 0.08
#: The share of a core that must be idle for it to count as free, as the rounding margin.
FREE_MARGIN = 0.3


class ThreadsError(ValueError):
    """A bad thread count; str() names where it came from (flag, variable or file)."""


def passive_openmp_waits() -> None:
    """Before torch is imported, where the model will run on a thread of its own (serve,
    batch): tell OpenMP's idle workers to sleep rather than spin (unless the user set
    OMP_WAIT_POLICY). With spinning workers, decoding 8 rows on a second thread ran ~25 %
    slower on a 2-core CPU than on the main thread; passive waits closed most of the gap
    (docs/PERFORMANCE.md). generate runs its scheduler on the calling thread instead."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cpu_count() -> int:
    """The CPUs this process may run on (affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_threads(value: Any, where: str = "threads") -> int | None:
    """A thread count from a flag, variable or settings file: a whole number from 1 to
    4x the CPUs, or "auto" / None (the default rule). Raises ThreadsError naming `where`."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", ""):
            return None
        try:
            value = int(text)
        except ValueError:
            raise ThreadsError(f"{where} must be a whole number or auto, got {text!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ThreadsError(f"{where} must be a whole number or auto, got {value!r}")
    most = MAX_PER_CPU * cpu_count()
    if value < 1:
        raise ThreadsError(f"{where} must be at least 1 (or auto), got {value}")
    if value > most:
        raise ThreadsError(
            f"{where} must be at most {most} ({MAX_PER_CPU}x the {cpu_count()} CPUs), got {value}"
        )
    return value


# ---- how busy the CPUs are ------------------------------------------------------------------


def parse_proc_stat(text: str) -> dict[int, tuple[int, int]]:
    """/proc/stat's per-CPU lines -> {cpu: (busy ticks, total ticks)}.

    Idle is `idle` + `iowait`; everything else (user, nice, system, irq, softirq, steal) is
    busy. steal counts as busy: the hypervisor gave that time to someone else.
    """
    out: dict[int, tuple[int, int]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        fields = [int(f) for f in rest.split()[:8]]  # guest time is inside user already
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        total = sum(fields)
        out[int(name[3:])] = (total - idle, total)
    return out


def busy_cpus(
    before: Mapping[int, tuple[int, int]],
    after: Mapping[int, tuple[int, int]],
    own_cpu_s: float,
    wall_s: float,
    cpus: set[int] | None = None,
) -> float:
    """How many of `cpus` (all in the sample when None) other processes kept busy between
    two /proc/stat readings: their busy share times their number, less this process's own
    CPU seconds per wall second (it may be importing torch meanwhile)."""
    ids = [c for c in after if c in before and (cpus is None or c in cpus)]
    busy = total = 0
    for c in ids:
        busy += after[c][0] - before[c][0]
        total += after[c][1] - before[c][1]
    if not ids or total <= 0:
        return 0.0
    all_busy = len(ids) * busy / total
    own = own_cpu_s / wall_s if wall_s > 0 else 0.0
    return max(0.0, all_busy - own)


def choose_threads(cores: int, cpus: int, busy: float) -> int:
    """The default rule (module docstring): floor(cores x free share + 0.3) in [1, cores]."""
    cores = max(1, cores)
    free_share = max(0.0, 1.0 - busy / max(1, cpus))
    return max(1, min(cores, math.floor(cores * free_share + FREE_MARGIN)))


class CpuSample:
    """Other processes' CPU use over a short interval, measured in a background thread."""

    def __init__(
        self,
        read: Callable[[], str] | None = None,
        seconds: float = SAMPLE_S,
        clocks: tuple[Callable[[], float], Callable[[], float]] = (
            time.monotonic,
            time.process_time,
        ),
    ) -> None:
        self._read = read or (lambda: Path("/proc/stat").read_text())
        self.seconds = seconds
        #: (wall clock, this process's CPU clock), replaceable in tests
        self.clocks = clocks
        self.busy: float | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> CpuSample:
        self._thread = threading.Thread(target=self._run, name="gptneo-cpu-sample", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        wall, cpu = self.clocks
        try:
            before, t0, c0 = parse_proc_stat(self._read()), wall(), cpu()
            time.sleep(self.seconds)
            after, t1, c1 = parse_proc_stat(self._read()), wall(), cpu()
        except (OSError, ValueError, IndexError):
            return  # no /proc/stat (macOS, Windows) or an unexpected format: no sample
        self.busy = busy_cpus(before, after, c1 - c0, t1 - t0, _affinity())

    def result(self) -> float | None:
        """Busy CPUs (waits for the sample to end), or None when it could not be taken."""
        if self._thread is None:
            self.start()
        assert self._thread is not None
        self._thread.join()
        return self.busy


def _affinity() -> set[int] | None:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The cgroup v2 CPU quota in CPUs (a container's --cpus), or None when unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1.0, int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return None


# ---- the choice, applied ------------------------------------------------------------------


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count in force and why (shown by `gptneo info` and --stats)."""

    count: int
    reason: str

    def describe(self) -> str:
        return f"{self.count} ({self.reason})"


_pending: CpuSample | None = None
_torch_default: int | None = None
_current: ThreadChoice | None = None


def start_sample() -> None:
    """Begin measuring CPU use now (e.g. before `import torch`), for the next `apply`."""
    global _pending
    if _pending is None:
        _pending = CpuSample().start()


def take_sample() -> CpuSample:
    """The sample started by `start_sample`, or a new one; the next call starts afresh."""
    global _pending
    sample, _pending = _pending, None
    return sample if sample is not None else CpuSample().start()


def torch_cores() -> int:
    """What torch would use by itself (its thread count the first time we look), capped by
    the CPU affinity and cgroup quota."""
    global _torch_default
    import torch

    if _torch_default is None:
        _torch_default = torch.get_num_threads()
    quota = _cgroup_cpus()
    cores = min(_torch_default, cpu_count())
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def decide(
    requested: int | None, source: str = "threads", sample: CpuSample | None = None
) -> ThreadChoice:
    """The thread count for `requested` (None: the default rule, measuring with `sample`)."""
    if requested is not None:
        global _pending
        _pending = None  # a sample started for "auto" is not needed (nor valid later)
        return ThreadChoice(requested, source)
    cores, cpus = torch_cores(), cpu_count()
    busy = (sample or take_sample()).result()
    if busy is None:
        return ThreadChoice(cores, f"auto: {cores} cores, CPU use unknown")
    count = choose_threads(cores, cpus, busy)
    return ThreadChoice(count, f"auto: {cores} cores, others busy on {busy:.1f} of {cpus} CPUs")


def apply(requested: int | None = None, source: str = "threads") -> ThreadChoice:
    """Decide and set torch's intra-op thread count (torch.set_num_threads); remembered for
    `current()`. `requested` is checked as `check_threads` does."""
    global _current
    import torch

    requested = check_threads(requested, source)
    choice = decide(requested, source)
    if torch.get_num_threads() != choice.count:
        torch.set_num_threads(choice.count)
    _current = choice
    return choice


def current() -> ThreadChoice | None:
    """The last choice `apply` made in this process (None before the first model load)."""
    return _current
