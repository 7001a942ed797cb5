"""bench.py's side of the peers: which peer rows exist, and their processes.

The peers (ONNX Runtime through optimum's ONNX export, OpenVINO through optimum-intel) live in
their own virtualenv (benchmarks/peers/.venv, see README.md there), so bench.py never
imports them: it runs benchmarks/peers/run_peer.py with that venv's python. For the speed
figures one process per peer engine stays up for the whole run (exported, loaded and warmed
up once) and measures one repeat each time bench.py asks, so repeats alternate engines as
they do for bench.py's own. Load figures come from a fresh `run_peer.py load` process per
repeat, like bench.py's --child. Standard library only.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
RUN_PEER = HERE / "run_peer.py"
VENV_PYTHON = HERE / ".venv" / "bin" / "python"

#: run_peer.py's engines -> (bench row name, dtype group, quantize label for the baseline).
ROWS: dict[str, tuple[str, str, str | None]] = {
    "onnxruntime-fp32": ("onnxruntime", "float32", None),
    "onnxruntime-int8": ("onnxruntime-int8-dynamic", "float32", "int8-dynamic"),
    "openvino-fp32": ("openvino", "float32", None),
    "openvino-bf16": ("openvino", "bfloat16", None),
    "openvino-int8": ("openvino-int8-weights", "float32", "int8"),
}
FAMILIES = {
    "onnxruntime": [e for e in ROWS if e.startswith("onnxruntime")],
    "openvino": [e for e in ROWS if e.startswith("openvino")],
}

#: One line per peer failure in this run (bench.py reports them), and the engines that failed.
ERRORS: list[str] = []
FAILED: set[str] = set()


def default_python() -> str | None:
    """The peers' venv python when it exists, else None (bench.py then runs without)."""
    return str(VENV_PYTHON) if VENV_PYTHON.exists() else None


def available(python: str) -> dict[str, bool]:
    """Which peer runtimes that python can import (run_peer.py answers, quickly)."""
    proc = subprocess.run(
        [python, str(RUN_PEER), "available"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ValueError(f"{python} cannot run {RUN_PEER.name}: {last_line(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def select(spec: str, python: str | None, device: str, log: Callable[[str], None]) -> list[str]:
    """The peer engines to run: `spec` is auto, none, or a comma list of families
    (onnxruntime, openvino) and engine names. ValueError for a request that cannot be met."""
    spec = spec.strip()
    if spec == "none":
        log("peers: none (--peers none)")
        return []
    if not device.startswith("cpu"):
        log("peers: ONNX Runtime and OpenVINO rows are measured on the CPU only: none here")
        return []
    if python is None or not Path(python).exists():
        if spec == "auto":
            log(
                "peers: no peers virtualenv (benchmarks/peers/.venv): running without ONNX "
                "Runtime and OpenVINO (see benchmarks/peers/README.md)"
            )
            return []
        raise ValueError(f"no peers python at {python or VENV_PYTHON}: see {HERE / 'README.md'}")
    have = available(python)
    if spec == "auto":
        wanted = [e for family, engines in FAMILIES.items() if have.get(family) for e in engines]
    else:
        wanted = requested(spec, have, python)
    log(f"peers: {', '.join(wanted) or 'none installed'} (through {python})")
    return wanted


def requested(spec: str, have: dict[str, bool], python: str) -> list[str]:
    """The engines a comma list names (families expand to their engines), in order."""
    wanted: list[str] = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        if name not in FAMILIES and name not in ROWS:
            known = ", ".join([*FAMILIES, *ROWS])
            raise ValueError(f"unknown peer {name!r}: use auto, none or {known}")
        for engine in FAMILIES.get(name, [name]):
            if not have.get(engine.split("-")[0]):
                raise ValueError(f"{engine}: its runtime is not installed in {python}")
            if engine not in wanted:
                wanted.append(engine)
    return wanted


def workload_args(folder: Path, args: Any) -> list[str]:
    """run_peer.py's options for bench.py's checkpoint, threads and workload."""
    return [
        "--checkpoint",
        str(folder),
        "--cache-dir",
        str(folder.parent / "peers"),
        "--threads",
        str(args.threads),
        "--new-tokens",
        str(args.new_tokens),
        "--batch-tokens",
        str(args.batch_tokens),
        "--batch",
        str(args.batch),
        "--long-prompt",
        str(args.long_prompt),
    ]


def log_path(folder: Path, engine: str) -> Path:
    path = folder.parent / "peers" / "logs" / f"{engine}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


class PeerProcess:
    """One peer engine, exported, loaded and warmed up in its own process."""

    def __init__(self, python: str, engine: str, folder: Path, args: Any) -> None:
        self.engine = engine
        self.log = log_path(folder, engine)
        self._stderr: IO[str] = self.log.open("w")
        self.proc = subprocess.Popen(
            [python, str(RUN_PEER), "serve", engine, *workload_args(folder, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        ready = self._read()
        self.tokens: list[int] | None = ready.get("tokens")
        self.info: dict[str, Any] = {k: ready[k] for k in ("versions", "settings") if k in ready}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._stderr.flush()
            tail = last_line(self.log.read_text(errors="replace"))
            raise RuntimeError(f"{self.engine} exited ({self.proc.returncode}): {tail}")
        message = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"{self.engine}: {message['error']}")
        return message

    def repeat(self) -> dict[str, float]:
        """Measure one repeat of the workload (the figures of bench.repeat_samples)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("repeat\n")
        self.proc.stdin.flush()
        return self._read()["samples"]

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


def fail(engine: str, exc: Exception, log: Callable[[str], None] | None = None) -> None:
    message = f"{engine}: {exc}"
    ERRORS.append(message)
    FAILED.add(engine)
    if log is not None:
        log(f"peer failed, its row is left out: {message}")


def start(
    python: str, engine: str, folder: Path, args: Any, log: Callable[[str], None]
) -> PeerProcess | None:
    """A ready PeerProcess, or None (recorded in ERRORS) when the peer fails to start."""
    try:
        return PeerProcess(python, engine, folder, args)
    except (OSError, RuntimeError, ValueError) as exc:
        fail(engine, exc, log)
        return None


def load(
    python: str, engine: str, folder: Path, args: Any, log: Callable[[str], None]
) -> dict[str, Any] | None:
    """Load figures from a fresh peer process (bench.load_figures there), or None."""
    proc = subprocess.run(
        [
            python,
            str(RUN_PEER),
            "load",
            engine,
            *workload_args(folder, args),
            "--gen-tokens",
            str(args.new_tokens),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        fail(engine, RuntimeError(f"load failed: {last_line(proc.stderr)}"), log)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(info: dict[str, Any]) -> str:
    """A peer's runtime settings on one line (the values its runtime reports), for the table."""
    return ", ".join(f"{k}={v}" for k, v in info.get("settings", {}).items())
