#!/usr/bin/env python
"""`gptneo serve` under concurrent streaming clients: throughput and latency.

    python benchmarks/serve_bench.py                       # fp32 and bf16, 1/4/16/64 clients
    python benchmarks/serve_bench.py --dtypes float32 --clients 1,16 --max-tokens 32
    python benchmarks/serve_bench.py --dtypes float32+int8      # served with --quantize int8

The server runs as `gptneo serve` in a subprocess (as users run it) on a random-weight
gpt-neo-125M-shaped checkpoint (benchmarks/bench.py writes it once; the GPT-2 tokenizer
comes from ../shared/assets/gpt2-tokenizer). Clients are asyncio + httpx in this process,
each sending one streaming completion (token-id prompt, greedy, ignore_eos) at once.

For each dtype and client count N, with continuous batching (--max-running 64) and with
`--max-running 1` (one request at a time: the baseline):
- aggregate tok/s: all generated tokens / wall time from the first request to the last token;
- TTFT p50/p95: request sent -> first token chunk, over all N requests;
- inter-token p50/p95: gaps between successive chunks of one stream, over all streams.
Then the long-prompt check: 8 streams run, a 2000-token prompt arrives; reported is the
longest gap of those 8 streams while it is prefilled, next to their median gap.

Targets (issue 12): at 16 clients, aggregate >= 5x the 1-client figure and p95 inter-token
<= 3x the 1-client p95; the long prompt delays the others' next token by <= 0.5 s.
The machine may be shared: run it when quiet and read single runs with care.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
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


class Server:
    def __init__(self, folder: Path, dtype: str, max_running: int, threads: int | None) -> None:
        dtype, _, quantize = dtype.partition("+")  # "float32+int8": --quantize int8
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [
            sys.executable,
            "-m",
            "gptneo_cli.cli",
            "serve",
            "--model",
            str(folder),
            "--port",
            "0",
            "--dtype",
            dtype,
            "--max-running",
            str(max_running),
            "--max-queue",
            "256",
            "--shutdown-timeout",
            "1",
            *(["--quantize", quantize] if quantize else []),
        ]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        while True:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the server did not start")
            match = re.search(r"http://[\d.]+:\d+", line)
            if match:
                self.url = match.group(0)
                break

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_stream(
    client: Any, url: str, prompt: list[int], max_tokens: int, gaps_out: list[float] | None = None
) -> dict[str, Any]:
    sent = time.perf_counter()
    stamps: list[float] = []
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    if gaps_out is not None:
        gaps_out.extend(gaps)
    return {
        "sent": sent,
        "ttft": stamps[0] - sent if stamps else float("nan"),
        "gaps": gaps,
        "stamps": stamps,
        "tokens": len(stamps),
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run_clients(url: str, n: int, prompt_tokens: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    rng = random.Random(n)
    prompts = [[rng.randrange(50000) for _ in range(prompt_tokens)] for _ in range(n)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 4)) as c:
        await one_stream(c, url, prompts[0][:8], 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(c, url, p, max_tokens) for p in prompts))
        end = max(s for r in results for s in r["stamps"][-1:])
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results]
    return {
        "clients": n,
        "tokens": tokens,
        "wall_s": end - start,
        "tok_s": tokens / (end - start),
        "ttft_p50": pct(ttfts, 0.5),
        "ttft_p95": pct(ttfts, 0.95),
        "itl_p50": pct(gaps, 0.5),
        "itl_p95": pct(gaps, 0.95),
    }


async def long_prompt(url: str, streams: int = 8, long_tokens: int = 2000) -> dict[str, Any]:
    import httpx

    rng = random.Random(7)
    async with httpx.AsyncClient(timeout=600) as c:
        await one_stream(c, url, [1, 2, 3], 2)
        tasks = [
            # 300 tokens: still streaming when the long prompt arrives 1 s later and while it
            # is prefilled (40 tokens ended before it at bf16 speed, leaving nothing to measure)
            asyncio.create_task(one_stream(c, url, [rng.randrange(50000) for _ in range(16)], 300))
            for _ in range(streams)
        ]
        await asyncio.sleep(1.0)  # the streams are decoding
        arrived = time.perf_counter()
        long = await one_stream(c, url, [rng.randrange(50000) for _ in range(long_tokens)], 1)
        prefilled = arrived + long["ttft"]
        results = await asyncio.gather(*tasks)
    during, other = [], []
    for r in results:
        for a, b in zip(r["stamps"], r["stamps"][1:], strict=False):
            (during if b >= arrived and a <= prefilled else other).append(b - a)
    return {
        "long_prompt_tokens": long_tokens,
        "long_ttft_s": long["ttft"],
        "max_gap_during_prefill_s": max(during) if during else float("nan"),
        "median_gap_otherwise_s": statistics.median(other) if other else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="comma-separated; DTYPE+int8 quantizes"
    )
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "gptneo-bench")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    folder = model_folder(args.cache)
    clients = [int(x) for x in args.clients.split(",")]
    report: dict[str, Any] = {
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "rows": [],
    }
    for dtype in args.dtypes.split(","):
        for max_running in (64, 1):
            server = Server(folder, dtype, max_running, args.threads)
            try:
                for n in clients if max_running > 1 else [c for c in clients if c in (1, 16)]:
                    row = asyncio.run(
                        run_clients(server.url, n, args.prompt_tokens, args.max_tokens)
                    )
                    row.update(dtype=dtype, max_running=max_running)
                    report["rows"].append(row)
                    log(json.dumps(row))
                if max_running > 1:
                    lp = asyncio.run(long_prompt(server.url))
                    lp.update(dtype=dtype)
                    report.setdefault("long_prompt", []).append(lp)
                    log(json.dumps(lp))
            finally:
                server.stop()
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def table(report: dict[str, Any]) -> str:
    lines = [
        "| dtype | --max-running | clients | tok/s | TTFT p50 s | TTFT p95 s | "
        "inter-token p50 ms | inter-token p95 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['dtype']} | {r['max_running']} | {r['clients']} | {r['tok_s']:.1f} "
            f"| {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {1000 * r['itl_p50']:.0f} "
            f"| {1000 * r['itl_p95']:.0f} |"
        )
    for lp in report.get("long_prompt", []):
        lines.append("")
        lines.append(
            f"{lp['dtype']}: a {lp['long_prompt_tokens']}-token prompt arriving while "
            f"8 streams run: their longest gap {lp['max_gap_during_prefill_s']:.2f} s "
            f"(median gap otherwise {lp['median_gap_otherwise_s']:.3f} s); the long "
            f"prompt's own TTFT {lp['long_ttft_s']:.2f} s"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
