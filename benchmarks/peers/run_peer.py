#!/usr/bin/env python
"""ONNX Runtime and OpenVINO on bench.py's checkpoint and workload (run in the peers' venv).

    PY=benchmarks/peers/.venv/bin/python
    CKPT=~/.cache/gptneo/bench/gpt-neo-125m-random     # bench.py writes it
    $PY benchmarks/peers/run_peer.py bench openvino-fp32 --checkpoint $CKPT --threads 2
    $PY benchmarks/peers/run_peer.py export onnxruntime-int8 --checkpoint $CKPT

Engines: onnxruntime-fp32 (optimum's ONNX export), onnxruntime-int8 (that export, dynamically
quantized by optimum's ORTQuantizer), openvino-fp32 and openvino-bf16 (one fp32 IR from
optimum-intel; the inference precision is set explicitly, because OpenVINO defaults to bf16
on CPUs with AVX512-BF16/AMX), openvino-int8 (int8 weight-only compression by
optimum-intel/NNCF, f32 inference precision, OpenVINO's other int8 defaults).

Exports are written once under --cache-dir (default: a `peers` folder beside the checkpoint,
i.e. bench.py's cache), never into the repository, and redone when a version changes.

Commands:
- bench: export, load, warm up, `--repeats` repeats, then `--load-repeats` fresh-process
  loads; prints one JSON object (medians and samples) on stdout.
- serve: for bench.py: export, load, warm up, print a JSON line (greedy tokens, versions,
  settings); then each `repeat` line on stdin measures one repeat and answers a JSON line.
- load: one fresh-process load: the load figures of bench.py's --child, as JSON.
- export: only the export (JSON with its folder and seconds).
- available: which runtimes import here (JSON).

The figures are bench.py's own functions (workload_prompts, warm_up, repeat_samples,
load_figures, run_generate's transformers path), so they are measured alike. Progress and
the libraries' chatter go to stderr; stdout carries only JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402 - benchmarks/bench.py: stdlib-only at import time


@dataclass(frozen=True)
class PeerEngine:
    """One peer row: its runtime, the export it runs and its runtime options."""

    runtime: str  # "onnxruntime" or "openvino"
    export: str  # the cache folder of its export (shared by rows on the same weights)
    options: tuple[tuple[str, str], ...] = ()  # OpenVINO properties beyond the common ones


ENGINES: dict[str, PeerEngine] = {
    "onnxruntime-fp32": PeerEngine("onnxruntime", "onnx-fp32"),
    "onnxruntime-int8": PeerEngine("onnxruntime", "onnx-int8-dynamic"),
    "openvino-fp32": PeerEngine(
        "openvino",
        "openvino-fp32",
        (
            ("INFERENCE_PRECISION_HINT", "f32"),
            ("KV_CACHE_PRECISION", "f32"),
            ("DYNAMIC_QUANTIZATION_GROUP_SIZE", "0"),
        ),
    ),
    "openvino-bf16": PeerEngine(
        "openvino",
        "openvino-fp32",
        (
            ("INFERENCE_PRECISION_HINT", "bf16"),
            ("KV_CACHE_PRECISION", "bf16"),
            ("DYNAMIC_QUANTIZATION_GROUP_SIZE", "0"),
        ),
    ),
    "openvino-int8": PeerEngine(
        "openvino", "openvino-int8-weights", (("INFERENCE_PRECISION_HINT", "f32"),)
    ),
}
#: The OpenVINO properties reported with each row (what the compiled model really uses).
OV_REPORTED = (
    "INFERENCE_PRECISION_HINT",
    "KV_CACHE_PRECISION",
    "DYNAMIC_QUANTIZATION_GROUP_SIZE",
    "INFERENCE_NUM_THREADS",
    "NUM_STREAMS",
    "PERFORMANCE_HINT",
)
#: The model as bench.py's transformers path drives it (optimum's models are generate()-able).
HF = bench.Engine("peer", bench.TRANSFORMERS, "float32")
ONNX_FILE = {"onnx-fp32": "model.onnx", "onnx-int8-dynamic": "model_quantized.onnx"}


def log(message: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("optimum", "optimum-onnx", "onnxruntime", "optimum-intel", "openvino", "nncf"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def available() -> dict[str, bool]:
    """Which runtimes (with their optimum integration) are installed here."""

    def found(name: str) -> bool:
        with contextlib.suppress(ImportError, ValueError):
            return importlib.util.find_spec(name) is not None
        return False

    return {
        "onnxruntime": found("onnxruntime") and found("optimum.onnxruntime"),
        "openvino": found("openvino") and found("optimum.intel"),
    }


# ---- export (once, cached) ----------------------------------------------------------------


def export(kind: str, checkpoint: Path, cache: Path) -> Path:
    """The folder of this export of `checkpoint`, written once under `cache`; it is redone
    when the checkpoint or a peer package changes (the stamp in `.complete` says)."""
    folder = cache / checkpoint.name / kind
    weights = checkpoint / "model.safetensors"
    stamp = json.dumps({"versions": versions(), "weights_mtime": weights.stat().st_mtime_ns})
    done = folder / ".complete"
    if done.is_file() and done.read_text() == stamp:
        return folder
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    partial.mkdir(parents=True)
    log(f"exporting {checkpoint.name} to {kind} in {folder} (once)")
    start = time.perf_counter()
    if kind == "onnx-fp32":
        from optimum.onnxruntime import ORTModelForCausalLM

        ORTModelForCausalLM.from_pretrained(checkpoint, export=True).save_pretrained(partial)
    elif kind == "onnx-int8-dynamic":
        quantize_onnx(export("onnx-fp32", checkpoint, cache), partial)
    elif kind in ("openvino-fp32", "openvino-int8-weights"):
        from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

        extra: dict[str, Any] = {"load_in_8bit": False}
        if kind == "openvino-int8-weights":
            extra = {"quantization_config": OVWeightQuantizationConfig(bits=8)}
        model = OVModelForCausalLM.from_pretrained(checkpoint, export=True, compile=False, **extra)
        model.save_pretrained(partial)
    else:
        raise ValueError(f"unknown export {kind!r}")
    partial.rename(folder)
    done.write_text(stamp)
    log(f"exported {kind} in {time.perf_counter() - start:.0f} s")
    return folder


def quantize_onnx(source: Path, target: Path) -> None:
    """optimum's dynamic int8 quantization (int8 weights, activations quantized per call),
    with the instruction set this CPU has."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    pick = (
        AutoQuantizationConfig.avx512_vnni
        if "avx512_vnni" in flags
        else AutoQuantizationConfig.avx2
    )
    config = pick(is_static=False, per_channel=False)
    ORTQuantizer.from_pretrained(source).quantize(save_dir=target, quantization_config=config)


