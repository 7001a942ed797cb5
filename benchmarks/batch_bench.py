#!/usr/bin/env python
"""`gptneo batch` against `gptneo generate --input --batch-size 8`, and `--ray` with 1 and 2
actors; then peak memory of `gptneo batch` on a small and a large input.

    python benchmarks/batch_bench.py                      # 2,000 prompts (issue 13)
    python benchmarks/batch_bench.py --prompts 128 --memory-lines 1000,100000
    python benchmarks/batch_bench.py --engines batch16,batch64 --memory-lines ""

Every engine runs as users run it (a subprocess of the CLI) on the same prompts: about 32
tokens each (random GPT-2 token ids, decoded), 64 new tokens each (greedy, ignore_eos), on
a random-weight gpt-neo-125M-shaped checkpoint (benchmarks/bench.py writes it once; the
GPT-2 tokenizer comes from ../shared/assets/gpt2-tokenizer). Reported per engine: wall
time (model load included), requests/s and generated tok/s over that wall time, and the
child's peak RSS (wait4). Memory: `gptneo batch` with the demo model `tiny` and one new
token per request, over N-line inputs: flat peak RSS means the input is streamed.

The machine may be shared: run it when quiet and read single runs with care.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import checkpoint_with_tokenizer, log  # noqa: E402


def model_folder(cache: Path) -> Path:
    return checkpoint_with_tokenizer("125m", cache)


def gptneo() -> list[str]:
    script = Path(sys.executable).with_name("gptneo")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "gptneo_cli.cli"]


def prompts(folder: Path, n: int, tokens: int, seed: int = 0) -> list[str]:
    """n one-line prompts of about `tokens` tokens (random ids, decoded, newlines removed)."""
    from gptneo_cli.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = tok.decode([rng.randrange(50000) for _ in range(tokens)])
        text = " ".join(text.split())
        if text:
            out.append(text)
    return out


def run(args: list[str], label: str, threads: int | None = None) -> dict[str, Any]:
    """Run a command; wall seconds and peak RSS (MiB) of the child (the driver's only, for
    --ray: the actors are Ray's processes, not the child's)."""
    log(f"{label}: {' '.join(args)}")
    env = dict(os.environ)
    if threads:  # generate has no --threads: torch reads OMP_NUM_THREADS at start
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{label} failed ({code}): {stderr[-2000:]}")
    # ru_maxrss is the largest child of the process tree it waited for (KiB on Linux)
    return {
        "label": label,
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "stderr": stderr.strip().splitlines()[-1:] if stderr.strip() else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--local-threads",
        type=int,
        default=None,
        help="threads of the local engines (OMP_NUM_THREADS); default: torch's",
    )
    parser.add_argument("--engines", default="generate,batch,ray1,ray2")
    parser.add_argument("--memory-lines", default="1000,100000")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gptneo-bench")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gptneo-batch-bench"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    folder = model_folder(args.cache)
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src = work / "prompts.txt"
    src.write_text("\n".join(prompts(folder, args.prompts, args.prompt_tokens)) + "\n")
    gen = [
        "--max-new-tokens",
        str(args.max_tokens),
        "--ignore-eos",
        "--temperature",
        "0",
        "--dtype",
        args.dtype,
        "-m",
        str(folder),
    ]
    rows = []
    engines = args.engines.split(",")
    for engine in engines:
        out = work / f"{engine}.jsonl"
        if engine == "generate":
            cmd = [
                *gptneo(),
                "generate",
                "--input",
                str(src),
                "--batch-size",
                "8",
                "--format",
                "jsonl",
                "-o",
                str(out),
                *gen,
            ]
        elif engine.startswith("batch"):  # batch, or batchN: --max-running N
            rows_n = engine.removeprefix("batch") or str(args.max_running)
            cmd = [*gptneo(), "batch", str(src), "-o", str(out), "--max-running", rows_n, *gen]
        else:
            actors = int(engine.removeprefix("ray"))
            cmd = [
                *gptneo(),
                "batch",
                str(src),
                "-o",
                str(out),
                "--max-running",
                str(args.max_running),
                "--ray",
                "--actors",
                str(actors),
                "--cpus-per-actor",
                "1",
                "--threads",
                "1",
                *gen,
            ]
        row = run(cmd, engine, None if engine.startswith("ray") else args.local_threads)
        if args.local_threads and not engine.startswith("ray"):
            row["label"] = f"{engine} ({args.local_threads} thread)"
        tokens = args.prompts * args.max_tokens
        row.update(req_s=args.prompts / row["wall_s"], tok_s=tokens / row["wall_s"])
        rows.append(row)
        log(json.dumps(row))
    memory = []
    for n in [int(x) for x in args.memory_lines.split(",") if x]:
        src_n = work / f"mem-{n}.jsonl"
        with open(src_n, "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"line {i} of the input", "max_tokens": 1}) + "\n")
        row = run(
            [
                *gptneo(),
                "batch",
                str(src_n),
                "-o",
                str(work / f"mem-{n}.out"),
                "-m",
                "tiny",
                "--dtype",
                "float32",
            ],
            f"memory {n} lines",
        )
        row["lines"] = n
        memory.append(row)
        log(json.dumps(row))
    print(table(rows, memory, args))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "memory": memory}, indent=2))


def table(rows: list[dict[str, Any]], memory: list[dict[str, Any]], args: Any) -> str:
    base = next((r for r in rows if r["label"].startswith("generate")), None)
    lines = [
        f"{args.prompts} prompts x ~{args.prompt_tokens} tokens, {args.max_tokens} new "
        f"tokens each, {args.dtype}, gpt-neo-125M shape (random weights); wall time "
        "includes loading the model (and starting Ray).",
        "",
        "| engine | wall s | req/s | tok/s | vs generate | peak RSS MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        x = f"{r['tok_s'] / base['tok_s']:.2f}x" if base else "-"
        lines.append(
            f"| {r['label']} | {r['wall_s']:.1f} | {r['req_s']:.2f} | "
            f"{r['tok_s']:.1f} | {x} | {r['peak_rss_mib']:.0f} |"
        )
    if memory:
        lines += [
            "",
            "| input lines (tiny, 1 new token) | wall s | peak RSS MiB |",
            "|---|---|---|",
        ]
        lines += [f"| {m['lines']} | {m['wall_s']:.1f} | {m['peak_rss_mib']:.0f} |" for m in memory]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
