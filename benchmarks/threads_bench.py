#!/usr/bin/env python
"""Decode speed by thread count, on a quiet machine and next to a CPU-bound process.

    python benchmarks/threads_bench.py                    # 125M shape, float32
    python benchmarks/threads_bench.py --dtype bfloat16 --repeats 5

For each condition (quiet; then with a `python -c "while True: pass"` process that this
script starts and kills) it decodes batch-1 greedy tokens of the random-weight 125M
checkpoint (benchmarks/bench.py writes it) with 1 thread, 2 threads, torch's default (one
per core: "all cores") and gptneo's default (`auto`, gptneo_cli.threads: the cores other
processes leave free, decided from a CPU sample taken in that condition), alternating
settings within each repeat, and reports the median tok/s. The targets (issue 14): `auto`
at least as fast as 1 thread next to the busy process, and within 10 % of the best setting
on the quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (benchmarks/bench.py: checkpoints and the decode loop)


def busy_process() -> subprocess.Popen[bytes]:
    """A CPU-bound process on one core, like another program hogging it."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def decode_rate(model: Any, prompt: Any, tokens: int) -> float:
    engine = bench.Engine("gptneo", "gptneo", str(model.dtype).removeprefix("torch."))
    return bench.run_generate(engine, model, prompt, tokens, "cpu")[1]


def measure(model: Any, prompt: Any, args: argparse.Namespace, busy: bool) -> dict[str, Any]:
    """Median decode tok/s per thread setting in one condition."""
    import torch

    from gptneo_cli import threads

    hog = busy_process() if busy else None
    try:
        if hog is not None:
            time.sleep(0.5)  # let it get going before the sample
        auto = threads.decide(None, sample=threads.CpuSample().start())
        settings = {"1": 1, "2": 2, "all cores": threads.torch_cores(), "auto": auto.count}
        rates: dict[str, list[float]] = {name: [] for name in settings}
        for repeat in range(args.repeats):
            for name, count in settings.items():
                torch.set_num_threads(count)
                decode_rate(model, prompt, 4)  # warm-up at this thread count
                rate = decode_rate(model, prompt, args.new_tokens)
                rates[name].append(rate)
                bench.log(f"{'busy' if busy else 'quiet'} {repeat + 1}: {name} -> {rate:.1f} tok/s")
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return {
        "auto": {"count": auto.count, "reason": auto.reason},
        "threads": settings,
        "tok_s": {name: statistics.median(values) for name, values in rates.items()},
        "samples": rates,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--shape", default="125m", choices=sorted(bench.SHAPES))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    import torch

    from gptneo_cli import threads
    from gptneo_cli.fast import FastCausalLM

    threads.torch_cores()  # note torch's own default before anything changes it
    cache_dir = Path(args.cache_dir or Path.home() / ".cache" / "gptneo" / "bench")
    folder = bench.checkpoint(args.shape, cache_dir)
    model = FastCausalLM.from_pretrained(folder, dtype=args.dtype, device="cpu", attn="sdpa")
    prompt = torch.randint(0, 50000, (1, 32), generator=torch.Generator().manual_seed(1))
    results = {
        "quiet": measure(model, prompt, args, False),
        "busy": measure(model, prompt, args, True),
    }
    lines = [
        f"{args.shape} {args.dtype}, batch-1 decode tok/s (median of {args.repeats}), "
        f"{args.new_tokens} tokens; {bench.machine().get('cpu', '?')}",
        "",
        "| condition | " + " | ".join(results["quiet"]["tok_s"]) + " | auto chose |",
        "|---|" + "---|" * (len(results["quiet"]["tok_s"]) + 1),
    ]
    for cond, r in results.items():
        cells = [f"{rate:.1f} ({r['threads'][name]})" for name, rate in r["tok_s"].items()]
        lines.append(f"| {cond} | " + " | ".join(cells) + f" | {r['auto']['reason']} |")
    quiet, busy = results["quiet"]["tok_s"], results["busy"]["tok_s"]
    checks = {
        "busy: auto >= 1 thread": busy["auto"] >= busy["1"],
        "quiet: auto within 10% of the best": quiet["auto"] >= 0.9 * max(quiet.values()),
    }
    lines += ["", *(f"- {name}: {'yes' if ok else 'NO'}" for name, ok in checks.items())]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), **results, "checks": checks}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