# ---- load and run --------------------------------------------------------------------------


def import_runtime(runtime: str) -> None:
    """Import the runtime's stack (outside the timed load, as bench.py's --child does)."""
    if runtime == "onnxruntime":
        import onnxruntime  # noqa: F401
        import optimum.onnxruntime  # noqa: F401
    else:
        import openvino  # noqa: F401
        import optimum.intel  # noqa: F401


def load(name: str, folder: Path, threads: int) -> Any:
    """The exported model on the CPU with `threads` threads, ready to generate()."""
    engine = ENGINES[name]
    if engine.runtime == "onnxruntime":
        import onnxruntime
        from optimum.onnxruntime import ORTModelForCausalLM

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return ORTModelForCausalLM.from_pretrained(
            folder,
            file_name=ONNX_FILE[engine.export],
            provider="CPUExecutionProvider",
            session_options=options,
            use_cache=True,
        )
    from optimum.intel import OVModelForCausalLM

    ov_config = {
        "INFERENCE_NUM_THREADS": str(threads),
        "NUM_STREAMS": "1",
        "PERFORMANCE_HINT": "LATENCY",
        "CACHE_DIR": "",  # no compiled-blob cache: every load compiles, as a fresh install would
        **dict(engine.options),
    }
    return OVModelForCausalLM.from_pretrained(folder, device="CPU", ov_config=ov_config)


def settings(name: str, model: Any) -> dict[str, str]:
    """The settings the loaded model really runs with (OpenVINO: the compiled model's)."""
    engine = ENGINES[name]
    if engine.runtime == "onnxruntime":
        session = getattr(model, "session", None) or getattr(model, "model", None)
        out = {"export": engine.export}
        if session is not None and hasattr(session, "get_session_options"):
            opts = session.get_session_options()
            out["intra_op_num_threads"] = str(opts.intra_op_num_threads)
            out["providers"] = ",".join(session.get_providers())
        return out
    compiled = model.request  # an InferRequest once compiled (optimum-intel's stateful model)
    if hasattr(compiled, "get_compiled_model"):
        compiled = compiled.get_compiled_model()
    out = {"export": engine.export}
    for key in OV_REPORTED:
        with contextlib.suppress(Exception):  # a property this device does not have
            value = compiled.get_property(key)
            out[key] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
    return out


def generator(model: Any) -> bench.Generate:
    return functools.partial(bench.run_generate, HF, model, device="cpu")


