"""The matrix products behind gptneo's CPU layout choices, timed on this machine.

fast.py picks a layout per dtype (oneDNN-packed, transposed columns, plain rows). Which one
wins depends on the CPU (MKL is fast on Intel and takes a generic path on AMD), so this script
times each candidate on the shapes of gpt-neo-125M and prints a markdown table:

- layer matrices (768 x 3072) streamed from memory: 52 different matrices per pass, about the
  bytes of the whole model, so every read comes from RAM as in decoding;
- the tied lm_head (50257 x 768), the largest single matrix;
- 1, 8 and 512 rows (decode, batch-8 decode, a prefill).

    python benchmarks/kernels.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench import machine

HIDDEN, INNER, VOCAB, MATRICES = 768, 3072, 50257, 52


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """oneDNN's linear on a plain or a prepacked weight (what fast.PackedLinear calls)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of `run` after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def candidates(dtype: torch.dtype, weights: list[torch.Tensor]) -> dict[str, tuple]:
    """name -> (product, the weights in the layout that product reads)."""
    out: dict[str, tuple] = {
        "F.linear, rows [out, in]": (F.linear, weights),
        "oneDNN, plain rows": (onednn, weights),
        "oneDNN, prepacked": (
            onednn,
            [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights],
        ),
    }
    if dtype == torch.float32:
        out["x @ W, columns [in, out]"] = (torch.mm, [w.t().contiguous() for w in weights])
    return out


def table(dtype: torch.dtype, repeats: int) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(INNER, HIDDEN, generator=gen).to(dtype) for _ in range(MATRICES)]
    head = [torch.randn(VOCAB, HIDDEN, generator=gen).to(dtype)]
    lines = []
    for label, weights in (("layer matrices, streamed", layers), ("lm_head", head)):
        params = sum(w.numel() for w in weights)
        for name, (product, stored) in candidates(dtype, weights).items():
            cells = []
            for rows in (1, 8, 512):
                x = torch.randn(rows, HIDDEN, generator=gen).to(dtype)

                def run(product=product, stored=stored, x=x) -> None:
                    for w in stored:
                        product(x, w)

                s = seconds(run, repeats if rows < 512 else max(1, repeats // 2))
                cells.append(f"{2 * params * rows / s / 1e9:.1f}")
            lines.append(
                f"| {str(dtype).removeprefix('torch.')} | {label} | {name} | "
                + " | ".join(cells)
                + " |"
            )
            del stored
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"{info.get('cpu', info['platform'])}, torch {info['torch']}, {info['threads']} threads")
    print("\nGFLOP/s (higher is better)\n")
    print("| dtype | matrices | product | 1 row | 8 rows | 512 rows |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for line in table(dtype, args.repeats):
            print(line, flush=True)


if __name__ == "__main__":
    main()