@contextlib.contextmanager
def json_stdout() -> Iterator[IO[str]]:
    """A private handle on stdout for the JSON; everything else written to fd 1 (libraries'
    prints, C code) goes to stderr instead."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        yield out
    finally:
        out.flush()


def send(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def prepare(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Export, load, warm up; the model and the ready message (tokens, versions, settings)."""
    engine = ENGINES[args.engine]
    folder = export(engine.export, args.checkpoint, args.cache_dir)
    log(f"loading {args.engine} from {folder}")
    model = load(args.engine, folder, args.threads)
    prompts = bench.workload_prompts(args.long_prompt, args.batch)
    log(f"warm-up {args.engine}")
    bench.warm_up(generator(model), prompts)
    tokens = bench.greedy_tokens(HF, model, prompts[0], args.new_tokens, "cpu")
    ready = {
        "ready": True,
        "engine": args.engine,
        "tokens": tokens,
        "versions": versions(),
        "settings": settings(args.engine, model),
    }
    return model, ready


def serve(args: argparse.Namespace, out: IO[str]) -> int:
    model, ready = prepare(args)
    send(out, ready)
    prompts = bench.workload_prompts(args.long_prompt, args.batch)
    for line in sys.stdin:
        if line.strip() == "repeat":
            send(out, {"samples": bench.repeat_samples(generator(model), prompts, args)})
        elif line.strip() == "quit":
            break
    return 0


def load_once(args: argparse.Namespace) -> dict[str, Any]:
    """bench.py's --child for a peer: import, then time the load and its peak RSS."""
    engine = ENGINES[args.engine]
    folder = export(engine.export, args.checkpoint, args.cache_dir)
    import_runtime(engine.runtime)

    def generate(model: Any, prompt: Any) -> None:
        bench.run_generate(HF, model, prompt, args.gen_tokens, "cpu")

    return bench.load_figures(lambda: load(args.engine, folder, args.threads), generate)


def bench_all(args: argparse.Namespace) -> dict[str, Any]:
    """The whole workload for one engine, standalone: speed in this process, loads fresh."""
    model, ready = prepare(args)
    prompts = bench.workload_prompts(args.long_prompt, args.batch)
    samples: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        log(f"repeat {repeat + 1}/{args.repeats}: {args.engine}")
        for key, value in bench.repeat_samples(generator(model), prompts, args).items():
            samples.setdefault(key, []).append(value)
    del model
    for repeat in range(args.load_repeats):
        log(f"load {repeat + 1}/{args.load_repeats}: {args.engine} (fresh process)")
        command = [sys.executable, __file__, "load", args.engine, *common_options(args)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"load failed: {proc.stderr.strip()[-2000:]}")
        for key, value in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                samples.setdefault(key, []).append(float(value))
    ready.pop("ready")
    return {
        **ready,
        "threads": args.threads,
        "medians": {k: statistics.median(v) for k, v in samples.items()},
        "samples": samples,
    }


def common_options(args: argparse.Namespace) -> list[str]:
    return [
        "--checkpoint",
        str(args.checkpoint),
        "--cache-dir",
        str(args.cache_dir),
        "--threads",
        str(args.threads),
        "--gen-tokens",
        str(args.gen_tokens),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run_peer.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=["bench", "serve", "load", "export", "available"])
    p.add_argument("engine", nargs="?", choices=list(ENGINES))
    p.add_argument("--checkpoint", type=Path, help="bench.py's random-weight checkpoint folder")
    p.add_argument("--cache-dir", type=Path, default=None, help="exports (default: beside it)")
    p.add_argument("--threads", type=int, default=None, help="default: torch's")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--long-prompt", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--gen-tokens", type=int, default=None, help="load: tokens generated after")
    args = p.parse_args(argv)
    if args.command != "available":
        if args.engine is None or args.checkpoint is None:
            p.error(f"{args.command} needs an engine and --checkpoint")
        if not (args.checkpoint / "model.safetensors").is_file():
            p.error(f"no model.safetensors in {args.checkpoint}: run benchmarks/bench.py first")
    args.cache_dir = args.cache_dir or (
        args.checkpoint.parent / "peers" if args.checkpoint else None
    )
    args.gen_tokens = args.gen_tokens or args.new_tokens
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "available":
        print(json.dumps(available()))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    with json_stdout() as out:
        try:
            if args.command == "serve":
                return serve(args, out)
            if args.command == "load":
                send(out, load_once(args))
            elif args.command == "export":
                start = time.perf_counter()
                folder = export(ENGINES[args.engine].export, args.checkpoint, args.cache_dir)
                send(out, {"folder": str(folder), "seconds": time.perf_counter() - start})
            else:
                send(out, bench_all(args))
        except Exception as exc:  # noqa: BLE001 - one line for bench.py, the trace in stderr
            import traceback

            traceback.print_exc()
            send(out, {"error": f"{type(exc).__name__}: {exc}"})
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
